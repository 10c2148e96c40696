package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
	"github.com/attrd/attrd/projector"
)

// natsCluster is three NATS nodes with the two-account layout, in this process, on
// loopback ports that stay the same across a node's restarts.
type natsCluster struct {
	t      *testing.T
	accts  *embedded.Accounts
	dirs   []string
	client []int
	route  []int
	nodes  []*server.Server
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func startNATSCluster(t *testing.T) *natsCluster {
	c := &natsCluster{t: t, accts: &embedded.Accounts{InternalPassword: embedded.NewSecret(), OperatorPassword: embedded.NewSecret()}}
	for i := 0; i < 3; i++ {
		c.dirs = append(c.dirs, t.TempDir())
		c.client = append(c.client, freePort(t))
		c.route = append(c.route, freePort(t))
	}
	c.nodes = make([]*server.Server, 3)
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range c.nodes {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = c.startNode(i) }()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(c.stopAll)
	return c
}

// stopAll stops every node.
func (c *natsCluster) stopAll() {
	for i := range c.nodes {
		c.stopNode(i)
	}
}

func (c *natsCluster) startNode(i int) error {
	var routes []string
	for _, p := range c.route {
		routes = append(routes, "nats-route://127.0.0.1:"+strconv.Itoa(p))
	}
	ns, err := embedded.Start(embedded.Options{Name: fmt.Sprintf("n%d", i+1), DataDir: c.dirs[i],
		Addr: "127.0.0.1:" + strconv.Itoa(c.client[i]), Accounts: c.accts,
		Cluster: &embedded.Cluster{Name: "attrd-test", Addr: "127.0.0.1:" + strconv.Itoa(c.route[i]), Routes: routes}})
	if err != nil {
		return err
	}
	c.nodes[i] = ns
	return nil
}

func (c *natsCluster) stopNode(i int) {
	if ns := c.nodes[i]; ns != nil {
		ns.Shutdown()
		ns.WaitForShutdown()
		c.nodes[i] = nil
	}
}

func (c *natsCluster) urls() string {
	var us []string
	for _, p := range c.client {
		us = append(us, "nats://127.0.0.1:"+strconv.Itoa(p))
	}
	return strings.Join(us, ",")
}

// instances counts the instances started, to tell their logs apart.
var instances atomic.Int64

// instance starts an attrd on the cluster, as one of several; mods configure it
// further.
func (c *natsCluster) instance(t *testing.T, mods ...func(*Config)) *Server {
	return mustStart(t, func(cfg *Config) {
		defer func() {
			for _, m := range mods {
				m(cfg)
			}
		}()
		cfg.NATSURL, cfg.Replicas = c.urls(), 3
		cfg.NATSOptions = []nats.Option{nats.UserInfo(embedded.OperatorUser, c.accts.OperatorPassword), nats.ReconnectWait(100 * time.Millisecond)}
		cfg.NATSConnectTimeout = time.Minute
		cfg.Limits.MaxAttrsPerUser = -1 // the load creates names without end
		cfg.AdminUsername, cfg.AdminPassword = "admin", adminPassword
		// ATTRD_TEST_LOG=info (or debug) shows the instances' logs.
		var level slog.Level
		if level.UnmarshalText([]byte(os.Getenv("ATTRD_TEST_LOG"))) == nil {
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("inst", instances.Add(1))
		}
	})
}

// kill stops an instance as kill -9 would: its connections drop first, so nothing is
// released or drained, and its lease expires on its own.
func kill(s *Server) {
	s.connsMu.Lock()
	for _, nc := range s.conns {
		nc.Close()
	}
	s.connsMu.Unlock()
	go s.Close() // releases what is left in the process, without holding the test up
}

// holder says which of the instances holds the projector's lease ("" for none).
func holder(t *testing.T, s *Server) string {
	js, _ := jetstream.New(s.apiConn)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	kvs, err := js.Stream(ctx, events.KVStream(events.DefaultBucket))
	if err != nil {
		return ""
	}
	r, held, err := projector.Holder(ctx, kvs, events.DefaultBucket, "0")
	if err != nil || !held {
		return ""
	}
	return r.Owner
}

// load drives writers through the cluster: each sets its own key to 1, 2, 3, … with
// a request id, retrying the same request on E008004 until it gets an answer, reads
// back after every ok (the value must not be older than acknowledged), and creates a
// fresh name every few steps (a retried create must answer its first outcome).
type load struct {
	once     sync.Once
	t        *testing.T
	users    []loadUser // writer w writes as users[w % len(users)]
	url      string
	stop     chan struct{}
	wg       sync.WaitGroup
	acked    []atomic.Int64
	stale    atomic.Int64
	twice    atomic.Int64
	internal atomic.Int64
	lastOK   atomic.Int64 // unix ns of the last ok anywhere
	maxGap   atomic.Int64
	mu       sync.Mutex
	errs     []string
	// inspect, if set, describes the state behind a stale read of a user's key
	// (evidence).
	inspect func(uid, key string, want int64) string
	// last holds each writer's last answer or error, and stalled, if set, describes the
	// instances when no write succeeds in time (evidence).
	last    []atomic.Value
	stalled func() string
	// ops holds every operation, for the linearizability check.
	ops opLog
}

// loadUser is a user the load writes as: its session and its id.
type loadUser struct{ ust, uid string }

// loadUsers creates n regular users through s, logs each in, and returns them: their
// ids fall in whatever partitions they hash to.
func loadUsers(t *testing.T, s *Server, admin *client.Session, n int) []loadUser {
	t.Helper()
	c := mustClient(t, s)
	out := make([]loadUser, n)
	for i := range out {
		name := fmt.Sprintf("load-%d", i)
		uid, err := admin.CreateUser(ctxT(t), name, "pw", false)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = loadUser{ust: mustLogin(t, c, name, "pw").UST, uid: uid}
	}
	return out
}

// startLoad starts writers writers as the users, in turn.
func startLoad(t *testing.T, url string, users []loadUser, writers int) *load {
	l := &load{t: t, users: users, url: url, stop: make(chan struct{}), acked: make([]atomic.Int64, writers), last: make([]atomic.Value, writers)}
	l.lastOK.Store(time.Now().UnixNano())
	for w := 0; w < writers; w++ {
		l.wg.Add(1)
		go l.writer(w)
	}
	return l
}

func (l *load) note(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) < 20 {
		l.errs = append(l.errs, fmt.Sprintf(format, args...))
	}
}

func (l *load) ok() {
	now := time.Now().UnixNano()
	prev := l.lastOK.Swap(now)
	if gap := now - prev; gap > l.maxGap.Load() {
		l.maxGap.Store(gap)
	}
}

// call sends op until it is answered with anything but E008004 or a transport error.
func (l *load) call(nc *nats.Conn, op string, body map[string]any) map[string]any {
	out, _, _ := l.callCounting(nc, -1, op, body)
	return out
}

// callCounting is call, and says how many times the request was sent and when the last
// time was (for a read, the attempt that was answered).
func (l *load) callCounting(nc *nats.Conn, w int, op string, body map[string]any) (map[string]any, int, time.Time) {
	seen := func(what string) {
		if w >= 0 {
			l.last[w].Store(time.Now().Format("15:04:05.000") + " " + what)
		}
	}
	b, _ := json.Marshal(body)
	for tries := 1; ; tries++ {
		select {
		case <-l.stop:
			return nil, tries, time.Time{}
		default:
		}
		sent := time.Now()
		// A request handled by an instance that is then killed is never answered: the
		// writer learns it only from its own timeout, and a client's NATS server routes
		// its requests to the instance connected to it first, so every writer may be
		// waiting on the killed one. 3 s (the same request id again after it) keeps that
		// wait from passing for attrd's takeover time.
		rep, err := nc.Request("attrd."+op, b, 3*time.Second)
		if err != nil {
			seen(fmt.Sprintf("try %d: %v (connected to %s)", tries, err, nc.ConnectedUrl()))
			time.Sleep(50 * time.Millisecond)
			continue
		}
		seen(fmt.Sprintf("try %d: %.200s", tries, rep.Data))
		var out map[string]any
		json.Unmarshal(rep.Data, &out)
		if rep.Header.Get("Nats-Service-Error-Code") == "500" {
			l.internal.Add(1)
			l.note("%s: 500 %s", op, rep.Data)
		}
		if subStatus(out) == string(events.CodeOutcomeUnknown) || rep.Header.Get("Nats-Service-Error-Code") == "500" {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		return out, tries, sent
	}
}

// record notes an operation of writer w for the linearizability check: a write from
// its first sending (a retry with the same request id is the same write), a read from
// the attempt that was answered; out nil is a write whose outcome the run never
// learned.
func (l *load) record(w int, uid, kind, name string, value int64, call time.Time, out map[string]any) {
	in := attrOp{Kind: kind, Key: uid + "/" + name, Value: value, Call: call.UnixNano(), Ret: time.Now().UnixNano()}
	var res attrOut
	switch {
	case out == nil:
		res.Unknown = true
	case out["status"] == "ok":
		res.OK = true
		if v, ok := out["value"].(float64); ok && out["found"] == true {
			res.Found, res.Value = true, int64(v)
		}
	default:
		res.Code = subStatus(out)
	}
	l.ops.add(w, in, res)
}

func (l *load) writer(w int) {
	defer l.wg.Done()
	nc, err := nats.Connect(l.url, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		l.note("writer %d: %v", w, err)
		return
	}
	defer nc.Close()
	key := fmt.Sprintf("w%d", w)
	ust, uid := l.users[w%len(l.users)].ust, l.users[w%len(l.users)].uid
	for i := int64(1); ; i++ {
		first := time.Now()
		out, tries, _ := l.callCounting(nc, w, "user.attr.set", map[string]any{"ust": ust, "current_app": "CRM", "name": key, "value": i,
			"request_id": fmt.Sprintf("%s-%d", key, i)})
		l.record(w, uid, "set", key, i, first, out)
		if out == nil {
			return
		}
		if out["status"] != "ok" {
			l.note("set %s=%d: %v", key, i, out)
			continue
		}
		l.acked[w].Store(i)
		l.ok()
		got, _, sent := l.callCounting(nc, -1, "user.attr.get", map[string]any{"ust": ust, "current_app": "CRM", "name": key})
		if got == nil {
			return
		}
		l.record(w, uid, "get", key, 0, sent, got)
		if v, _ := got["value"].(float64); int64(v) < i {
			l.stale.Add(1)
			// When does it read right? (Evidence for the stale reads after a node
			// comes back: see DESIGN-NOTES.)
			when := "not within 2s"
			for _, wait := range []time.Duration{10 * time.Millisecond, 100 * time.Millisecond, 500 * time.Millisecond, 2 * time.Second} {
				time.Sleep(wait)
				again := l.call(nc, "user.attr.get", map[string]any{"ust": ust, "current_app": "CRM", "name": key})
				if v, _ := again["value"].(float64); int64(v) >= i {
					when = "after " + wait.String()
					break
				}
			}
			evidence := ""
			if l.inspect != nil {
				evidence = l.inspect(l.users[w%len(l.users)].uid, key, i)
			}
			l.note("%s: read %s=%v after ok %d (the set was sent %d times; right again %s)%s", time.Now().Format(time.RFC3339Nano), key, got["value"], i, tries, when, evidence)
		}
		if i%5 == 0 {
			name := fmt.Sprintf("c%d-%d", w, i)
			first := time.Now()
			out := l.call(nc, "user.attr.create", map[string]any{"ust": ust, "current_app": "CRM", "name": name, "value": i,
				"request_id": "create-" + name})
			l.record(w, uid, "create", name, i, first, out)
			if out != nil && out["status"] != "ok" {
				l.twice.Add(1)
				l.note("create %s: %v", name, out)
			}
		}
	}
}

func (l *load) finish() {
	l.once.Do(func() { close(l.stop) })
	l.wg.Wait()
}

// waitOK waits until the load has an ok after since, and returns how long after since
// the first one came (to the 5 ms it polls at).
func (l *load) waitOK(t *testing.T, since time.Time, within time.Duration) time.Duration {
	t.Helper()
	deadline := since.Add(within)
	for {
		if ok := l.lastOK.Load(); ok > since.UnixNano() {
			return time.Duration(ok - since.UnixNano())
		}
		if time.Now().After(deadline) {
			for w := range l.last {
				t.Logf("writer %d: %v", w, l.last[w].Load())
			}
			if l.stalled != nil {
				t.Log(l.stalled())
			}
			t.Fatalf("no write succeeded within %s", within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestInstancesFailOverOnACluster: two attrd instances on a 3-node NATS cluster (R3)
// under load. The projector's instance is killed, another takes over within the
// lease's bound; a clean stop hands over within about a second; a NATS node is lost
// and comes back; the quorum is lost (writes answer E008004, never 500, and /readyz
// goes 503) and comes back. Through all of it no acknowledged write is lost or reads
// back older, no retried create is applied twice, and a replay of the log reproduces
// the projection.
func TestInstancesFailOverOnACluster(t *testing.T) {
	if testing.Short() {
		t.Skip("a cluster of three NATS nodes and two attrd instances")
	}
	cl := startNATSCluster(t)
	a := cl.instance(t)
	b := cl.instance(t)
	if h := holder(t, a); h != a.instance {
		t.Fatalf("the first instance should fold: lease holder %q", h)
	}
	admin := mustLogin(t, mustClient(t, a), "admin", adminPassword)
	ld := startLoad(t, cl.urls(), []loadUser{{admin.UST, adminID(t, a)}}, 6)
	defer ld.finish()
	time.Sleep(time.Second)

	// kill -9 of the projector's instance: the other takes over when the lease expires.
	killed := time.Now()
	kill(a)
	took := ld.waitOK(t, killed.Add(100*time.Millisecond), 15*time.Second) + 100*time.Millisecond
	if h := holder(t, b); h != b.instance {
		t.Fatalf("after the kill: lease holder %q, want %q (killed %q)", h, b.instance, a.instance)
	}
	t.Logf("takeover after kill -9: the first write succeeded %s after the kill", took)
	// The bound is the lease's TTL, the server's expiry timer (up to a second) and
	// the standby's poll; generous here for a loaded CI machine.
	if took > 5*time.Second {
		t.Fatalf("writes resumed %s after the kill", took)
	}
	a2 := cl.instance(t)
	time.Sleep(time.Second)

	// A clean stop of the projector's instance hands over at once.
	stopped := time.Now()
	if err := b.Close(); err != nil {
		t.Logf("close: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for holder(t, a2) != a2.instance {
		if time.Now().After(deadline) {
			t.Fatal("no takeover after a clean stop")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if handover := time.Since(stopped); handover > 2*time.Second {
		t.Fatalf("handover after a clean stop took %s", handover)
	} else {
		t.Logf("handover after a clean stop: %s", handover)
	}
	ld.waitOK(t, time.Now(), 10*time.Second)

	// One NATS node lost and back: writes go on.
	cl.stopNode(2)
	ld.waitOK(t, time.Now(), 15*time.Second)
	if err := cl.startNode(2); err != nil {
		t.Fatal(err)
	}
	ld.waitOK(t, time.Now(), 15*time.Second)

	// Quorum lost: /readyz goes 503; back: 200 and writes again.
	cl.stopNode(1)
	cl.stopNode(2)
	lost := time.Now()
	waitProbe(t, a2, "/readyz", 503, 10*time.Second)
	t.Logf("unready %s after the quorum was lost", time.Since(lost))
	if err := cl.startNode(1); err != nil {
		t.Fatal(err)
	}
	if err := cl.startNode(2); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	ld.waitOK(t, back, 30*time.Second)
	waitProbe(t, a2, "/readyz", 200, 20*time.Second)
	t.Logf("ready %s after the quorum came back", time.Since(back))
	time.Sleep(time.Second)
	ld.finish()

	verifyLoad(t, ld, a2)
}

// verifyLoad checks what a finished load saw and left: no stale read, no create
// applied twice, no 500, every key at its last acknowledged value (or the one after,
// applied while its answer was lost), and a projection the log reproduces.
func verifyLoad(t *testing.T, ld *load, s *Server) {
	t.Helper()
	for _, e := range ld.errs {
		t.Log(e)
	}
	if ld.stale.Load() != 0 || ld.twice.Load() != 0 || ld.internal.Load() != 0 {
		t.Fatalf("%d stale reads, %d creates applied twice, %d answers of 500", ld.stale.Load(), ld.twice.Load(), ld.internal.Load())
	}
	ld.ops.check(t)
	for w := range ld.acked {
		uid := ld.users[w%len(ld.users)].uid
		// From the bucket's leader: a direct get may be answered by a replica behind.
		subject := events.KVSubject(events.DefaultBucket, events.AttrKey(uid, "", fmt.Sprintf("w%d", w)))
		m, err := events.LeaderLast(context.Background(), s.apiConn, events.KVStream(events.DefaultBucket), subject)
		// Every server refuses leader reads (503) while the meta group elects, as it
		// may just after the quorum came back: wait for it.
		for deadline := time.Now().Add(15 * time.Second); leaderread.RefusedUnavailable(err) && time.Now().Before(deadline); {
			time.Sleep(200 * time.Millisecond)
			m, err = events.LeaderLast(context.Background(), s.apiConn, events.KVStream(events.DefaultBucket), subject)
		}
		if err != nil {
			t.Fatalf("w%d: %v", w, err)
		}
		var rec events.AttrRecord
		events.Unmarshal(m.Data, &rec)
		v, _ := strconv.ParseInt(string(rec.Value), 10, 64)
		if acked := ld.acked[w].Load(); v < acked || v > acked+1 {
			t.Fatalf("w%d holds %d, last acknowledged %d", w, v, acked)
		}
	}
	replayEqualsLive(t, s)
	var total int64
	for w := range ld.acked {
		total += ld.acked[w].Load()
	}
	t.Logf("%d acknowledged sets; max gap between two successful writes: %s", total, time.Duration(ld.maxGap.Load()))
}

// replayEqualsLive waits until every partition is folded to its end (the load may
// have stopped while a projector was starting again), then fails the test for every
// difference between a replay of the log and the live projection.
func replayEqualsLive(t *testing.T, s *Server) bool {
	t.Helper()
	return replayEqualsLiveReporting(t, s, t.Error)
}

// replayEqualsLiveReporting is replayEqualsLive reporting each difference with report.
func replayEqualsLiveReporting(t *testing.T, s *Server, report func(args ...any)) bool {
	t.Helper()
	js, _ := jetstream.New(s.apiConn)
	ctx := context.Background()
	st, err := js.Stream(ctx, events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	lay := events.LayoutOf(st.CachedInfo().Config)
	kvs, err := js.Stream(ctx, events.KVStream(events.DefaultBucket))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for p := 0; p < lay.N(); {
		var last uint64
		m, err := st.GetLastMsgForSubject(ctx, lay.PartitionSubjects(p))
		if err == nil {
			last = m.Sequence
		}
		r, held, err := projector.Holder(ctx, kvs, events.DefaultBucket, events.PartitionName(p))
		if err == nil && held && r.Applied >= last {
			p++
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("partition %d was not folded to its end (%d of %d)", p, r.Applied, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Right after a heal the streams may still answer 503 for a moment, and the node
	// back from the cut, still taking itself for the bucket's leader, may answer the
	// comparison's reads from its old copy (the reads this instance's API refuses then,
	// DESIGN-NOTES): try again. A projection that differs from the replay stays so;
	// a difference that goes away within seconds was the comparison's own stale read.
	for try, stale := 1, 0; ; try++ {
		diffs, _, err := diffOf(ctx, js)
		if err != nil {
			if try < 10 {
				time.Sleep(time.Second)
				continue
			}
			t.Fatal(err)
		}
		if len(diffs) > 0 && stale < 3 {
			stale++
			t.Logf("%d differences read through %s; reading again in 2 s", len(diffs), s.cfg.NATSURL)
			time.Sleep(2 * time.Second)
			continue
		}
		for _, d := range diffs {
			report(d)
		}
		return len(diffs) == 0
	}
}

// diffOf replays the log into memory and compares it with the live bucket.
func diffOf(ctx context.Context, js jetstream.JetStream) ([]projector.Difference, int, error) {
	m := projector.NewMemory()
	if err := projector.NewLog(js, nil).FoldAll(ctx, m, nil); err != nil {
		return nil, 0, err
	}
	return projector.Diff(ctx, js, events.DefaultBucket, m)
}

// TestClusterSoak repeats the failures of TestInstancesFailOverOnACluster, and rolling
// restarts of the NATS nodes, for as long as ATTRD_SOAK says (for example
// ATTRD_SOAK=5m go test -run TestClusterSoak -v ./cmd/attrd/), then checks the same.
func TestClusterSoak(t *testing.T) {
	d, err := time.ParseDuration(os.Getenv("ATTRD_SOAK"))
	if err != nil || d <= 0 {
		t.Skip("set ATTRD_SOAK to a duration to soak")
	}
	// Several partitions (ATTRD_SOAK_PARTITIONS, default 4), spread over the instances.
	parts, err := strconv.Atoi(cmp.Or(os.Getenv("ATTRD_SOAK_PARTITIONS"), "4"))
	if err != nil {
		t.Fatal(err)
	}
	withParts := func(c *Config) { c.Partitions = parts }
	cl := startNATSCluster(t)
	insts := []*Server{cl.instance(t, withParts), cl.instance(t, withParts), cl.instance(t, withParts)}
	admin := mustLogin(t, mustClient(t, insts[0]), "admin", adminPassword)
	ld := startLoad(t, cl.urls(), loadUsers(t, insts[0], admin, 8), 16)
	ld.inspect = func(uid, key string, want int64) string { return cl.inspect(insts, uid, key, want) }
	ld.stalled = func() string {
		var b strings.Builder
		for i, s := range insts {
			fmt.Fprintf(&b, "\n  instance %d %s: folds", i, s.instance)
			for part, p := range s.Projectors() {
				fmt.Fprintf(&b, " partition %d (applied %d)", part, p.Applied())
			}
			fmt.Fprintf(&b, ", api connected %v to %s", s.apiConn.IsConnected(), s.apiConn.ConnectedUrl())
		}
		return b.String() + cl.inspect(insts, ld.users[0].uid, "w0", ld.acked[0].Load())
	}
	defer ld.finish()
	end := time.Now().Add(d)
	for round := 0; time.Now().Before(end); round++ {
		// The instance holding the lease, if any.
		hi := 0
		for i, s := range insts {
			if holder(t, insts[(i+1)%len(insts)]) == s.instance {
				hi = i
			}
		}
		switch round % 5 {
		case 0:
			kill(insts[hi])
			insts[hi] = cl.instance(t, withParts)
		case 1:
			insts[hi].Close()
			insts[hi] = cl.instance(t, withParts)
		case 2:
			n := round % 3
			cl.stopNode(n)
			time.Sleep(2 * time.Second)
			if err := cl.startNode(n); err != nil {
				t.Fatal(err)
			}
		case 3:
			cl.stopNode(0)
			cl.stopNode(1)
			time.Sleep(3 * time.Second)
			for _, n := range []int{0, 1} {
				if err := cl.startNode(n); err != nil {
					t.Fatal(err)
				}
			}
		case 4:
			for n := 0; n < 3; n++ {
				cl.stopNode(n)
				if err := cl.startNode(n); err != nil {
					t.Fatal(err)
				}
				ld.waitOK(t, time.Now(), 30*time.Second)
			}
		}
		ld.waitOK(t, time.Now(), 30*time.Second)
		t.Logf("%s: round %d (case %d) done", time.Now().Format(time.RFC3339Nano), round, round%5)
		time.Sleep(2 * time.Second)
	}
	time.Sleep(time.Second)
	ld.finish()
	live := insts[0]
	verifyLoad(t, ld, live)
}

// inspect describes, for a stale read of a user's key after want was acknowledged,
// what each NATS node has of the bucket and the log, the key as the leader answers it,
// the intent record and lease of the user's partition, and the set events of key in
// the log's tail.
func (c *natsCluster) inspect(insts []*Server, uid, key string, want int64) string {
	var b strings.Builder
	for i, ns := range c.nodes {
		if ns == nil {
			fmt.Fprintf(&b, "\n  node %d down", i)
			continue
		}
		jsz, err := ns.Jsz(&server.JSzOptions{Accounts: true, Streams: true, Config: true})
		if err != nil {
			fmt.Fprintf(&b, "\n  node %d: %v", i, err)
			continue
		}
		for _, a := range jsz.AccountDetails {
			for _, sd := range a.Streams {
				leader := ""
				if sd.Cluster != nil {
					leader = sd.Cluster.Leader
				}
				fmt.Fprintf(&b, "\n  node %d %s: last %d leader %s direct %v", i, sd.Name, sd.State.LastSeq, leader, sd.Config != nil && sd.Config.AllowDirect)
			}
		}
	}
	var s *Server
	for _, in := range insts {
		if in.apiConn != nil && in.apiConn.IsConnected() {
			s = in
			break
		}
	}
	if s == nil {
		return b.String()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	js, _ := jetstream.New(s.apiConn)
	kvs, err := js.Stream(ctx, events.KVStream(events.DefaultBucket))
	if err != nil {
		return b.String() + "\n  " + err.Error()
	}
	evs, err := js.Stream(ctx, events.StreamName)
	if err != nil {
		return b.String()
	}
	lay := events.LayoutOf(evs.CachedInfo().Config)
	part := events.PartitionName(lay.Partition(uid))
	for _, k := range []string{events.AttrKey(uid, "", key), events.CheckpointKey(part), events.LeaseKey(part)} {
		m, err := kvs.GetLastMsgForSubject(ctx, events.KVSubject(events.DefaultBucket, k))
		if err != nil {
			fmt.Fprintf(&b, "\n  %s: %v", k, err)
			continue
		}
		rec, _ := events.DecodeRecord(k, m.Data)
		switch r := rec.(type) {
		case *events.AttrRecord:
			fmt.Fprintf(&b, "\n  %s: seq %d value %s", k, m.Sequence, r.Value)
		case *events.Checkpoint:
			fmt.Fprintf(&b, "\n  %s: seq %d first %d last %d", k, m.Sequence, r.First, r.Last)
		default:
			fmt.Fprintf(&b, "\n  %s: seq %d %+v", k, m.Sequence, rec)
		}
	}
	last := evs.CachedInfo().State.LastSeq
	cons, err := evs.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: []string{lay.Subject(&events.Event{Type: events.AttrSet, UserID: uid})},
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: max(last, 20000) - 20000 + 1})
	if err != nil {
		return b.String()
	}
	for {
		batch, err := cons.FetchNoWait(1000)
		if err != nil {
			break
		}
		n := 0
		for m := range batch.Messages() {
			n++
			ev, err := events.Decode(m.Data())
			if err != nil || len(ev.Attrs) != 1 || ev.Attrs[0].Name != key {
				continue
			}
			v, _ := strconv.ParseInt(string(ev.Attrs[0].Value), 10, 64)
			if v >= want-1 {
				md, _ := m.Metadata()
				fmt.Fprintf(&b, "\n  event seq %d %s %s=%d id %s", md.Sequence.Stream, ev.Type, key, v, ev.ID)
			}
		}
		if n == 0 {
			break
		}
	}
	return b.String()
}

// adminID logs in as admin, retrying (E008004, timeouts) for up to 20 s, and returns
// its id.
func adminID(t *testing.T, s *Server) string {
	c := mustClient(t, s)
	deadline := time.Now().Add(20 * time.Second)
	for {
		sess, err := c.Login(ctxT(t), "admin", adminPassword)
		if err == nil {
			var u *client.User
			if u, err = sess.User(ctxT(t)); err == nil {
				return u.ID
			}
			err = fmt.Errorf("who am I, after a login: %w", err)
		}
		// Right after the NATS nodes restarted, a request may also time out: try again.
		if time.Now().After(deadline) {
			t.Fatalf("login: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAttrdStartsBeforeNATSAndWaits: attrd started before its NATS waits (a log line per
// attempt) and serves once NATS is up, instead of exiting.
func TestAttrdStartsBeforeNATSAndWaits(t *testing.T) {
	accts := &embedded.Accounts{InternalPassword: embedded.NewSecret(), OperatorPassword: embedded.NewSecret()}
	port := freePort(t)
	dir := t.TempDir()
	go func() {
		time.Sleep(1500 * time.Millisecond)
		ns, err := embedded.Start(embedded.Options{DataDir: dir, Addr: "127.0.0.1:" + strconv.Itoa(port), Accounts: accts})
		if err != nil {
			t.Error(err)
			return
		}
		t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	}()
	start := time.Now()
	s := mustStart(t, func(c *Config) {
		c.NATSURL, c.Replicas = "nats://127.0.0.1:"+strconv.Itoa(port), 1
		c.NATSOptions = []nats.Option{nats.UserInfo(embedded.OperatorUser, accts.OperatorPassword), nats.ReconnectWait(100 * time.Millisecond)}
	})
	if waited := time.Since(start); waited < time.Second {
		t.Fatalf("started in %s, before NATS was up", waited)
	}
	sess := mustLogin(t, mustClient(t, s), "admin", adminPassword)
	if _, err := sess.User(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}

// TestReplicasAreNotChangedSilently: a stream created R1 is not shrunk or grown by a
// start that merely defaults to other replicas; an explicit --replicas changes it.
func TestReplicasAreNotChangedSilently(t *testing.T) {
	ns, accts := startAccountsNATS(t, "127.0.0.1:0")
	cfg := func(replicas int, change bool) func(*Config) {
		return func(c *Config) {
			c.NATSURL, c.Replicas, c.ChangeReplicas = ns.ClientURL(), replicas, change
			c.NATSOptions = []nats.Option{nats.UserInfo(embedded.OperatorUser, accts.OperatorPassword)}
		}
	}
	s := mustStart(t, cfg(1, false))
	s.Close()
	c := Config{DataDir: t.TempDir(), HTTPAddr: "127.0.0.1:0", Password: fastPasswords, Logger: testLogger()}
	cfg(3, false)(&c)
	if _, err := Start(ctxT(t), c); !errors.Is(err, events.ErrReplicasMismatch) {
		t.Fatalf("a default of 3 replicas on an R1 stream: %v, want a refusal", err)
	}
}

// startAccountsNATS runs a standalone NATS server with attrd's two accounts, as an
// external NATS would have them, on addr.
func startAccountsNATS(t *testing.T, addr string) (*server.Server, *embedded.Accounts) {
	t.Helper()
	accts := &embedded.Accounts{InternalPassword: embedded.NewSecret(), OperatorPassword: embedded.NewSecret()}
	ns, err := embedded.Start(embedded.Options{DataDir: t.TempDir(), Addr: addr, Accounts: accts})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	return ns, accts
}

// TestAProjectorStartsOnlyWhenOneServerAnswersAsTheBucketsLeader: a projector's run
// loads every key it folds from the bucket, and right after a network cut heals, the
// node back from it may still answer reads as the bucket's leader, from its old copy.
// So a run reads back the intent record it just fenced from every server answering as
// the leader, and starts only when none lacks it. Here a responder plays such a server
// for 1.5 s from the first such read, answering "no message": the projector starts
// only after it is gone, and the instance starts meanwhile (the run is retried, not
// failed).
func TestAProjectorStartsOnlyWhenOneServerAnswersAsTheBucketsLeader(t *testing.T) {
	c := startNATSCluster(t)
	nc, err := nats.Connect(c.urls(), nats.UserInfo(embedded.OperatorUser, c.accts.OperatorPassword))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	var probes atomic.Int64
	var gone atomic.Int64
	var stale *nats.Subscription
	stale, err = nc.Subscribe("$JS.API.STREAM.MSG.GET."+events.KVStream(events.DefaultStoreConfig().Bucket), func(m *nats.Msg) {
		var req struct {
			Seq uint64 `json:"seq"`
		}
		if json.Unmarshal(m.Data, &req) != nil || req.Seq == 0 {
			return // only the read of a message by its sequence, as a run's start sends
		}
		if probes.Add(1) == 1 {
			time.AfterFunc(1500*time.Millisecond, func() {
				_ = stale.Unsubscribe()
				_ = nc.Flush()
				gone.Store(time.Now().UnixNano())
			})
		}
		_ = m.Respond([]byte(`{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","error":{"code":404,"err_code":10037,"description":"no message found"}}`))
	})
	if err != nil {
		t.Fatal(err)
	}
	s := c.instance(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.parts.Started(ctx); err != nil {
		t.Fatal(err)
	}
	started := time.Now()
	if probes.Load() == 0 {
		t.Fatal("no run read its fenced intent record back by sequence")
	}
	if g := gone.Load(); g == 0 || started.Before(time.Unix(0, g)) {
		t.Fatalf("the projector started while a server answered without its intent record (%d reads answered so)", probes.Load())
	}
	t.Logf("%d runs refused while the stale server answered; started %s after it went", probes.Load(), started.Sub(time.Unix(0, gone.Load())).Round(time.Millisecond))
}

// TestAReplicatedBucketOfAnOlderAttrdServesDirectGetsAgain: attrd before the read
// index turned a replicated bucket's direct gets off; the projector now reads its keys
// with them (each answer checked against how far its copy goes). An instance started on
// such a bucket turns them on again, and the bucket serves as before: an attribute set
// before the upgrade is read, updated (the fold loads it), and read back.
func TestAReplicatedBucketOfAnOlderAttrdServesDirectGetsAgain(t *testing.T) {
	if testing.Short() {
		t.Skip("a cluster of three NATS nodes")
	}
	cl := startNATSCluster(t)
	a := cl.instance(t)
	ctx := ctxT(t)
	direct := func(s *Server) bool {
		t.Helper()
		js, _ := jetstream.New(s.apiConn)
		st, err := js.Stream(ctx, events.KVStream(events.DefaultBucket))
		if err != nil {
			t.Fatal(err)
		}
		return st.CachedInfo().Config.AllowDirect
	}
	if !direct(a) {
		t.Fatal("a new replicated bucket serves no direct gets")
	}
	admin := mustLogin(t, mustClient(t, a), "admin", adminPassword)
	me, err := admin.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	expectCode(t, me.Attr.Create(ctx, "kept", 1), noError)
	// As the older attrd left it.
	js, _ := jetstream.New(a.apiConn)
	st, err := js.Stream(ctx, events.KVStream(events.DefaultBucket))
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	cfg.AllowDirect = false
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Logf("close: %v", err)
	}

	b := cl.instance(t)
	if !direct(b) {
		t.Fatal("the upgraded instance left the bucket without direct gets")
	}
	admin = mustLogin(t, mustClient(t, b), "admin", adminPassword)
	me, err = admin.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := me.Attr.Get(ctx, "kept"); err != nil || string(got.Value) != "1" {
		t.Fatalf("the attribute set before the upgrade reads %+v, %v", got, err)
	}
	expectCode(t, me.Attr.Update(ctx, "kept", 2), noError)
	if got, err := me.Attr.Get(ctx, "kept"); err != nil || string(got.Value) != "2" {
		t.Fatalf("after the update the attribute reads %+v, %v", got, err)
	}
}
