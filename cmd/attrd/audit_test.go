package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
)

// auditor sends raw requests and remembers the live answer of each by its cid.
type auditor struct {
	t    *testing.T
	nc   *nats.Conn
	mu   sync.Mutex
	live map[string]string // cid -> "" (ok) or the code
}

func newAuditor(t *testing.T, f *fixture) *auditor {
	nc, err := nats.Connect(f.srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return &auditor{t: t, nc: nc, live: map[string]string{}}
}

// do sends op and returns the reply; the outcome is kept under the reply's cid.
func (a *auditor) do(op string, body map[string]any) map[string]any {
	body["current_app"] = "CRM"
	b, _ := json.Marshal(body)
	rep, err := a.nc.Request("attrd."+op, b, 10*time.Second)
	if err != nil {
		a.t.Errorf("%s: %v", op, err)
		return nil
	}
	var out map[string]any
	json.Unmarshal(rep.Data, &out)
	cid, _ := out["cid"].(string)
	a.mu.Lock()
	a.live[cid] = subStatus(out)
	a.mu.Unlock()
	return out
}

func (a *auditor) login(user, pw string) string {
	out := a.do("user.login", map[string]any{"username": user, "password": pw})
	ust, _ := out["ust"].(string)
	if ust == "" {
		a.t.Fatalf("login %s: %v", user, out)
	}
	return ust
}

// fullHistory reads a user's whole history as a super-user, every page.
func fullHistory(t *testing.T, f *fixture, ust, uid string, extra map[string]any) []map[string]any {
	var all []map[string]any
	body := map[string]any{"user_id": uid, "limit": 1000}
	for k, v := range extra {
		body[k] = v
	}
	for {
		evs, out := historyOf(t, f, ust, body)
		if out["status"] != "ok" {
			t.Fatalf("history of %s: %v", uid, out)
		}
		all = append(all, evs...)
		next, ok := out["next"]
		if !ok {
			return all
		}
		body["after"] = next
	}
}

// TestEveryDecisionInTheHistoryIsTheLiveAnswer: super-users created by super-users,
// users created by them, logins, logouts, writes on others' attributes and concurrent
// writers. Every event's decision in the history equals the answer its request got,
// and the attributes at every instant equal what a read saw then.
func TestEveryDecisionInTheHistoryIsTheLiveAnswer(t *testing.T) {
	f := newFixture(t, nil)
	a := newAuditor(t, f)
	admin := a.login("admin", adminPassword)
	bID := a.do("user.create", map[string]any{"ust": admin, "username": "bee", "password": "pw", "is_super_user": true})["user_id"].(string)
	bee := a.login("bee", "pw")
	cID := a.do("user.create", map[string]any{"ust": bee, "username": "cee", "password": "pw", "is_super_user": true})["user_id"].(string)
	cee := a.login("cee", "pw")
	dID := a.do("user.create", map[string]any{"ust": cee, "username": "dee", "password": "pw"})["user_id"].(string)
	dee := a.login("dee", "pw")

	// Sequential: after each write, the instant and alice's attributes as a read sees them.
	type instant struct {
		at    time.Time
		attrs map[string]any
	}
	var instants []instant
	snapshot := func() {
		out := a.do("user.attr.names", map[string]any{"ust": admin, "user_id": f.aliceID})
		names, _ := out["result"].([]any)
		attrs := map[string]any{}
		if len(names) > 0 {
			got := a.do("user.attr.get", map[string]any{"ust": admin, "user_id": f.aliceID, "data": names})
			for n, v := range got["result"].(map[string]any) {
				attrs[n] = v.(map[string]any)["value"]
			}
		}
		instants = append(instants, instant{time.Now(), attrs})
	}
	snapshot()
	writers := []struct{ ust, uid string }{{cee, f.aliceID}, {dee, dID}, {bee, f.aliceID}, {f.alice.UST, f.aliceID}}
	ops := []string{"create", "update", "set", "delete"}
	rng := rand.New(rand.NewPCG(7, 7))
	for i := 0; i < 60; i++ {
		w := writers[rng.IntN(len(writers))]
		body := map[string]any{"ust": w.ust, "user_id": w.uid, "name": fmt.Sprintf("n%d", rng.IntN(4)), "value": i}
		a.do("user.attr."+ops[rng.IntN(len(ops))], body)
		if w.uid == f.aliceID {
			snapshot()
		}
	}
	// A regular user on someone else's attributes is refused (before the log).
	a.do("user.attr.set", map[string]any{"ust": dee, "user_id": f.aliceID, "name": "x", "value": 1})
	// Logouts, and writes with the ended sessions.
	a.do("user.logout", map[string]any{"ust": cee})
	a.do("user.attr.set", map[string]any{"ust": cee, "user_id": f.aliceID, "name": "late", "value": 1})
	// Concurrent writers on the same names.
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 25; i++ {
				op := ops[(g+i)%len(ops)]
				a.do("user.attr."+op, map[string]any{"ust": bee, "user_id": dID, "name": fmt.Sprintf("c%d", i%3), "value": g})
			}
		}()
	}
	wg.Wait()

	checked := 0
	for _, uid := range []string{f.aliceID, bID, cID, dID, f.adminID} {
		for _, e := range fullHistory(t, f, admin, uid, nil) {
			cid, _ := e["cid"].(string)
			want, ok := a.live[cid]
			if !ok {
				continue // the fixture's own requests
			}
			got, _ := e["code"].(string)
			if got != want {
				t.Errorf("%s %v of %s: history %q, live %q", e["type"], e["seq"], uid, got, want)
			}
			checked++
		}
	}
	if checked < 150 {
		t.Fatalf("only %d events compared", checked)
	}
	for i, in := range instants {
		_, out := rawJSON(t, f.srv, "history.at", map[string]any{"ust": admin, "current_app": "CRM", "user_id": f.aliceID,
			"at": in.at.Format(time.RFC3339Nano)})
		got := map[string]any{}
		for n, v := range out["result"].(map[string]any) {
			got[n] = v.(map[string]any)["value"]
		}
		if !reflect.DeepEqual(got, in.attrs) {
			t.Fatalf("instant %d: history.at %v, live %v", i, got, in.attrs)
		}
	}
}

// TestTimeBoundsAreTimesAndFilterTheWholeLog: 1970 is a time like any other, at is
// required and must be one, and until filters events out of order in the log rather
// than stopping at the first later one.
func TestTimeBoundsAreTimesAndFilterTheWholeLog(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u := mustSession(t, f)
	expectCode(t, u.Attr.Create(ctx, "a", 1), noError)
	zero := "1970-01-01T00:00:00Z"
	_, out := rawJSON(t, f.srv, "history.at", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "at": zero})
	if out["status"] != "ok" || len(out["result"].(map[string]any)) != 0 {
		t.Fatalf("at 1970: %v, want no attributes", out)
	}
	evs, out := historyOf(t, f, f.alice.UST, map[string]any{"until": zero})
	if out["status"] != "ok" || len(evs) != 0 {
		t.Fatalf("until 1970: %v, want no events", out)
	}
	for _, at := range []string{"", "yesterday", "3000-01-01T00:00:00Z"} {
		_, out := rawJSON(t, f.srv, "history.at", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "at": at})
		if subStatus(out) != string(events.CodeInvalidInput) {
			t.Fatalf("at %q: %v, want E008002", at, out)
		}
	}
	st, _, b := httpDo(t, f.srv, "GET", "/attrd/history/at?current_app=CRM&at=", nil, map[string]string{"Authorization": "Bearer " + f.alice.UST})
	if st != 403 || subStatus(b) != string(events.CodeInvalidInput) {
		t.Fatalf("?at= over REST: %d %v", st, b)
	}

	// Events whose times are out of log order, as two instances' clocks make them: an
	// event stamped earlier than the one before it in the log.
	now := time.Now()
	early := now.Add(-time.Hour)
	sid := events.SessionID(f.alice.UST)
	publishEvent(t, f, &events.Event{Type: events.AttrSet, UserID: f.aliceID, Actor: f.aliceID, ActorSession: sid, Time: now.UnixNano(),
		Attrs: []events.AttrItem{{Name: "late-stamp", Value: []byte("1")}}})
	publishEvent(t, f, &events.Event{Type: events.AttrSet, UserID: f.aliceID, Actor: f.aliceID, ActorSession: sid, Time: early.UnixNano(),
		Attrs: []events.AttrItem{{Name: "early-stamp", Value: []byte("2")}}})
	until := now.Add(-time.Minute).Format(time.RFC3339Nano)
	evs, _ = historyOf(t, f, f.alice.UST, map[string]any{"until": until, "types": []string{"attr.set"}})
	if len(evs) != 1 || evs[0]["changes"].([]any)[0].(map[string]any)["name"] != "early-stamp" {
		t.Fatalf("until between the two stamps: %v, want only the early-stamped event", evs)
	}
	// at between the stamps: the state after the last event (in log order) stamped at or
	// before it, which is the early-stamped one, so the late-stamped event before it in
	// the log is in that state too.
	_, out = rawJSON(t, f.srv, "history.at", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "at": until})
	res, _ := out["result"].(map[string]any)
	if res["early-stamp"] == nil || res["late-stamp"] == nil {
		t.Fatalf("at between the two stamps: %v, want both (a prefix of the log)", out)
	}
	_, out = rawJSON(t, f.srv, "history.at", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "at": early.Add(-time.Minute).Format(time.RFC3339Nano)})
	if res, _ := out["result"].(map[string]any); res["early-stamp"] != nil || res["late-stamp"] != nil || res["a"] != nil {
		t.Fatalf("at before both stamps and the first write: %v", out)
	}
}

// publishEvent appends an event as an instance would and waits until it is folded.
func publishEvent(t *testing.T, f *fixture, ev *events.Event) {
	t.Helper()
	ev.ID, ev.Version, ev.App = events.NewID(), events.SchemaVersion, "CRM"
	data, err := events.Encode(ev)
	if err != nil {
		t.Fatal(err)
	}
	js, _ := f.srv.apiConn.JetStream()
	ack, err := js.Publish(events.Layout{}.Subject(ev), data, nats.MsgId(ev.ID))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for f.srv.Projector().Applied() < ack.Sequence {
		if time.Now().After(deadline) {
			t.Fatal("the event was not folded")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestReadersWithoutTheKeyFileGetTheSameDecisionsAndStates: a plain attribute updated
// without encrypt is sealed in the log (its setting is kept). Without the key file the
// history shows the update accepted and the value unavailable, history --at shows the
// attribute as it is (not stale), replay --verify finds nothing wrong, and replay
// --into refuses to build values it cannot open.
func TestReadersWithoutTheKeyFileGetTheSameDecisionsAndStates(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u := mustSession(t, f)
	expectCode(t, u.Attr.Create(ctx, "plain", "v1"), noError)
	expectCode(t, u.Attr.Update(ctx, "plain", "v2"), noError)
	expectCode(t, u.Attr.Set(ctx, "plain", "v3"), noError)
	expectCode(t, u.Attr.Update(ctx, "missing", "x"), events.CodeNoAttr)
	noKey := "--encryption-key-file=" + filepath.Join(t.TempDir(), "absent.key")
	url := "--nats-url=" + f.srv.ClientURL()
	code, out := runCmd(t, "history", "--user", "alice", "--json", "--types", "attr.updated,attr.set", url, noKey)
	if code != 0 {
		t.Fatalf("history without the key: exit %d\n%s", code, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 {
		t.Fatalf("want 3 events:\n%s", out)
	}
	for i, want := range []string{"accepted", "accepted", "rejected"} {
		var e map[string]any
		json.Unmarshal([]byte(lines[i]), &e)
		ch := e["changes"].([]any)[0].(map[string]any)
		if e["decision"] != want || ch["value_encrypted"] == true || ch["value_unavailable"] != true {
			t.Fatalf("event %d without the key: %s", i, lines[i])
		}
	}
	code, out = runCmd(t, "history", "--user", "alice", "--json", "--at", time.Now().Format(time.RFC3339Nano), url, noKey)
	var at map[string]map[string]any
	json.Unmarshal([]byte(out), &at)
	p := at["plain"]
	if code != 0 || p == nil || p["value_unavailable"] != true || p["is_encrypted"] != false {
		t.Fatalf("--at without the key: exit %d\n%s", code, out)
	}
	code, out = runCmd(t, "replay", "--verify", url, noKey)
	if code != 0 || !strings.Contains(out, "reproduces") || !strings.Contains(out, "not compared") {
		t.Fatalf("verify without the key: exit %d\n%s", code, out)
	}
	code, out = runCmd(t, "replay", "--into", "nokey_", url, noKey)
	if code == 0 || !strings.Contains(out, "--encryption-key-file") {
		t.Fatalf("replay --into without the key: exit %d\n%s", code, out)
	}
	// With the key the values show.
	withKey := "--encryption-key-file=" + filepath.Join(f.srv.cfg.DataDir, "encryption.key")
	code, out = runCmd(t, "history", "--user", "alice", "--json", "--types", "attr.set", url, withKey)
	if code != 0 || !strings.Contains(out, `"value":"v3"`) {
		t.Fatalf("history with the key: exit %d\n%s", code, out)
	}
}

// TestReplayVerifyListsEveryDifference: an unreadable record in one key and a changed
// record in another are both reported, readably, and verify exits 1.
func TestReplayVerifyListsEveryDifference(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u := mustSession(t, f)
	expectCode(t, u.Attr.Create(ctx, "one", 1), noError)
	expectCode(t, u.Attr.Create(ctx, "two", 2), noError)
	kv := mustKV(t, f.srv)
	if _, err := kv.Put(ctx, events.AttrKey(f.aliceID, "", "one"), []byte{0xc1, 0xc1}); err != nil {
		t.Fatal(err)
	}
	changed, _ := events.Marshal(&events.AttrRecord{Value: []byte(`"changed"`), Created: 1, Modified: 1})
	if _, err := kv.Put(ctx, events.AttrKey(f.aliceID, "", "two"), changed); err != nil {
		t.Fatal(err)
	}
	key := "--encryption-key-file=" + filepath.Join(f.srv.cfg.DataDir, "encryption.key")
	code, out := runCmd(t, "replay", "--verify", "--nats-url", f.srv.ClientURL(), key)
	if code != 1 || !strings.Contains(out, events.AttrKey(f.aliceID, "", "one")+": the live record is unreadable") ||
		!strings.Contains(out, `"value":"changed"`) || !strings.Contains(out, `"value":2`) || !strings.Contains(out, "2 differences") {
		t.Fatalf("verify: exit %d\n%s", code, out)
	}
}

func TestHistorySmallerPromises(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	sa := f.alice.SessionAttr(f.alice.UST)
	expectCode(t, sa.Set(ctx, "cart", 1), noError)
	u := mustSession(t, f)
	expectCode(t, u.Attr.Create(ctx, "p", 1), noError)
	expectCode(t, u.Attr.Create(ctx, "p", 2), events.CodeAttrExists)
	url := "--nats-url=" + f.srv.ClientURL()
	key := "--encryption-key-file=" + filepath.Join(f.srv.cfg.DataDir, "encryption.key")

	// A login's event names its actor: the user itself.
	evs, _ := historyOf(t, f, f.alice.UST, map[string]any{"types": []string{"session.created"}})
	if len(evs) == 0 || evs[0]["actor"] != f.aliceID || evs[0]["actor_name"] != "alice" {
		t.Fatalf("a login's actor: %v", evs)
	}
	// The CLI refuses an unknown type, as the API does.
	if code, out := runCmd(t, "history", "--user", "alice", "--types", "attr.nope", url, key); code == 0 {
		t.Fatalf("--types attr.nope: exit 0\n%s", out)
	}
	// The CLI checks that --session was live at --at, as the API does.
	code, out := runCmd(t, "history", "--user", "alice", "--session", events.SessionID(f.alice.UST),
		"--at", "2000-01-01T00:00:00Z", url, key)
	if code == 0 || !strings.Contains(out, "E007001") {
		t.Fatalf("--session not live at --at: exit %d\n%s", code, out)
	}
	// A super-user naming another user's session by its UST alone gets that session's
	// history, from history and history.at alike.
	evs, out2 := historyOf(t, f, f.admin.UST, map[string]any{"target_ust": f.alice.UST})
	if out2["status"] != "ok" || len(evs) == 0 {
		t.Fatalf("history by target_ust: %v", out2)
	}
	_, at := rawJSON(t, f.srv, "history.at", map[string]any{"ust": f.admin.UST, "current_app": "CRM", "target_ust": f.alice.UST,
		"at": time.Now().Format(time.RFC3339Nano)})
	if at["status"] != "ok" || at["result"].(map[string]any)["cart"] == nil {
		t.Fatalf("history.at by target_ust: %v", at)
	}
	// An ended session that is not the caller's: E007001 from both.
	ended := mustLogin(t, f.c, "alice", "alice-pw")
	expectCode(t, ended.Logout(ctx), noError)
	_, l := rawJSON(t, f.srv, "history.list", map[string]any{"ust": f.admin.UST, "current_app": "CRM", "target_ust": ended.UST})
	_, a := rawJSON(t, f.srv, "history.at", map[string]any{"ust": f.admin.UST, "current_app": "CRM", "target_ust": ended.UST,
		"at": time.Now().Format(time.RFC3339Nano)})
	if subStatus(l) != "E007001" || subStatus(a) != "E007001" {
		t.Fatalf("an ended session of another user: list %v, at %v", l, a)
	}
	// A rejected create of a plain attribute shows its plain value, never as encrypted.
	evs, _ = historyOf(t, f, f.alice.UST, map[string]any{"types": []string{"attr.created"}, "name": "p"})
	if len(evs) != 2 || evs[1]["decision"] != "rejected" {
		t.Fatalf("creates of p: %v", evs)
	}
	if ch := evs[1]["changes"].([]any)[0].(map[string]any); ch["value_encrypted"] != nil || ch["value"] != 2.0 {
		t.Fatalf("a rejected plain create: %v", ch)
	}
	// A rejected update without encrypt (sealed in the log to keep the setting) of a
	// plain attribute shows as plain too.
	expectCode(t, u.Attr.UpdateMany(ctx, []client.Item{{Name: "p", Value: 3}, {Name: "nope", Value: 4}}), events.CodeNoAttr)
	evs, _ = historyOf(t, f, f.alice.UST, map[string]any{"types": []string{"attr.updated"}})
	if len(evs) != 1 || evs[0]["decision"] != "rejected" {
		t.Fatalf("the rejected update: %v", evs)
	}
	for _, c := range evs[0]["changes"].([]any) {
		if ch := c.(map[string]any); ch["value_encrypted"] != nil || ch["value"] == nil {
			t.Fatalf("a rejected update of plain attributes: %v", ch)
		}
	}
}

// TestDeniedAttemptsLeaveATraceBoundedInRate: wrong passwords show as login.failed in
// the user's history, another user's data as access.denied in that user's history
// (with the actor and the operation), and a flood records at most the rate.
func TestDeniedAttemptsLeaveATraceBoundedInRate(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	bobID, bob := f.regularUser(t, "bob")
	for i := 0; i < 2; i++ {
		if _, err := f.c.Login(ctx, "alice", "wrong"); events.CodeOf(err) != events.CodeNotAllowed {
			t.Fatal(err)
		}
	}
	st, _, _ := httpDo(t, f.srv, "POST", "/zato/sso/user/login", map[string]any{"username": "alice", "password": "wrong", "current_app": "CRM"}, nil)
	if st != 403 {
		t.Fatalf("a wrong password over REST: %d", st)
	}
	if _, err := bob.UserByID(f.aliceID).Attr.Get(ctx, "x"); events.CodeOf(err) != events.CodeNotAllowed {
		t.Fatalf("bob on alice's attributes: %v", err)
	}
	if _, err := bob.SessionAttr(f.alice.UST).Get(ctx, "x"); events.CodeOf(err) != events.CodeNotAllowed {
		t.Fatalf("bob on alice's session: %v", err)
	}
	wait := func(typ string, n int) []map[string]any {
		deadline := time.Now().Add(5 * time.Second)
		for {
			evs, _ := historyOf(t, f, f.alice.UST, map[string]any{"types": []string{typ}})
			if len(evs) >= n || time.Now().After(deadline) {
				return evs
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	failed := wait("login.failed", 3)
	if len(failed) != 3 || failed[0]["code"] != "E005001" || failed[0]["actor_name"] != "alice" || failed[2]["remote_addr"] != "127.0.0.1" {
		t.Fatalf("login.failed: %v", failed)
	}
	denied := wait("access.denied", 2)
	if len(denied) != 2 || denied[0]["actor"] != bobID || denied[0]["op"] != "user.attr.get" ||
		denied[1]["op"] != "session.attr.get" || denied[1]["session_id"] == nil {
		t.Fatalf("access.denied: %v", denied)
	}
	// A flood of refusals records at most the rate: 10 denied attempts a minute per
	// user (the three login.failed count too).
	for i := 0; i < 40; i++ {
		bob.UserByID(f.aliceID).Attr.Get(ctx, "x")
	}
	time.Sleep(300 * time.Millisecond) // records are not waited for; give them time to land
	if got := len(wait("access.denied", 7)); got != 7 {
		t.Fatalf("%d access.denied recorded after a flood, want the rate's 10 less the 3 login.failed", got)
	}
}
