package main

import (
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
)

// historyOf asks for a history over NATS with the given fields.
func historyOf(t *testing.T, f *fixture, ust string, fields map[string]any) ([]map[string]any, map[string]any) {
	t.Helper()
	body := map[string]any{"ust": ust, "current_app": "CRM"}
	for k, v := range fields {
		body[k] = v
	}
	_, out := rawJSON(t, f.srv, "history.list", body)
	if out["status"] != "ok" {
		return nil, out
	}
	var evs []map[string]any
	for _, e := range out["events"].([]any) {
		evs = append(evs, e.(map[string]any))
	}
	return evs, out
}

func TestHistoryShowsEveryEventWithItsDecisionAndChange(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "a", 1), noError)
	expectCode(t, u.Attr.Create(ctx, "a", 2), events.CodeAttrExists)
	// Over REST, with a user agent to find in the history; the address is the
	// connection's (a remote_addr in the body is the caller's claim, and ignored).
	st, _, b := httpDo(t, f.srv, "PATCH", "/zato/sso/user/attr", map[string]any{"ust": f.alice.UST, "current_app": "CRM",
		"name": "a", "value": "two", "expiration": 60, "remote_addr": "192.0.2.7"}, map[string]string{"User-Agent": "probe/1"})
	ok(t, st, b)
	restCID := b["cid"].(string)
	expectCode(t, u.Attr.Update(ctx, "nope", 1), events.CodeNoAttr)
	expectCode(t, u.Attr.Create(ctx, "secret", "hidden-needle", client.Encrypt(true)), noError)
	expectCode(t, f.admin.UserByID(f.aliceID).Attr.Delete(ctx, "a"), noError)

	evs, out := historyOf(t, f, f.alice.UST, map[string]any{"types": []string{"attr.created", "attr.updated", "attr.deleted"}})
	if len(evs) != 6 {
		t.Fatalf("%d attribute events, want 6: %v", len(evs), out)
	}
	want := []struct{ typ, decision, code string }{
		{"attr.created", "accepted", ""}, {"attr.created", "rejected", "E009001"}, {"attr.updated", "accepted", ""},
		{"attr.updated", "rejected", "E009002"}, {"attr.created", "accepted", ""}, {"attr.deleted", "accepted", ""},
	}
	var last float64
	for i, w := range want {
		e := evs[i]
		code, _ := e["code"].(string)
		if e["type"] != w.typ || e["decision"] != w.decision || code != w.code {
			t.Fatalf("event %d: %v, want %+v", i, e, w)
		}
		if seq := e["seq"].(float64); seq <= last {
			t.Fatalf("events out of order: %v after %v", seq, last)
		}
		last = e["seq"].(float64)
		if _, err := time.Parse(time.RFC3339Nano, e["time"].(string)); err != nil || e["app"] != "CRM" || e["cid"] == nil {
			t.Fatalf("event %d lacks time, app or cid: %v", i, e)
		}
	}
	upd := evs[2]
	if upd["cid"] != restCID || upd["remote_addr"] != "127.0.0.1" || upd["user_agent"] != "probe/1" || upd["actor"] != f.aliceID {
		t.Fatalf("the update's metadata: %v (cid %s)", upd, restCID)
	}
	ch := upd["changes"].([]any)[0].(map[string]any)
	if ch["name"] != "a" || ch["value"] != "two" || ch["expiration_time"] == nil {
		t.Fatalf("the update's change: %v", ch)
	}
	if evs[5]["actor"] != f.adminID {
		t.Fatalf("the super-user's delete shows its actor: %v", evs[5])
	}
	sec := evs[4]["changes"].([]any)[0].(map[string]any)
	if _, shown := sec["value"]; shown || sec["value_encrypted"] != true || strings.Contains(toJSON(evs), "hidden-needle") {
		t.Fatalf("an encrypted value shows without decrypt: %v", sec)
	}
	evs, _ = historyOf(t, f, f.alice.UST, map[string]any{"name": "secret", "decrypt": true})
	if len(evs) != 1 || evs[0]["changes"].([]any)[0].(map[string]any)["value"] != "hidden-needle" {
		t.Fatalf("decrypt:true: %v", evs)
	}
	// An update that keeps the encryption stays hidden too.
	expectCode(t, u.Attr.Update(ctx, "secret", "second-needle"), noError)
	evs, _ = historyOf(t, f, f.alice.UST, map[string]any{"name": "secret"})
	if last := evs[len(evs)-1]["changes"].([]any)[0].(map[string]any); last["value_encrypted"] != true || strings.Contains(toJSON(evs), "second-needle") {
		t.Fatalf("an update of an encrypted attribute without encrypt shows its value: %v", last)
	}
}

func TestHistoryFiltersAndPages(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	for i := 0; i < 5; i++ {
		expectCode(t, u.Attr.Set(ctx, "a", i), noError)
	}
	mid := time.Now()
	expectCode(t, u.Attr.Set(ctx, "b", 1), noError)
	sa := f.alice.SessionAttr(f.alice.UST)
	expectCode(t, sa.Set(ctx, "a", "in-session"), noError)

	byName, _ := historyOf(t, f, f.alice.UST, map[string]any{"name": "a"})
	if len(byName) != 5 {
		t.Fatalf("history of user attribute a: %d events, want 5", len(byName))
	}
	sid := events.SessionID(f.alice.UST)
	sess, _ := historyOf(t, f, f.alice.UST, map[string]any{"session_id": sid})
	if len(sess) != 2 || sess[0]["type"] != "session.created" || sess[1]["type"] != "attr.set" {
		t.Fatalf("history of the session: %v", sess)
	}
	sessAttr, _ := historyOf(t, f, f.alice.UST, map[string]any{"target_ust": f.alice.UST, "name": "a"})
	if len(sessAttr) != 1 {
		t.Fatalf("history of session attribute a: %v", sessAttr)
	}
	since, _ := historyOf(t, f, f.alice.UST, map[string]any{"since": mid.Format(time.RFC3339Nano)})
	if len(since) != 2 {
		t.Fatalf("since the middle: %d events, want 2", len(since))
	}
	until, _ := historyOf(t, f, f.alice.UST, map[string]any{"until": mid.Format(time.RFC3339Nano), "types": []string{"attr.set"}})
	if len(until) != 5 {
		t.Fatalf("until the middle: %d events, want 5", len(until))
	}
	var all []map[string]any
	page := map[string]any{"limit": 3}
	for i := 0; i < 10; i++ {
		evs, out := historyOf(t, f, f.alice.UST, page)
		all = append(all, evs...)
		next, more := out["next"]
		if !more {
			break
		}
		page = map[string]any{"limit": 3, "after": next}
	}
	everything, _ := historyOf(t, f, f.alice.UST, map[string]any{"limit": 1000})
	if len(all) != len(everything) || len(all) < 9 {
		t.Fatalf("paged %d events, unpaged %d", len(all), len(everything))
	}
	for _, bad := range []map[string]any{{"since": "yesterday"}, {"types": []string{"attr.exploded"}}, {"limit": 0}, {"limit": 1001}} {
		_, out := historyOf(t, f, f.alice.UST, bad)
		if subStatus(out) != "E008002" {
			t.Fatalf("%v: %v", bad, out)
		}
	}
}

func TestHistoryIsOwnForRegularUsersAnyoneForSuperUsers(t *testing.T) {
	f := newFixture(t, nil)
	_, out := historyOf(t, f, f.alice.UST, map[string]any{"user_id": f.adminID})
	if subStatus(out) != "E005001" {
		t.Fatalf("alice reading admin's history: %v", out)
	}
	evs, out := historyOf(t, f, f.admin.UST, map[string]any{"user_id": f.aliceID})
	if out != nil && out["status"] != "ok" || len(evs) < 2 || evs[0]["type"] != "user.created" {
		t.Fatalf("the super-user reading alice's: %v %v", evs, out)
	}
	// Over REST too, with a bearer token and the query string.
	st, _, b := httpDo(t, f.srv, "GET", "/attrd/history?"+url.Values{"current_app": {"CRM"}, "user_id": {f.adminID}}.Encode(), nil,
		map[string]string{"Authorization": "Bearer " + f.alice.UST})
	refused(t, st, b, 403, "E005001")
	st, _, b = httpDo(t, f.srv, "GET", "/attrd/history?"+url.Values{"current_app": {"CRM"}, "types": {"session.created"}}.Encode(), nil,
		map[string]string{"Authorization": "Bearer " + f.alice.UST})
	ok(t, st, b)
	if evs := b["events"].([]any); len(evs) != 1 {
		t.Fatalf("alice's logins over REST: %v", b)
	}
}

func TestPointInTimeReadsShowAttributesAsTheyWere(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "a", 1), noError)
	expectCode(t, u.Attr.Create(ctx, "short", 1, client.Expiration(time.Second)), noError)
	expectCode(t, u.Attr.Create(ctx, "secret", "s1", client.Encrypt(true)), noError)
	t1 := time.Now()
	time.Sleep(1100 * time.Millisecond) // expiry test: "short" expires between t1 and t2
	expectCode(t, u.Attr.Update(ctx, "a", 2), noError)
	expectCode(t, u.Attr.Delete(ctx, "secret"), noError)
	t2 := time.Now()
	at := func(ts time.Time, extra map[string]any) map[string]any {
		body := map[string]any{"ust": f.alice.UST, "current_app": "CRM", "at": ts.Format(time.RFC3339Nano)}
		for k, v := range extra {
			body[k] = v
		}
		_, out := rawJSON(t, f.srv, "history.at", body)
		if out["status"] != "ok" {
			t.Fatalf("at %v: %v", ts, out)
		}
		return out["result"].(map[string]any)
	}
	r1 := at(t1, nil)
	if r1["a"].(map[string]any)["value"] != 1.0 || r1["short"] == nil || r1["secret"].(map[string]any)["value"] != "s1" {
		t.Fatalf("at t1: %v", r1)
	}
	r2 := at(t2, nil)
	if r2["a"].(map[string]any)["value"] != 2.0 || r2["short"] != nil || r2["secret"] != nil {
		t.Fatalf("at t2: %v", r2)
	}
	cur, _ := u.Attr.Get(ctx, "a")
	if got := r2["a"].(map[string]any); got["last_modified"] != cur.LastModified.Format(time.RFC3339Nano) {
		t.Fatalf("point-in-time fields differ from get: %v vs %+v", got, cur)
	}
	if r := at(t1, map[string]any{"decrypt": false}); r["secret"].(map[string]any)["value"] == "s1" {
		t.Fatalf("decrypt:false shows plaintext: %v", r)
	}
	// A session's attributes at a time, and a session that had ended.
	sa := f.alice.SessionAttr(f.alice.UST)
	expectCode(t, sa.Set(ctx, "cart", 3), noError)
	t3 := time.Now()
	expectCode(t, f.alice.Logout(ctx), noError)
	other := mustLogin(t, f.c, "alice", "alice-pw")
	_, out := rawJSON(t, f.srv, "history.at", map[string]any{"ust": other.UST, "current_app": "CRM", "at": t3.Format(time.RFC3339Nano), "target_ust": f.alice.UST})
	if out["status"] != "ok" || out["result"].(map[string]any)["cart"].(map[string]any)["value"] != 3.0 {
		t.Fatalf("the logged-out session's attributes before the logout: %v", out)
	}
	_, out = rawJSON(t, f.srv, "history.at", map[string]any{"ust": other.UST, "current_app": "CRM", "at": time.Now().Format(time.RFC3339Nano), "target_ust": f.alice.UST})
	if subStatus(out) != "E007001" {
		t.Fatalf("a session that had ended: %v", out)
	}
	_, out = rawJSON(t, f.srv, "history.at", map[string]any{"ust": other.UST, "current_app": "CRM"})
	if out["details"] != "Bad request" {
		t.Fatalf("no at: %v", out)
	}
}

func toJSON(v any) string {
	b, _ := jsonMarshal(v)
	return string(b)
}

func TestHistoryCommandPrintsATableOrJSON(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "theme", "dark"), noError)
	expectCode(t, u.Attr.Update(ctx, "nope", 1), events.CodeNoAttr)
	key := "--encryption-key-file=" + filepath.Join(f.srv.cfg.DataDir, "encryption.key")
	code, out := runCmd(t, "history", "--user", "alice", "--nats-url", f.srv.ClientURL(), key)
	if code != 0 || !strings.Contains(out, "DECISION") || !strings.Contains(out, `theme="dark"`) || !strings.Contains(out, "rejected E009002") {
		t.Fatalf("table: exit %d\n%s", code, out)
	}
	// Values are personal data, sealed in the log: without the key file they do not show.
	code, out = runCmd(t, "history", "--user", "alice", "--nats-url", f.srv.ClientURL())
	if code != 0 || strings.Contains(out, "dark") || !strings.Contains(out, "rejected E009002") {
		t.Fatalf("table without the key file: exit %d\n%s", code, out)
	}
	code, out = runCmd(t, "history", "--user", f.aliceID, "--attr", "theme", "--json", "--nats-url", f.srv.ClientURL())
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) != 1 || !strings.Contains(lines[0], `"type":"attr.created"`) {
		t.Fatalf("json: exit %d\n%s", code, out)
	}
	code, out = runCmd(t, "history", "--user", "alice", "--at", time.Now().Format(time.RFC3339Nano), "--nats-url", f.srv.ClientURL(), key)
	if code != 0 || !strings.Contains(out, "theme") || !strings.Contains(out, `"dark"`) {
		t.Fatalf("--at: exit %d\n%s", code, out)
	}
	code, out = runCmd(t, "history", "--user", "alice", "--at", time.Now().Format(time.RFC3339Nano), "--nats-url", f.srv.ClientURL())
	if code != 0 || !strings.Contains(out, "theme") || !strings.Contains(out, "<sealed>") || strings.Contains(out, "dark") {
		t.Fatalf("--at without the key file: exit %d\n%s", code, out)
	}
}
