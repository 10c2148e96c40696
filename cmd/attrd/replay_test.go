package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/oklog/ulid/v2"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// runCmd runs the attrd command line and returns its exit status and its standard
// output, followed by its standard error when it failed.
func runCmd(t *testing.T, args ...string) (int, string) {
	t.Helper()
	out, err1 := os.CreateTemp(t.TempDir(), "out")
	errf, err2 := os.CreateTemp(t.TempDir(), "err")
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	args = withToolCreds(args)
	code := run(context.Background(), args, strings.NewReader(""), out, errf)
	o, _ := os.ReadFile(out.Name())
	if code != 0 {
		e, _ := os.ReadFile(errf.Name())
		o = append(o, e...)
	}
	return code, string(o)
}

// randomTraffic creates three users and drives the API with random operations from several users and sessions:
// creates, updates of present and missing names, sets, deletes, expiries, batches,
// encryption, logouts, renewals, and retries with the same request id. It returns how
// many operations were answered.
func randomTraffic(t *testing.T, f *fixture, n int, seed uint64) int {
	t.Helper()
	for i := 0; i < 3; i++ {
		if _, err := f.admin.CreateUser(ctxT(t), fmt.Sprintf("user%d", i), "pw", false); err != nil {
			t.Fatal(err)
		}
	}
	return trafficWorker(t, f, n, seed)
}

// concurrentTraffic runs workers trafficWorkers at once, on the same users and names.
func concurrentTraffic(t *testing.T, f *fixture, workers, n int, seed uint64) int {
	t.Helper()
	for i := 0; i < 3; i++ {
		if _, err := f.admin.CreateUser(ctxT(t), fmt.Sprintf("user%d", i), "pw", false); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	answered := make([]int, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answered[w] = trafficWorker(t, f, n, seed+uint64(w)*1000)
		}()
	}
	wg.Wait()
	total := 0
	for _, a := range answered {
		total += a
	}
	return total
}

// trafficWorker logs in its own sessions of the users (user0..2 must exist) and sends n
// random operations.
func trafficWorker(t *testing.T, f *fixture, n int, seed uint64) int {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(seed, seed+1))
	type login struct {
		s        *client.Session
		user, pw string
	}
	// It may run off the test's goroutine: errors are t.Errorf and a return, never Fatal.
	var sessions []login
	logIn := func(user, pw string) *client.Session {
		s, err := f.c.Login(ctx, user, pw)
		if err != nil {
			t.Errorf("login %s: %v", user, err)
		}
		return s
	}
	for i := 0; i < 3; i++ {
		name := fmt.Sprintf("user%d", i)
		for j := 0; j < 2; j++ {
			sessions = append(sessions, login{logIn(name, "pw"), name, "pw"})
		}
	}
	sessions = append(sessions, login{f.admin, "admin", adminPassword}, login{logIn("alice", "alice-pw"), "alice", "alice-pw"})
	if t.Failed() {
		return 0
	}
	names := []string{"a", "b", "c.d", "e f", "ü"}
	pick := func() string { return names[rng.IntN(len(names))] }
	answered := 0
	for i := 0; i < n; i++ {
		li := &sessions[rng.IntN(len(sessions))]
		s := li.s
		var a *client.Attr
		switch {
		case rng.IntN(3) == 0:
			a = s.SessionAttr(s.UST)
		case li.user == "admin" && rng.IntN(2) == 0:
			a = s.UserByID(f.aliceID).Attr // a super-user on someone else's
		default:
			a = s.UserByID("").Attr // own user: no user_id
		}
		var opts []client.Option
		if rng.IntN(4) == 0 {
			opts = append(opts, client.Expiration(time.Duration(1+rng.IntN(3))*time.Second))
		}
		if rng.IntN(5) == 0 {
			opts = append(opts, client.Encrypt(rng.IntN(2) == 0))
		}
		if rng.IntN(6) == 0 {
			opts = append(opts, client.RequestID(fmt.Sprintf("rid-%d", rng.IntN(20))))
		}
		var err error
		switch rng.IntN(12) {
		case 0, 1:
			err = a.Create(ctx, pick(), rng.IntN(100), opts...)
		case 2, 3:
			err = a.Update(ctx, pick(), rng.IntN(100), opts...)
		case 4:
			err = a.Set(ctx, pick(), rng.IntN(100), opts...)
		case 5:
			err = a.Delete(ctx, pick(), opts...)
		case 6:
			err = a.UpdateMany(ctx, []client.Item{{Name: "a", Value: 1}, {Name: pick(), Value: 2}}, opts...)
		case 7:
			err = a.CreateMany(ctx, []client.Item{{Name: "b", Value: 1}, {Name: "x" + pick(), Value: 2, Encrypt: client.Bool(true)}}, opts...)
		case 8:
			err = a.SetMany(ctx, []client.Item{{Name: pick(), Value: []int{1}}}, opts...)
		case 9:
			_, err = s.Renew(ctx)
		case 10:
			if rng.IntN(5) == 0 && li.user != "admin" {
				if err = s.Logout(ctx); err == nil {
					if li.s = logIn(li.user, li.pw); li.s == nil { // and a new session
						return answered
					}
				}
			}
		case 11:
			_, err = a.Names(ctx)
		}
		switch events.CodeOf(err) {
		case "", events.CodeAttrExists, events.CodeNoAttr, events.CodeNoSession, events.CodeNotAllowed, events.CodeInvalidInput:
			answered++
		default:
			t.Errorf("operation %d: %v", i, err)
			return answered
		}
	}
	return answered
}

func TestLongRandomTrafficReplaysToTheSameProjectionAndDecisions(t *testing.T) {
	if testing.Short() {
		t.Skip("long randomized test")
	}
	var mu sync.Mutex
	live := map[uint64]events.Decision{}
	dir := t.TempDir()
	f := newFixture(t, func(c *Config) {
		c.DataDir = dir
		c.OnDecision = func(d events.Decision) { mu.Lock(); live[d.Seq] = d; mu.Unlock() }
	})
	n := concurrentTraffic(t, f, 4, 1000, 7)
	t.Logf("%d operations answered", n)

	js, _ := jetstream.New(f.srv.apiConn)
	keys, err := loadKeys(filepath.Join(dir, "encryption.key"))
	if err != nil {
		t.Fatal(err)
	}
	m := projector.NewMemory()
	var replayed []events.Decision
	log, err := newLog(ctxT(t), js, keys)
	if err != nil {
		t.Fatal(err)
	}
	if err := log.FoldAll(ctxT(t), m, func(e events.Entry) { replayed = append(replayed, e.Decision) }); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(replayed) != len(live) {
		t.Fatalf("replay decided %d events, the live projector %d", len(replayed), len(live))
	}
	codes := map[events.Code]int{}
	for _, d := range replayed {
		if live[d.Seq] != d {
			t.Fatalf("event %d: live %+v, replay %+v", d.Seq, live[d.Seq], d)
		}
		codes[d.Code]++
	}
	t.Logf("decisions: %v", codes)
	for _, c := range []events.Code{"", events.CodeAttrExists, events.CodeNoAttr} {
		if codes[c] == 0 {
			t.Fatalf("no decision %q: the traffic does not exercise it (%v)", c, codes)
		}
	}
	diffs, _, err := projector.Diff(ctxT(t), js, events.DefaultBucket, m)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range diffs {
		t.Error(d)
	}
}

func TestReplayVerifyAndIntoFromTheCommandLine(t *testing.T) {
	dir := t.TempDir()
	f := newFixture(t, func(c *Config) { c.DataDir = dir })
	randomTraffic(t, f, 200, 3)
	keyArg := "--encryption-key-file=" + filepath.Join(dir, "encryption.key")
	code, out := runCmd(t, "replay", "--verify", "--nats-url", f.srv.ClientURL(), keyArg)
	if code != 0 || !strings.Contains(out, "reproduces") {
		t.Fatalf("verify of an untouched projection: exit %d\n%s", code, out)
	}
	code, out = runCmd(t, "replay", "--into", "rebuilt_", "--nats-url", f.srv.ClientURL(), keyArg)
	if code != 0 {
		t.Fatalf("replay --into: exit %d\n%s", code, out)
	}
	js, _ := jetstream.New(f.srv.apiConn)
	got := bucketRecords(t, js, "rebuilt_attrd")
	want := bucketRecords(t, js, events.DefaultBucket)
	for k, v := range want {
		if got[k] != v && !expiredBy(k, v, time.Now().Add(time.Second)) {
			t.Errorf("rebuilt %s differs", k)
		}
	}
	if code, _ = runCmd(t, "replay", "--into", "rebuilt_", "--nats-url", f.srv.ClientURL(), keyArg); code == 0 {
		t.Fatal("a rebuild into a bucket that is not empty succeeded")
	}
	// Tamper with the live projection: verify reports it and exits 1.
	kv := mustKV(t, f.srv)
	bogus, _ := events.Marshal(&events.AttrRecord{Value: []byte(`"forged"`), Created: 1, Modified: 1})
	key := events.AttrKey(f.aliceID, "", "forged")
	if _, err := kv.Put(context.Background(), key, bogus); err != nil {
		t.Fatal(err)
	}
	code, out = runCmd(t, "replay", "--verify", "--nats-url", f.srv.ClientURL(), keyArg)
	if code != 1 || !strings.Contains(out, key) {
		t.Fatalf("verify of a tampered projection: exit %d\n%s", code, out)
	}
}

// bucketRecords returns the projection records of a bucket as strings.
// expiredBy reports whether the record of key k is an attribute expired by t: the
// live bucket holds it until the server's TTL removes it, a rebuild after its expiry
// never writes it (invariant 2: the same live projection, up to expiry since).
func expiredBy(k, v string, t time.Time) bool {
	var rec events.AttrRecord
	return strings.HasPrefix(k, "a.") && events.Unmarshal([]byte(v), &rec) == nil && rec.ExpiresAt != 0 && rec.ExpiresAt <= t.UnixNano()
}

func bucketRecords(t *testing.T, js jetstream.JetStream, bucket string) map[string]string {
	t.Helper()
	kv, err := js.KeyValue(context.Background(), bucket)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.WatchAll(context.Background(), jetstream.IgnoreDeletes())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	out := map[string]string{}
	for e := range w.Updates() {
		if e == nil {
			break
		}
		if k := e.Key(); events.IsProjectionKey(k) {
			out[k] = string(e.Value())
		}
	}
	return out
}

// TestRetentionDropsOldEventsButNotTheProjection: with a maximum age the log forgets
// old events; the live projection keeps everything, and a rebuild refuses to run on a
// log that lost its beginning.
func TestRetentionDropsOldEventsButNotTheProjection(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.HistoryMaxAge = time.Second })
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "old", 1), noError)
	time.Sleep(2500 * time.Millisecond) // retention test: the events must age out
	expectCode(t, u.Attr.Create(ctx, "new", 1), noError)
	js, _ := jetstream.New(f.srv.apiConn)
	st, _ := js.Stream(ctx, events.StreamName)
	info, err := st.Info(ctx)
	if err != nil || info.State.FirstSeq <= 1 {
		t.Fatalf("no event aged out: %+v %v", info.State, err)
	}
	if got, err := u.Attr.Get(ctx, "old"); err != nil || !got.Found {
		t.Fatalf("the projection lost an attribute whose events aged out: %+v %v", got, err)
	}
	code, out := runCmd(t, "replay", "--verify", "--nats-url", f.srv.ClientURL())
	if code == 0 || !strings.Contains(out, "retention") {
		t.Fatalf("verify on a truncated log: exit %d\n%s", code, out)
	}
}

// TestEveryEventCarriesItsTypeVersionAndULIDAsNatsMsgID checks the contract's event
// headers on every message of the log, requests with a request id included.
func TestEveryEventCarriesItsTypeVersionAndULIDAsNatsMsgID(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "a", 1, client.RequestID("r1")), noError)
	expectCode(t, u.Attr.Create(ctx, "a", 1, client.RequestID("r1")), noError) // a retry: appends nothing
	expectCode(t, u.Attr.Set(ctx, "b", 1), noError)
	js, _ := jetstream.New(f.srv.apiConn)
	st, _ := js.Stream(ctx, events.StreamName)
	info, _ := st.Info(ctx)
	ids := map[string]bool{}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		ev, err := events.Decode(m.Data)
		if err != nil {
			t.Fatalf("seq %d: %v", seq, err)
		}
		if m.Header.Get("Nats-Msg-Id") != ev.ID || m.Header.Get(events.HeaderType) != string(ev.Type) ||
			m.Header.Get(events.HeaderVersion) != fmt.Sprint(events.SchemaVersion) {
			t.Fatalf("seq %d (%s): headers %v, id %s", seq, ev.Type, m.Header, ev.ID)
		}
		if _, err := ulid.ParseStrict(ev.ID); err != nil || ids[ev.ID] {
			t.Fatalf("seq %d: id %q is not a fresh ULID (%v)", seq, ev.ID, err)
		}
		ids[ev.ID] = true
	}
	if len(ids) < 5 {
		t.Fatalf("only %d events in the log", len(ids))
	}
}

// withToolCreds adds --creds for a tool pointed at a test server with --nats-url, unless
// the arguments name credentials already.
func withToolCreds(args []string) []string {
	url := ""
	for i, a := range args {
		switch {
		case a == "--creds" || strings.HasPrefix(a, "--creds="):
			return args
		case a == "--nats-url" && i+1 < len(args):
			url = args[i+1]
		case strings.HasPrefix(a, "--nats-url="):
			url = strings.TrimPrefix(a, "--nats-url=")
		}
	}
	if c, ok := toolCreds.Load(url); ok {
		return append(append([]string{}, args...), "--creds", c.(string))
	}
	return args
}
