package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/vmihailenco/msgpack/v5"
)

// nextChange waits for a watch's next message (or fails the test after 5 s).
func nextChange(t *testing.T, w *client.Watcher) client.Change {
	t.Helper()
	select {
	case c, ok := <-w.C:
		if !ok {
			t.Fatalf("the watch ended: %v", w.Err())
		}
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("no change within 5 s")
	}
	return client.Change{}
}

// describe is a change as "op name=value name=value", deleted ones as "name=-".
func describe(c client.Change) string {
	s := c.Op
	for _, a := range c.Attrs {
		v := "-"
		if a.Found {
			v = string(a.Value)
		}
		s += " " + a.Name + "=" + v
	}
	return s
}

// expectChanges reads len(want) changes and compares them, in order.
func expectChanges(t *testing.T, w *client.Watcher, want ...string) []client.Change {
	t.Helper()
	var got []client.Change
	for i, d := range want {
		c := nextChange(t, w)
		got = append(got, c)
		if describe(c) != d {
			t.Fatalf("change %d: %q, want %q", i, describe(c), d)
		}
		if i > 0 && c.Seq <= got[i-1].Seq {
			t.Fatalf("change %d: sequence %d after %d", i, c.Seq, got[i-1].Seq)
		}
	}
	return got
}

// expectQuiet fails if the watch delivers anything within d.
func expectQuiet(t *testing.T, w *client.Watcher, d time.Duration) {
	t.Helper()
	select {
	case c, ok := <-w.C:
		if ok {
			t.Fatalf("unexpected change %q (seq %d)", describe(c), c.Seq)
		}
		t.Fatalf("the watch ended: %v", w.Err())
	case <-time.After(d):
	}
}

// aliceWatches opens a watch of alice's own attributes.
func aliceWatches(t *testing.T, f *fixture, names []string, opts ...client.Option) (*client.User, *client.Watcher) {
	t.Helper()
	u, err := f.alice.User(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	w, err := u.Attr.Watch(ctxT(t), names, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Stop)
	return u, w
}

func TestAWatchOverNATSSeesExactlyTheAcceptedChangesInLogOrder(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, w := aliceWatches(t, f, nil)
	a := u.Attr
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(a.Create(ctx, "theme", "dark"))
	expectCode(t, a.Update(ctx, "missing", 1), events.CodeNoAttr)         // rejected: no change
	expectCode(t, a.Create(ctx, "theme", "light"), events.CodeAttrExists) // rejected: no change
	must(a.Update(ctx, "theme", "light"))
	must(a.Set(ctx, "lang", "fr"))
	must(a.CreateMany(ctx, []client.Item{{Name: "a.b", Value: 1}, {Name: "ünï", Value: []int{2}}}))
	must(a.Delete(ctx, "never-was")) // accepted, but changes nothing: no change
	must(a.Delete(ctx, "lang"))
	// Another user's changes are not this watch's.
	adminUser, _ := f.admin.User(ctx)
	must(adminUser.Attr.Set(ctx, "theme", "admin's"))
	must(a.Set(ctx, "last", true))
	got := expectChanges(t, w, `create theme="dark"`, `update theme="light"`, `set lang="fr"`,
		`create a.b=1 ünï=[2]`, `delete lang=-`, `set last=true`)
	if got[1].Attrs[0].CreationTime != got[0].Attrs[0].CreationTime || !got[1].Attrs[0].LastModified.After(got[0].Attrs[0].LastModified) {
		t.Errorf("an update keeps the creation time and moves the modification time: %+v then %+v", got[0].Attrs[0], got[1].Attrs[0])
	}
	if got[0].CID == "" || got[0].Time.IsZero() {
		t.Errorf("a change has the cid of its request and its time: %+v", got[0])
	}
	expectQuiet(t, w, 300*time.Millisecond)
	if w.Position() != got[len(got)-1].Seq {
		t.Errorf("position %d after the last change %d", w.Position(), got[len(got)-1].Seq)
	}
}

func TestAWatchOfSomeNamesSeesOnlyThoseAndValuesAsGetShowsThem(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, w := aliceWatches(t, f, []string{"secret", "plain"})
	sealedW, err := u.Attr.Watch(ctx, []string{"secret"}, client.Decrypt(false))
	if err != nil {
		t.Fatal(err)
	}
	defer sealedW.Stop()
	if err := u.Attr.Set(ctx, "other", 1); err != nil {
		t.Fatal(err)
	}
	if err := u.Attr.Set(ctx, "secret", "s3cret", client.Encrypt(true)); err != nil {
		t.Fatal(err)
	}
	if err := u.Attr.Set(ctx, "plain", 2, client.Expiration(time.Hour)); err != nil {
		t.Fatal(err)
	}
	got := expectChanges(t, w, `set secret="s3cret"`, `set plain=2`)
	if !got[0].Attrs[0].IsEncrypted || got[1].Attrs[0].ExpirationTime.Before(time.Now().Add(59*time.Minute)) {
		t.Errorf("encrypted flag and expiry as get shows them: %+v", got)
	}
	c := nextChange(t, sealedW)
	var ct string
	if json.Unmarshal(c.Attrs[0].Value, &ct) != nil || ct == "s3cret" || !c.Attrs[0].IsEncrypted {
		t.Errorf("decrypt false shows the ciphertext: %s", c.Attrs[0].Value)
	}
}

func TestAWatchResumesAfterItsPositionWithoutALossOrARepeat(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, w := aliceWatches(t, f, nil)
	for i := range 3 {
		if err := u.Attr.Set(ctx, "n", i); err != nil {
			t.Fatal(err)
		}
	}
	expectChanges(t, w, "set n=0", "set n=1", "set n=2")
	pos := w.Position()
	w.Stop()
	// Meanwhile, unseen: two changes, one rejected update, one no-op deletion.
	_ = u.Attr.Set(ctx, "n", 3)
	expectCode(t, u.Attr.Update(ctx, "gone", 0), events.CodeNoAttr)
	_ = u.Attr.Delete(ctx, "gone")
	_ = u.Attr.Create(ctx, "m", "x")
	w2, err := u.Attr.Watch(ctx, nil, client.After(pos))
	if err != nil {
		t.Fatal(err)
	}
	defer w2.Stop()
	expectChanges(t, w2, "set n=3", `create m="x"`)
	_ = u.Attr.Set(ctx, "n", 4)
	expectChanges(t, w2, "set n=4")
	expectQuiet(t, w2, 300*time.Millisecond)
	// From the very start of the log: the whole history of the attributes.
	w3, err := u.Attr.Watch(ctx, []string{"m"}, client.After(0))
	if err != nil {
		t.Fatal(err)
	}
	defer w3.Stop()
	expectChanges(t, w3, `create m="x"`)
}

func TestAWatchMissesNothingWhenFeedAnnouncementsAreLost(t *testing.T) {
	var drop atomic.Bool
	var dropped atomic.Int64
	hooks := projector.Hooks{Announce: func(first, last uint64) error {
		if drop.Load() {
			dropped.Add(1)
			return errors.New("lost")
		}
		return nil
	}}
	f := newFixture(t, func(c *Config) { c.ProjectorHooks = hooks })
	ctx := ctxT(t)
	u, w := aliceWatches(t, f, nil)
	_ = u.Attr.Set(ctx, "k", 0)
	expectChanges(t, w, "set k=0")
	drop.Store(true)
	_ = u.Attr.Set(ctx, "k", 1)
	_ = u.Attr.Set(ctx, "j", 1)
	_ = u.Attr.Delete(ctx, "k")
	drop.Store(false)
	// The next announcement shows the gap; the watch reads the log for it.
	_ = u.Attr.Set(ctx, "k", 2)
	expectChanges(t, w, "set k=1", "set j=1", "delete k=-", "set k=2")
	expectQuiet(t, w, 300*time.Millisecond)
	if dropped.Load() == 0 {
		t.Fatal("no announcement was dropped: the test proves nothing")
	}
}

func TestAWatchEndsWhenItsSessionEndsOrItsUserIsDeleted(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	_, own := aliceWatches(t, f, nil)
	byAdmin, err := f.admin.UserByID(f.aliceID).Attr.Watch(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	second := mustLogin(t, f.c, "alice", "alice-pw")
	sessW, err := second.SessionAttr(second.UST).Watch(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = second.SessionAttr(second.UST).Set(ctx, "cart", 1)
	expectChanges(t, sessW, "set cart=1")
	if err := f.alice.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	waitEnded(t, own, "session_ended")
	if err := f.admin.DeleteUser(ctx, f.aliceID); err != nil {
		t.Fatal(err)
	}
	waitEnded(t, byAdmin, "user_deleted")
	waitEnded(t, sessW, "") // its session ended with the user: either reason
}

// waitEnded waits until w's channel closes with a WatchEnded of reason ("" any).
func waitEnded(t *testing.T, w *client.Watcher, reason string) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-w.C:
			if ok {
				continue
			}
			var e *client.WatchEnded
			if !errors.As(w.Err(), &e) || reason != "" && e.Reason != reason {
				t.Fatalf("the watch ended with %v, want %s", w.Err(), reason)
			}
			return
		case <-timeout:
			t.Fatalf("the watch did not end (want %s)", reason)
		}
	}
}

func TestAWatchIsAllowedAsAGetIs(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	if _, err := f.alice.UserByID(f.adminID).Attr.Watch(ctx, nil); events.CodeOf(err) != events.CodeNotAllowed {
		t.Errorf("a user watching another's attributes: %v, want E005001", err)
	}
	if _, err := f.alice.SessionAttr(f.admin.UST).Watch(ctx, nil); events.CodeOf(err) != events.CodeNotAllowed {
		t.Errorf("a user watching another's session: %v, want E005001", err)
	}
	if _, err := f.c.Resume("not-a-ust").SessionAttr("x").Watch(ctx, nil); events.CodeOf(err) != events.CodeNoSession {
		t.Errorf("an unknown UST: %v, want E007001", err)
	}
	w, err := f.admin.UserByID(f.aliceID).Attr.Watch(ctx, nil)
	if err != nil {
		t.Fatalf("a super-user watching a user: %v", err)
	}
	w.Stop()
	if _, err := f.alice.SessionAttr(f.alice.UST).Watch(ctx, []string{"bad\x01name"}); events.CodeOf(err) != events.CodeInvalidInput {
		t.Errorf("a bad name: %v, want E008002", err)
	}
	if _, err := f.alice.SessionAttr(f.alice.UST).Watch(ctx, nil, client.After(1<<40)); events.CodeOf(err) != events.CodeInvalidInput {
		t.Errorf("a position beyond the log: %v, want E008002", err)
	}
}

func TestWatchesPerUserAndPerInstanceAreBounded(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.Watch = api.WatchConfig{PerUser: 3, PerInstance: 5} })
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	var open []*client.Watcher
	for i := range 4 {
		w, err := u.Attr.Watch(ctx, nil)
		if i < 3 && err != nil || i == 3 && events.CodeOf(err) != events.CodeInvalidInput {
			t.Fatalf("watch %d of alice: %v", i+1, err)
		}
		if w != nil {
			open = append(open, w)
		}
	}
	admin := f.admin.UserByID(f.aliceID)
	for i := range 3 {
		w, err := admin.Attr.Watch(ctx, nil)
		if i < 2 && err != nil || i == 2 && events.CodeOf(err) != events.CodeInvalidInput {
			t.Fatalf("watch %d of the instance: %v", 4+i, err)
		}
		if w != nil {
			open = append(open, w)
		}
	}
	open[0].Stop()
	waitFor(t, func() bool { return f.srv.svc.Watches() == 4 }, "a stopped watch to free its place")
	w, err := u.Attr.Watch(ctx, nil)
	if err != nil {
		t.Fatalf("after a stop: %v", err)
	}
	w.Stop()
	for _, w := range open {
		w.Stop()
	}
}

func TestAnAttributeExpiringByItsTimeIsSentAsExpired(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, w := aliceWatches(t, f, nil)
	if err := u.Attr.Set(ctx, "otp", "123", client.Expiration(time.Second)); err != nil {
		t.Fatal(err)
	}
	set := expectChanges(t, w, `set otp="123"`)
	c := nextChange(t, w)
	if c.Op != "expired" || c.Attrs[0].Name != "otp" || c.Time.Sub(set[0].Attrs[0].ExpirationTime).Abs() > time.Millisecond {
		t.Errorf("expected otp expired at %v: %+v", set[0].Attrs[0].ExpirationTime, c)
	}
}

// waitFor polls cond every 10 ms for up to 5 s.
func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestAWatchInAPartitionedDeploymentFollowsItsUsersPartition(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.Partitions = 4 })
	ctx := ctxT(t)
	u, w := aliceWatches(t, f, nil)
	byAdmin, err := f.admin.UserByID(f.aliceID).Attr.Watch(ctx, []string{"b"})
	if err != nil {
		t.Fatal(err)
	}
	defer byAdmin.Stop()
	adminUser, _ := f.admin.User(ctx)
	for i := range 3 {
		_ = adminUser.Attr.Set(ctx, "noise", i) // another partition, perhaps: never seen
		_ = u.Attr.Set(ctx, "a", i)
		_ = u.Attr.Set(ctx, "b", i)
	}
	expectChanges(t, w, "set a=0", "set b=0", "set a=1", "set b=1", "set a=2", "set b=2")
	expectChanges(t, byAdmin, "set b=0", "set b=1", "set b=2")

	// A super-user watching a user of another partition: the logout, in the
	// super-user's partition, ends the watch.
	lay := events.Layout{Partitions: 4}
	var other string
	for i := 0; other == ""; i++ {
		id, err := f.admin.CreateUser(ctx, fmt.Sprintf("p%d", i), "pw", false)
		if err != nil {
			t.Fatal(err)
		}
		if lay.Partition(id) != lay.Partition(f.adminID) {
			other = id
		}
	}
	second := mustLogin(t, f.c, "admin", adminPassword)
	across, err := second.UserByID(other).Attr.Watch(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := second.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	waitEnded(t, across, "session_ended")
}

func TestAWatchNotRenewedEndsAndARenewedOneLasts(t *testing.T) {
	f := newFixture(t, func(c *Config) {
		c.Watch = api.WatchConfig{Heartbeat: 100 * time.Millisecond, RenewInterval: 200 * time.Millisecond}
	})
	ctx := ctxT(t)
	_, renewed := aliceWatches(t, f, nil) // the client renews every 200 ms
	// A raw NATS watcher that never renews.
	nc := f.c.NATS()
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(map[string]any{"current_app": "CRM", "ust": f.alice.UST})
	if err := nc.PublishRequest("attrd.user.attr.watch", inbox, body); err != nil {
		t.Fatal(err)
	}
	var reasons []string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && len(reasons) == 0; {
		m, err := sub.NextMsg(time.Second)
		if err != nil {
			continue
		}
		var msg api.WatchMessage
		_ = json.Unmarshal(m.Data, &msg)
		if msg.Type == "end" {
			reasons = append(reasons, msg.Reason)
		}
	}
	if len(reasons) != 1 || reasons[0] != api.EndRenewalMissed {
		t.Fatalf("a watch never renewed: ends %v, want %s", reasons, api.EndRenewalMissed)
	}
	u, _ := f.alice.User(ctx)
	_ = u.Attr.Set(ctx, "still", "here")
	expectChanges(t, renewed, `set still="here"`)
}

func TestTheGoClientsWatchResumesByItselfAcrossARestartOfTheInstance(t *testing.T) {
	dir := t.TempDir()
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	mod := func(c *Config) {
		c.DataDir, c.NATSAddr = dir, addr
		c.Watch = api.WatchConfig{Heartbeat: 200 * time.Millisecond}
	}
	s1 := mustStart(t, mod)
	nc, err := nats.Connect(s1.ClientURL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c := client.New(nc, "CRM")
	admin := mustLogin(t, c, "admin", adminPassword)
	ctx := ctxT(t)
	u, _ := admin.User(ctx)
	w, err := u.Attr.Watch(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	_ = u.Attr.Set(ctx, "before", 1)
	expectChanges(t, w, "set before=1")
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := mustStart(t, mod)
	// Another client writes as soon as the new instance answers.
	nc2, err := nats.Connect(s2.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc2.Close()
	u2 := client.New(nc2, "CRM").Resume(admin.UST).UserByID(u.ID)
	if err := u2.Attr.Set(ctx, "after", 2); err != nil {
		t.Fatal(err)
	}
	// The client finds its watch gone (three silent heartbeats, or a renewal nobody
	// answers) and opens it again, backing off while the instance is down.
	select {
	case c := <-w.C:
		if describe(c) != "set after=2" {
			t.Fatalf("after the restart: %q", describe(c))
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("the watch did not resume within 20 s of the restart (%v)", w.Err())
	}
	expectQuiet(t, w, 500*time.Millisecond)
}

func TestAWatchEndsWhenItsSessionExpires(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.SessionTTL = 2 * time.Second })
	_, w := aliceWatches(t, f, nil)
	start := time.Now()
	waitEnded(t, w, "session_ended")
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("the watch ended %s after it opened, its session lasted 2 s", took)
	}
}

func TestAResumeOlderThanTheLogIsRefusedAsImpossible(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, w := aliceWatches(t, f, nil)
	_ = u.Attr.Set(ctx, "a", 1)
	first := expectChanges(t, w, "set a=1")[0].Seq
	_ = u.Attr.Set(ctx, "a", 2)
	expectChanges(t, w, "set a=2")
	// Retention removes the start of the log, the first change included.
	nc, err := f.srv.InternalConn("test-purge")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	st, err := js.Stream(ctx, events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Purge(ctx, jetstream.WithPurgeSequence(first+1)); err != nil {
		t.Fatal(err)
	}
	old, err := u.Attr.Watch(ctx, nil, client.After(first-1))
	if err != nil {
		t.Fatal(err)
	}
	defer old.Stop()
	for range old.C {
	}
	if !errors.Is(old.Err(), client.ErrResumeImpossible) {
		t.Fatalf("a resume from before the log: %v, want resume impossible", old.Err())
	}
	// From a position the log still covers, it resumes.
	recent, err := u.Attr.Watch(ctx, nil, client.After(first))
	if err != nil {
		t.Fatal(err)
	}
	defer recent.Stop()
	expectChanges(t, recent, "set a=2")
}

func TestAWatchSeesEveryChangeOnceThroughAProjectorsFailOver(t *testing.T) {
	if testing.Short() {
		t.Skip("a cluster of three NATS nodes and two attrd instances")
	}
	cl := startNATSCluster(t)
	// A watch served by the killed instance is resumed by the client when its
	// heartbeats stop or a renewal finds nobody: quick here.
	quick := func(c *Config) {
		c.Watch = api.WatchConfig{Heartbeat: 300 * time.Millisecond, RenewInterval: time.Second}
	}
	a := cl.instance(t, quick)
	b := cl.instance(t, quick)
	if h := holder(t, a); h != a.instance {
		t.Fatalf("the first instance should fold: lease holder %q", h)
	}
	c := mustClient(t, b)
	admin := mustLogin(t, c, "admin", adminPassword)
	ctx := ctxT(t)
	u, err := admin.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w, err := u.Attr.Watch(ctx, []string{"n"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	// One writer, one value after another: acknowledged, or of unknown outcome.
	acked := map[string]bool{}
	last := ""
	var mu sync.Mutex
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			wctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			err := u.Attr.Set(wctx, "n", i)
			cancel()
			if err == nil {
				mu.Lock()
				acked[fmt.Sprint(i)], last = true, fmt.Sprint(i)
				mu.Unlock()
			}
		}
	}()
	time.Sleep(500 * time.Millisecond)
	kill(a) // the projector's instance: b takes over and folds on
	time.Sleep(4 * time.Second)
	close(stop)
	<-done
	mu.Lock()
	defer mu.Unlock()
	seen := map[string]bool{}
	var prev uint64
	for !seen[last] {
		ch := nextChange(t, w)
		v := string(ch.Attrs[0].Value)
		if seen[v] || ch.Seq <= prev {
			t.Fatalf("change %s (seq %d after %d) came twice or out of order", v, ch.Seq, prev)
		}
		seen[v], prev = true, ch.Seq
	}
	for v := range acked {
		if !seen[v] {
			t.Errorf("the acknowledged write n=%s never reached the watch", v)
		}
	}
	t.Logf("%d writes acknowledged, %d changes seen, one after another, across the fail-over", len(acked), len(seen))
}

func TestAWatchAskedInMsgpackAnswersInMsgpack(t *testing.T) {
	f := newFixture(t, nil)
	nc := f.c.NATS()
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := msgpack.Marshal(map[string]any{"current_app": "CRM", "ust": f.alice.UST})
	m := nats.NewMsg("attrd.user.attr.watch")
	m.Reply, m.Data = inbox, body
	m.Header.Set("Content-Type", "application/msgpack")
	if err := nc.PublishMsg(m); err != nil {
		t.Fatal(err)
	}
	next := func() map[string]any {
		t.Helper()
		r, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var out map[string]any
		if r.Header.Get("Content-Type") != "application/msgpack" || msgpack.Unmarshal(r.Data, &out) != nil {
			t.Fatalf("not msgpack: %q %q", r.Header.Get("Content-Type"), r.Data)
		}
		return out
	}
	if ready := next(); ready["type"] != "ready" || ready["status"] != "ok" {
		t.Fatalf("ready: %v", ready)
	}
	u, _ := f.alice.User(ctxT(t))
	if err := u.Attr.Set(ctxT(t), "n", 7); err != nil {
		t.Fatal(err)
	}
	c := next()
	attrs, _ := c["attrs"].([]any)
	if c["type"] != "change" || len(attrs) != 1 || attrs[0].(map[string]any)["name"] != "n" {
		t.Fatalf("change: %v", c)
	}
}
