package main

// Partitions (issue 16): a deployment made with --partitions N keeps N; every user's
// events fall in the user's partition; and decisions that read another partition's
// state equal replay's whatever the timing.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// partitioned starts attrd on a deployment of n partitions.
func partitioned(n int, mod func(*Config)) func(*Config) {
	return func(c *Config) {
		c.Partitions = n
		if mod != nil {
			mod(c)
		}
	}
}

// verifyReplay fails the test unless a replay of the whole log reproduces the live
// projection and every decision.
func verifyReplay(t *testing.T, f *fixture) {
	t.Helper()
	code, out := runCmd(t, "replay", "--verify", "--nats-url", f.srv.ClientURL(), "--encryption-key-file="+f.srv.cfg.DataDir+"/encryption.key")
	if code != 0 || !strings.Contains(out, "reproduces") {
		t.Fatalf("replay --verify: exit %d\n%s", code, out)
	}
}

// TestAPartitionedDeploymentPutsEveryUserInItsPartitionAndReplaysEqual: with four
// partitions, random traffic from several users lands each user's events and
// decisions under p<k>.<uid>, one instance folds all four, and a replay of the log
// reproduces the projection and every decision.
func TestAPartitionedDeploymentPutsEveryUserInItsPartitionAndReplaysEqual(t *testing.T) {
	f := newFixture(t, partitioned(4, nil))
	if n := len(f.srv.Projectors()); n != 4 {
		t.Fatalf("one instance runs %d of 4 partitions", n)
	}
	if answered := concurrentTraffic(t, f, 3, 150, 11); answered < 400 {
		t.Fatalf("%d operations answered", answered)
	}
	lay := events.Layout{Partitions: 4}
	js, _ := jetstream.New(f.srv.apiConn)
	st, err := js.Stream(ctxT(t), events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctxT(t), jetstream.WithSubjectFilter(">"))
	if err != nil {
		t.Fatal(err)
	}
	parts := map[string]bool{}
	for subj := range info.State.Subjects {
		uid := events.UserOfSubject(subj)
		if want := lay.UserSubjects(uid); !strings.HasPrefix(subj, strings.TrimSuffix(want, ">")) {
			t.Fatalf("%s is not under its user's partition (%s)", subj, want)
		}
		parts[strings.Split(subj, ".")[2]] = true
	}
	if len(parts) < 2 {
		t.Fatalf("every event fell in %v", parts)
	}
	// A user's history is read from its partition, with every decision.
	evs, out := historyOf(t, f, f.admin.UST, map[string]any{"user_id": f.aliceID})
	if len(evs) == 0 {
		t.Fatalf("alice's history in a partitioned deployment: %v", out)
	}
	verifyReplay(t, f)
}

// TestPartitionsAreKeptFromTheDeploymentsCreation: a later start with another number
// of partitions is refused with a clear message; with none, or the same, it starts; a
// deployment made before partitions (no metadata) is one partition and stays so.
func TestPartitionsAreKeptFromTheDeploymentsCreation(t *testing.T) {
	dir := t.TempDir()
	s := mustStart(t, func(c *Config) { c.DataDir, c.Partitions = dir, 4 })
	s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := Start(ctx, Config{DataDir: dir, HTTPAddr: "127.0.0.1:0", NATSAddr: "127.0.0.1:0", Password: fastPasswords, Logger: testLogger(), Partitions: 8})
	if !errors.Is(err, events.ErrPartitionsMismatch) || !strings.Contains(err.Error(), "--partitions 4") {
		t.Fatalf("a start with 8 partitions on a deployment of 4: %v", err)
	}
	s = mustStart(t, func(c *Config) { c.DataDir = dir })
	if n := s.parts.Layout().N(); n != 4 {
		t.Fatalf("a start without --partitions: %d partitions", n)
	}
	s.Close()
	// One partition, as every deployment made before partitions.
	dir1 := t.TempDir()
	s = mustStart(t, func(c *Config) { c.DataDir = dir1 })
	s.Close()
	_, err = Start(ctx, Config{DataDir: dir1, HTTPAddr: "127.0.0.1:0", NATSAddr: "127.0.0.1:0", Password: fastPasswords, Logger: testLogger(), Partitions: 2})
	if !errors.Is(err, events.ErrPartitionsMismatch) {
		t.Fatalf("a start with 2 partitions on a deployment of 1: %v", err)
	}
}

// holdPartition makes the projector of partition part wait before writing any batch
// while hold is open; the first batch held closes held.
type partitionHold struct {
	mu   sync.Mutex
	part int
	on   bool
	open chan struct{}
	seen chan struct{}
	lay  events.Layout
	js   func() jetstream.JetStream
}

func (h *partitionHold) hook(first, last uint64) error {
	h.mu.Lock()
	on, open, seen := h.on, h.open, h.seen
	h.mu.Unlock()
	if !on {
		return nil
	}
	js := h.js()
	if js == nil {
		return nil
	}
	st, err := js.Stream(context.Background(), events.StreamName)
	if err != nil {
		return nil
	}
	m, err := st.GetMsg(context.Background(), first)
	if err != nil || h.lay.Partition(events.UserOfSubject(m.Subject)) != h.part {
		return nil
	}
	select {
	case <-seen:
	default:
		close(seen)
	}
	<-open
	return nil
}

// start holds partition part from now until release.
func (h *partitionHold) start(part int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.part, h.on, h.open, h.seen = part, true, make(chan struct{}), make(chan struct{})
}

func (h *partitionHold) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.on = false
	close(h.open)
}

// heldFixture is a fixture of four partitions whose partitions can be held; mod, if
// not nil, configures it further.
func heldFixture(t *testing.T, mod func(*Config)) (*fixture, *partitionHold) {
	h := &partitionHold{lay: events.Layout{Partitions: 4}}
	var srv *Server
	var mu sync.Mutex
	h.js = func() jetstream.JetStream {
		mu.Lock()
		defer mu.Unlock()
		if srv == nil {
			return nil
		}
		js, _ := jetstream.New(srv.apiConn)
		return js
	}
	f := newFixture(t, partitioned(4, func(c *Config) {
		c.ProjectorHooks.BeforeCheckpoint = h.hook
		if mod != nil {
			mod(c)
		}
	}))
	mu.Lock()
	srv = f.srv
	mu.Unlock()
	return f, h
}

// userIn creates users until one falls in a partition not in avoid, and returns its id
// and (logged in) session.
func userIn(t *testing.T, f *fixture, prefix string, super bool, avoid ...int) (string, int, *client.Session) {
	t.Helper()
	lay := events.Layout{Partitions: 4}
	for i := 0; ; i++ {
		name := fmt.Sprintf("%s-%d", prefix, i)
		id, err := f.admin.CreateUser(ctxT(t), name, "pw", super)
		if err != nil {
			t.Fatal(err)
		}
		if p := lay.Partition(id); !containsInt(avoid, p) {
			return id, p, mustLogin(t, f.c, name, "pw")
		}
	}
}

func containsInt(xs []int, x int) bool {
	for _, y := range xs {
		if x == y {
			return true
		}
	}
	return false
}

// waitForEvent returns once the stream holds a message on a subject under prefix.
func waitForEvent(t *testing.T, f *fixture, filter string) {
	t.Helper()
	js, _ := jetstream.New(f.srv.apiConn)
	st, err := js.Stream(ctxT(t), events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
		if _, err := st.GetLastMsgForSubject(ctxT(t), filter); err == nil {
			return
		}
	}
	t.Fatalf("no event on %s", filter)
}

// TestASuperUsersLogoutInFlightDecidesItsWriteToAnotherPartitionAsReplayDoes: a
// super-user of one partition logs out, and its write to a user of another partition
// is appended after the logout while the logout is not folded yet (its partition is
// held). The write's partition waits for the logout's: the write is refused
// (E007001), as a replay of the log decides it.
func TestASuperUsersLogoutInFlightDecidesItsWriteToAnotherPartitionAsReplayDoes(t *testing.T) {
	f, h := heldFixture(t, nil)
	ctx := ctxT(t)
	_, targetPart, _ := userIn(t, f, "target", false)
	superID, superPart, super := userIn(t, f, "super", true, targetPart)
	targetID := ""
	for i := 0; targetID == ""; i++ {
		id, err := f.admin.CreateUser(ctx, fmt.Sprintf("t-%d", i), "pw", false)
		if err != nil {
			t.Fatal(err)
		}
		if (events.Layout{Partitions: 4}).Partition(id) == targetPart {
			targetID = id
		}
	}
	target := super.UserByID(targetID)
	h.start(superPart)
	logout := make(chan error, 1)
	go func() { logout <- super.Logout(context.Background()) }()
	waitForEvent(t, f, (events.Layout{Partitions: 4}).SessionSubject(superID, events.SessionID(super.UST)))
	<-h.seen // the logout's batch is held
	write := make(chan error, 1)
	go func() { write <- target.Attr.Set(context.Background(), "by-super", 1) }()
	waitForEvent(t, f, (events.Layout{Partitions: 4}).UserSubjects(targetID))
	time.Sleep(200 * time.Millisecond) // give the write's partition its chance to fold too early
	h.release()
	if err := <-logout; err != nil {
		t.Fatalf("logout: %v", err)
	}
	if err := <-write; events.CodeOf(err) != events.CodeNoSession {
		t.Fatalf("the write appended after its actor's logout: %v, want E007001", err)
	}
	verifyReplay(t, f)
}

// TestTwoClaimsOfOneUsernameInTwoPartitionsAreDecidedInLogOrder: two users with one
// username are created in two partitions, the first claim's partition held so that
// the second claim (later in the log) would be folded first. The second waits for the
// first's partition and is refused (E001002); the first is created; replay agrees.
func TestTwoClaimsOfOneUsernameInTwoPartitionsAreDecidedInLogOrder(t *testing.T) {
	decided := &decisionLog{}
	f, h := heldFixture(t, func(c *Config) { c.OnDecision = decided.record })
	ctx := ctxT(t)
	lay := events.Layout{Partitions: 4}
	js, _ := jetstream.New(f.srv.apiConn)
	// Users created by attrd itself (no actor), in partitions 1 and 2.
	claim := func(part int, name string) *events.Event { return appendUserIn(t, js, lay, part, name) }
	h.start(1)
	first := claim(1, "contested")
	<-h.seen // partition 1 holds the first claim, unwritten
	second := claim(2, "contested")
	time.Sleep(200 * time.Millisecond) // partition 2 would fold the second claim now
	h.release()
	c1, c2 := decided.await(t, first.ID), decided.await(t, second.ID)
	if c1 != "" || c2 != events.CodeUsernameExists {
		t.Fatalf("the first claim in the log: %q, the second: %q; want accepted, then E001002", c1, c2)
	}
	if _, err := f.c.Login(ctx, "contested", "pw"); err != nil {
		t.Fatalf("the user who got the name cannot log in: %v", err)
	}
	verifyReplay(t, f)
}

// decisionLog records the decisions an instance hands out (Config.OnDecision), by
// event id.
type decisionLog struct {
	mu sync.Mutex
	m  map[string]events.Code
}

func (l *decisionLog) record(d events.Decision) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = map[string]events.Code{}
	}
	l.m[d.EventID] = d.Code
}

// await returns the decision on event id, waiting up to 10 s for it.
func (l *decisionLog) await(t *testing.T, id string) events.Code {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		l.mu.Lock()
		c, ok := l.m[id]
		l.mu.Unlock()
		if ok {
			return c
		}
	}
	t.Fatalf("event %s was not decided", id)
	return ""
}

// appendUserIn appends user.created of name (password "pw") as attrd itself would,
// for a new user id in partition part of lay, and returns the event.
func appendUserIn(t *testing.T, js jetstream.JetStream, lay events.Layout, part int, name string) *events.Event {
	t.Helper()
	for {
		uid := events.NewID()
		if lay.Partition(uid) != part {
			continue
		}
		ev := &events.Event{ID: events.NewID(), Version: events.SchemaVersion, Type: events.UserCreated, Time: time.Now().UnixNano(),
			UserID: uid, App: "attrd", User: &events.UserData{Username: name, PasswordHash: mustHash(t, "pw"), Approved: true}}
		data, err := events.Encode(ev)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(ctxT(t), lay.Subject(ev), data, jetstream.WithMsgID(ev.ID)); err != nil {
			t.Fatal(err)
		}
		return ev
	}
}

// TestAnApprovalRacingALoginIsDecidedAsReplayDoes: users of one partition, not yet
// approved (appended as attrd itself would, as an import will), are approved by a
// super-user of another partition while they log in. Each login is ok or E005001
// depending on the order in the log, and replay decides every event alike.
func TestAnApprovalRacingALoginIsDecidedAsReplayDoes(t *testing.T) {
	f := newFixture(t, partitioned(4, nil))
	ctx := ctxT(t)
	lay := events.Layout{Partitions: 4}
	superID, superPart, super := userIn(t, f, "approver", true)
	_ = superID
	js, _ := jetstream.New(f.srv.apiConn)
	var uids []string
	for i := 0; len(uids) < 10; i++ {
		uid := events.NewID()
		if lay.Partition(uid) == superPart {
			continue
		}
		ev := &events.Event{ID: events.NewID(), Version: events.SchemaVersion, Type: events.UserCreated, Time: time.Now().UnixNano(),
			UserID: uid, App: "CRM", User: &events.UserData{Username: fmt.Sprintf("pending-%d", i), PasswordHash: mustHash(t, "pw")}}
		ev.Version = events.SchemaVersion
		data, err := events.Encode(ev)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(ctx, lay.Subject(ev), data, jetstream.WithMsgID(ev.ID)); err != nil {
			t.Fatal(err)
		}
		uids = append(uids, uid)
	}
	// Wait until they exist (unapproved, they cannot log in yet).
	kv := mustKV(t, f.srv)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, err := kv.Get(ctx, events.UserKey(uids[len(uids)-1])); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the pending users were not folded")
		}
	}
	outcomes := map[events.Code]int{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, uid := range uids {
		wg.Add(2)
		go func() {
			defer wg.Done()
			if err := super.ApproveUser(context.Background(), uid); err != nil {
				t.Errorf("approve: %v", err)
			}
		}()
		go func() {
			defer wg.Done()
			_, err := f.c.Login(context.Background(), fmt.Sprintf("pending-%d", i), "pw")
			mu.Lock()
			outcomes[events.CodeOf(err)]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	t.Logf("logins racing their approval: %v", outcomes)
	if outcomes[""]+outcomes[events.CodeNotAllowed] != len(uids) {
		t.Fatalf("logins: %v", outcomes)
	}
	verifyReplay(t, f)
}

// mustHash hashes a password as attrd does, with the tests' cost.
func mustHash(t *testing.T, pw string) string {
	t.Helper()
	h, err := api.HashPassword(pw, fastPasswords)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// holders reads who holds each partition's lease ("" for nobody).
func holders(t *testing.T, s *Server, n int) []string {
	t.Helper()
	js, _ := jetstream.New(s.apiConn)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	kvs, err := js.Stream(ctx, events.KVStream(events.DefaultBucket))
	if err != nil {
		t.Fatal(err)
	}
	out := make([]string, n)
	for p := range n {
		if r, held, err := projector.Holder(ctx, kvs, events.DefaultBucket, events.PartitionName(p)); err == nil && held {
			out[p] = r.Owner
		}
	}
	return out
}

// waitHolders waits until want says yes of the holders, and returns how long it took.
func waitHolders(t *testing.T, s *Server, n int, within time.Duration, what string, want func([]string) bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		h := holders(t, s, n)
		if want(h) {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("%s: not within %s; holders %v", what, within, h)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// count returns how many partitions each instance holds.
func count(h []string) map[string]int {
	out := map[string]int{}
	for _, o := range h {
		out[o]++
	}
	return out
}

// writeToEachPartition sets an attribute of a user in every partition until each is
// ok, and returns how long the slowest took.
func writeToEachPartition(t *testing.T, users []*client.User, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	var wg sync.WaitGroup
	for _, u := range users {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < within {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				err := u.Attr.Set(ctx, "probe", time.Now().UnixNano())
				cancel()
				if err == nil {
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
			t.Errorf("no write to user %s within %s", u.ID, within)
		}()
	}
	wg.Wait()
	return time.Since(start)
}

// TestPartitionsSpreadOverInstancesAndMoveWhenOneGoes: four partitions on a three-node
// cluster (R3), under load from eight writers, each a user of its own. A second
// instance takes half of them from the first by handover; a killed instance's
// partitions move to the other within the lease's bound, a cleanly stopped one's
// within a second; every partition takes writes after each move; no acknowledged
// write is lost or reads back older, no retried create is applied twice, and a replay
// reproduces the projection.
func TestPartitionsSpreadOverInstancesAndMoveWhenOneGoes(t *testing.T) {
	if testing.Short() {
		t.Skip("a cluster of three NATS nodes and three attrd instances")
	}
	const n = 4
	cl := startNATSCluster(t)
	four := func(c *Config) { c.Partitions = n }
	a := cl.instance(t, four)
	waitHolders(t, a, n, 10*time.Second, "the first instance holds every partition", func(h []string) bool { return count(h)[a.instance] == n })
	f := &fixture{srv: a, c: mustClient(t, a)}
	f.admin = mustLogin(t, f.c, "admin", adminPassword)
	lay := events.Layout{Partitions: n}
	users := make([]*client.User, n)
	for i := 0; slices.Contains(users, nil); i++ {
		id, err := f.admin.CreateUser(ctxT(t), fmt.Sprintf("u%d", i), "pw", false)
		if err != nil {
			t.Fatal(err)
		}
		if p := lay.Partition(id); users[p] == nil {
			users[p] = f.admin.UserByID(id)
		}
	}

	ld := startLoad(t, cl.urls(), loadUsers(t, a, f.admin, 8), 8)
	defer ld.finish()
	b := cl.instance(t, four)
	took := waitHolders(t, a, n, 10*time.Second, "a second instance takes its share", func(h []string) bool {
		c := count(h)
		return c[a.instance] == n/2 && c[b.instance] == n/2
	})
	t.Logf("a second instance held its share %s after its start", took)
	writeToEachPartition(t, users, 10*time.Second)

	killed := time.Now()
	kill(b)
	waitHolders(t, a, n, 10*time.Second, "a killed instance's partitions move", func(h []string) bool { return count(h)[a.instance] == n })
	writeToEachPartition(t, users, 10*time.Second)
	resumed := time.Since(killed)
	t.Logf("after kill -9: every partition took writes again %s after the kill", resumed)
	if resumed > 5*time.Second {
		t.Fatalf("partitions resumed %s after a kill -9 (bound 5 s)", resumed)
	}

	c := cl.instance(t, four)
	waitHolders(t, a, n, 10*time.Second, "a third instance takes its share", func(h []string) bool {
		cnt := count(h)
		return cnt[a.instance] == n/2 && cnt[c.instance] == n/2
	})
	stopped := time.Now()
	if err := a.Close(); err != nil {
		t.Logf("close: %v", err)
	}
	waitHolders(t, c, n, 10*time.Second, "a stopped instance's partitions move", func(h []string) bool { return count(h)[c.instance] == n })
	handover := time.Since(stopped)
	f.c = mustClient(t, c)
	admin := mustLogin(t, f.c, "admin", adminPassword)
	for i, u := range users {
		users[i] = admin.UserByID(u.ID)
	}
	writeToEachPartition(t, users, 10*time.Second)
	t.Logf("after a clean stop: every partition held by the other instance %s after the stop began", handover)
	if handover > time.Second {
		t.Fatalf("handover after a clean stop took %s (bound 1 s)", handover)
	}
	ld.finish()
	verifyLoad(t, ld, c)
}
