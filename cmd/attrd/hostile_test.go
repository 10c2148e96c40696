package main

// Hostile and careless clients: every case here once crashed, wedged or starved attrd,
// or made it give a wrong answer. Each proves the service stays up and answers clearly.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/api/rest"
	"github.com/attrd/attrd/events"
)

// stillServes fails the test unless the server still answers a who-am-I and a write.
func stillServes(t *testing.T, f *fixture) {
	t.Helper()
	ctx := ctxT(t)
	if _, err := f.admin.User(ctx); err != nil {
		t.Fatalf("the service stopped answering: %v", err)
	}
	u, _ := f.admin.User(ctx)
	if err := u.Attr.Set(ctx, "still-serving", time.Now().UnixNano()); err != nil {
		t.Fatalf("writes stopped: %v", err)
	}
}

func TestDeepMsgpackOverNATSIsRefusedAndTheProcessLives(t *testing.T) {
	f := newFixture(t, nil)
	body := []byte{0x82}
	body = append(body, 0xab)
	body = append(body, "current_app"...)
	body = append(body, 0xa3, 'C', 'R', 'M', 0xa5)
	body = append(body, "value"...)
	body = append(body, bytes.Repeat([]byte{0x91}, 800_000)...)
	body = append(body, 0xc0)
	nc, err := nats.Connect(f.srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	start := time.Now()
	rep, err := nc.RequestMsg(&nats.Msg{Subject: "attrd.user.attr.create", Data: body,
		Header: nats.Header{"Content-Type": []string{"application/msgpack"}}}, 10*time.Second)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	if rep.Header.Get("Nats-Service-Error-Code") != "400" {
		t.Fatalf("want the 400 envelope, got %v %q", rep.Header, rep.Data)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("refusing took %s", d)
	}
	stillServes(t, f)
}

func TestExpirationThatOverflowsIsRefusedAndDestroysNothing(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "keep", "v"), noError)
	for _, exp := range []int64{9_000_000_000, 1 << 62} {
		_, body := rawJSON(t, f.srv, "user.attr.update", map[string]any{"ust": f.alice.UST, "current_app": "CRM",
			"name": "keep", "value": "w", "expiration": exp})
		if subStatus(body) != string(events.CodeInvalidInput) {
			t.Fatalf("expiration %d: %v, want E008002", exp, body)
		}
	}
	got, err := u.Attr.Get(ctx, "keep")
	if err != nil || !got.Found || string(got.Value) != `"v"` {
		t.Fatalf("the attribute was harmed: %+v %v", got, err)
	}
	// The largest expiration that fits works, and reads back in the far future.
	_, body := rawJSON(t, f.srv, "user.attr.update", map[string]any{"ust": f.alice.UST, "current_app": "CRM",
		"name": "keep", "value": "w", "expiration": 100 * 365 * 24 * 3600})
	if body["status"] != "ok" {
		t.Fatalf("a hundred years: %v", body)
	}
	if got, _ := u.Attr.Get(ctx, "keep"); !got.Found || got.ExpirationTime.Year() < 2100 {
		t.Fatalf("after a hundred-year update: %+v", got)
	}
}

func TestInvalidUTF8IsRefusedAndEveryReplyIsValidJSON(t *testing.T) {
	f := newFixture(t, nil)
	body := []byte(`{"ust":"` + f.alice.UST + `","current_app":"CRM","name":"bad","value":"a` + "\xff\xfe" + `b"}`)
	_, rep := raw(t, f.srv, "user.attr.create", body, nil)
	if subStatus(rep) != string(events.CodeInvalidInput) {
		t.Fatalf("invalid UTF-8 in a value: %v, want E008002", rep)
	}
	status, _, out := httpDo(t, f.srv, "POST", "/zato/sso/user/attr", body, nil)
	if status != 403 || subStatus(out) != string(events.CodeInvalidInput) {
		t.Fatalf("over REST: %d %v", status, out)
	}
	if ok, _ := mustSession(t, f).Attr.Exists(ctxT(t), "bad"); ok {
		t.Fatal("the value was stored")
	}
}

func mustSession(t *testing.T, f *fixture) *client.User {
	u, err := f.alice.User(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func TestRequestIDReusedForAnotherRequestIsRefused(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u := mustSession(t, f)
	expectCode(t, u.Attr.Create(ctx, "a", 1, client.RequestID("k1")), noError)
	// Another value, another name, another operation: each is another request.
	expectCode(t, u.Attr.Create(ctx, "a", 2, client.RequestID("k1")), events.CodeInvalidInput)
	expectCode(t, u.Attr.Create(ctx, "b", 1, client.RequestID("k1")), events.CodeInvalidInput)
	expectCode(t, u.Attr.Delete(ctx, "a", client.RequestID("k1")), events.CodeInvalidInput)
	if got, _ := u.Attr.Get(ctx, "a"); !got.Found || string(got.Value) != "1" {
		t.Fatalf("a reused id changed the attribute: %+v", got)
	}
	if ok, _ := u.Attr.Exists(ctx, "b"); ok {
		t.Fatal("a reused id created another attribute")
	}
	// The same request again is still answered with its first outcome.
	expectCode(t, u.Attr.Create(ctx, "a", 1, client.RequestID("k1")), noError)

	// Over REST: Idempotency-Key on a PUT, then on a DELETE.
	key := map[string]string{"Authorization": "Bearer " + f.alice.UST, "Idempotency-Key": "rest-k1"}
	status, _, body := httpDo(t, f.srv, "PUT", "/zato/sso/user/attr", map[string]any{"current_app": "CRM", "name": "r", "value": 1}, key)
	ok(t, status, body)
	status, _, body = httpDo(t, f.srv, "DELETE", "/zato/sso/user/attr?current_app=CRM&name=r", nil, key)
	if status != 403 || subStatus(body) != string(events.CodeInvalidInput) {
		t.Fatalf("DELETE reusing a PUT's key: %d %v", status, body)
	}
	if ok, _ := u.Attr.Exists(ctx, "r"); !ok {
		t.Fatal("the DELETE was applied or the PUT lost")
	}
}

func TestLogoutIgnoresRequestIDs(t *testing.T) {
	f := newFixture(t, nil)
	s1 := mustLogin(t, f.c, "alice", "alice-pw")
	s2 := mustLogin(t, f.c, "alice", "alice-pw")
	for _, s := range []*client.Session{s1, s2} {
		_, body := rawJSON(t, f.srv, "user.logout", map[string]any{"ust": s.UST, "current_app": "CRM", "request_id": "logout"})
		if body["status"] != "ok" {
			t.Fatalf("logout: %v", body)
		}
	}
	for i, s := range []*client.Session{s1, s2} {
		if _, err := s.User(ctxT(t)); events.CodeOf(err) != events.CodeNoSession {
			t.Fatalf("session %d still works after its logout: %v", i+1, err)
		}
	}
}

// jsonValid reports whether b is one valid JSON value.
func jsonValid(b []byte) bool { return json.Valid(bytes.TrimSpace(b)) }

func TestAuditFieldsCannotBeForgedOverRESTNorHoldControlCharactersOverNATS(t *testing.T) {
	f := newFixture(t, func(c *Config) {
		c.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	})
	forged := "1.2.3.4\tuser.created\troot\n\x1b[31m"
	st, _, b := httpDo(t, f.srv, "PUT", "/zato/sso/user/attr", map[string]any{"ust": f.alice.UST, "current_app": "CRM",
		"name": "r", "value": 1, "remote_addr": forged, "user_agent": forged},
		map[string]string{"User-Agent": "agent\tone", "X-Forwarded-For": "203.0.113.9"})
	ok(t, st, b)
	// Over NATS the body's fields are the end user's, but only as plain text.
	_, out := rawJSON(t, f.srv, "user.attr.set", map[string]any{"ust": f.alice.UST, "current_app": "CRM",
		"name": "n", "value": 1, "remote_addr": forged})
	if subStatus(out) != string(events.CodeInvalidInput) {
		t.Fatalf("control characters in remote_addr over NATS: %v", out)
	}
	_, out = rawJSON(t, f.srv, "user.attr.set", map[string]any{"ust": f.alice.UST, "current_app": "CRM",
		"name": "n", "value": 1, "user_agent": strings.Repeat("x", 513)})
	if subStatus(out) != string(events.CodeInvalidInput) {
		t.Fatalf("a 513-byte user_agent over NATS: %v", out)
	}
	_, out = rawJSON(t, f.srv, "user.attr.set", map[string]any{"ust": f.alice.UST, "current_app": "CRM",
		"name": "n", "value": 1, "remote_addr": "198.51.100.4", "user_agent": "svc-end-user/2"})
	if out["status"] != "ok" {
		t.Fatalf("plain audit fields over NATS: %v", out)
	}
	evs, _ := historyOf(t, f, f.alice.UST, map[string]any{"types": []string{"attr.set"}})
	if len(evs) != 2 {
		t.Fatalf("want 2 accepted sets in the history: %v", evs)
	}
	if evs[0]["remote_addr"] != "127.0.0.1" || evs[0]["user_agent"] != "agent\uFFFDone" {
		t.Fatalf("over REST the connection and the header are the truth: %v", evs[0])
	}
	if evs[1]["remote_addr"] != "198.51.100.4" || evs[1]["user_agent"] != "svc-end-user/2" {
		t.Fatalf("over NATS the body's fields: %v", evs[1])
	}
	code, table := runCmd(t, "history", "--user", "alice", "--nats-url", f.srv.ClientURL())
	if code != 0 || strings.Contains(table, "\x1b") || strings.Count(table, "\n") != 1+len(mustHistory(t, f)) {
		t.Fatalf("table: exit %d\n%q", code, table)
	}
}

func mustHistory(t *testing.T, f *fixture) []map[string]any {
	evs, out := historyOf(t, f, f.alice.UST, nil)
	if out["status"] != "ok" {
		t.Fatal(out)
	}
	return evs
}

func TestXForwardedForIsBelievedOnlyFromTrustedProxies(t *testing.T) {
	req := func(peer, xff string) *http.Request {
		r := httptest.NewRequest("GET", "/", nil)
		r.RemoteAddr = peer
		if xff != "" {
			r.Header.Set("X-Forwarded-For", xff)
		}
		return r
	}
	trusted := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	for _, c := range []struct{ peer, xff, want string }{
		{"192.0.2.1:5000", "203.0.113.9", "192.0.2.1"},                     // not a proxy: header ignored
		{"10.1.1.1:5000", "203.0.113.9", "203.0.113.9"},                    // a proxy: its client
		{"10.1.1.1:5000", "6.6.6.6, 203.0.113.9, 10.2.2.2", "203.0.113.9"}, // the right-most untrusted hop
		{"10.1.1.1:5000", "garbage", "10.1.1.1"},                           // nothing to believe
		{"10.1.1.1:5000", "", "10.1.1.1"},
		{"[::ffff:192.0.2.1]:1", "", "192.0.2.1"},
	} {
		if got := rest.ClientAddr(req(c.peer, c.xff), trusted); got != c.want {
			t.Fatalf("peer %s, X-Forwarded-For %q: %s, want %s", c.peer, c.xff, got, c.want)
		}
	}
}

func TestHistoryTableEscapesControlCharacters(t *testing.T) {
	for in, want := range map[string]string{"plain ü": "plain ü", "a\tb\nc": `a\x09b\x0ac`, "\x1b[31mred": `\x1b[31mred`,
		"\xff": `\xff`, "c1\u0085": `c1\xc2\x85`} {
		if got := esc(in); got != want {
			t.Fatalf("esc(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestSessionsCannotBeRenewedPastTheirMaximumLifetime(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.SessionTTL, c.SessionMaxLifetime = 2*time.Second, 3*time.Second })
	ctx := ctxT(t)
	s := mustLogin(t, f.c, "alice", "alice-pw")
	_, out := rawJSON(t, f.srv, "user.login", map[string]any{"username": "alice", "password": "alice-pw", "current_app": "CRM"})
	loginEnd, _ := time.Parse(time.RFC3339Nano, out["expiration_time"].(string))
	s = f.c.Resume(out["ust"].(string))
	time.Sleep(1500 * time.Millisecond)
	end, err := s.Renew(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := loginEnd.Add(time.Second); !end.Equal(want) {
		t.Fatalf("renewed until %s, want the cap %s (login + 3s)", end, want)
	}
	// Renewing again cannot go further.
	if again, err := s.Renew(ctx); err != nil || !again.Equal(end) {
		t.Fatalf("second renewal: %s %v, want %s", again, err, end)
	}
	time.Sleep(time.Until(end) + 100*time.Millisecond)
	if _, err := s.User(ctx); events.CodeOf(err) != events.CodeNoSession {
		t.Fatalf("the session outlived its maximum lifetime: %v", err)
	}
}

// rssBytes is this process's resident set size.
func rssBytes(t *testing.T) int64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		t.Skip("no /proc/self/statm")
	}
	var size, rss int64
	fmt.Sscan(string(b), &size, &rss)
	return rss * int64(os.Getpagesize())
}

func TestWhatOneOwnerMayHoldIsCapped(t *testing.T) {
	f := newFixture(t, func(c *Config) {
		c.Limits = api.Limits{MaxAttrsPerUser: 3, MaxAttrsPerSession: 2, MaxSessionsPerUser: 3}
	})
	ctx := ctxT(t)
	u := mustSession(t, f)
	expectCode(t, u.Attr.CreateMany(ctx, []client.Item{{Name: "a", Value: 1}, {Name: "b", Value: 1}}), noError)
	// One more fits, two more do not (all or nothing), and set of a new name counts.
	expectCode(t, u.Attr.CreateMany(ctx, []client.Item{{Name: "c", Value: 1}, {Name: "d", Value: 1}}), events.CodeInvalidInput)
	expectCode(t, u.Attr.Set(ctx, "c", 1), noError)
	expectCode(t, u.Attr.Set(ctx, "d", 1), events.CodeInvalidInput)
	// Updating and setting what exists is not adding.
	expectCode(t, u.Attr.Set(ctx, "c", 2), noError)
	expectCode(t, u.Attr.Update(ctx, "a", 2), noError)
	// Deleting frees a place; an expired attribute holds none.
	expectCode(t, u.Attr.Delete(ctx, "b"), noError)
	expectCode(t, u.Attr.Create(ctx, "short", 1, client.Expiration(time.Second)), noError)
	time.Sleep(1100 * time.Millisecond)
	expectCode(t, u.Attr.Create(ctx, "d", 1), noError)
	// Sessions: each counts on its own.
	sa := f.alice.SessionAttr(f.alice.UST)
	expectCode(t, sa.CreateMany(ctx, []client.Item{{Name: "x", Value: 1}, {Name: "y", Value: 1}}), noError)
	expectCode(t, sa.Create(ctx, "z", 1), events.CodeInvalidInput)
	// Live sessions per user: alice has one; two more fit, a fourth does not, a logout frees one.
	s2 := mustLogin(t, f.c, "alice", "alice-pw")
	mustLogin(t, f.c, "alice", "alice-pw")
	if _, err := f.c.Login(ctx, "alice", "alice-pw"); events.CodeOf(err) != events.CodeInvalidInput {
		t.Fatalf("a fourth live session: %v, want E008002", err)
	}
	expectCode(t, s2.Logout(ctx), noError)
	mustLogin(t, f.c, "alice", "alice-pw")
	// Other users are not affected.
	au, _ := f.admin.User(ctx)
	expectCode(t, au.Attr.CreateMany(ctx, []client.Item{{Name: "a", Value: 1}, {Name: "b", Value: 1}, {Name: "c", Value: 1}}), noError)
}

// TestAUserWithAHugeSessionCannotStopOtherUsersWrites is the poison event of old: a
// regular user fills its session with thousands of attributes under long names (no
// cap configured), then renews it and logs out. Every other user's writes go on.
func TestAUserWithAHugeSessionCannotStopOtherUsersWrites(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 15,000 attributes")
	}
	f := newFixture(t, func(c *Config) { c.Limits = api.Limits{MaxAttrsPerSession: -1} })
	ctx := ctxT(t)
	sa := f.alice.SessionAttr(f.alice.UST)
	for b := 0; b < 15; b++ {
		items := make([]client.Item, 1000)
		for i := range items {
			items[i] = client.Item{Name: fmt.Sprintf("%02d-%03d-%s", b, i, strings.Repeat("n", 184)), Value: i}
		}
		expectCode(t, sa.SetMany(ctx, items), noError)
	}
	if _, err := f.alice.Renew(ctx); err != nil {
		t.Fatalf("renewing the huge session: %v", err)
	}
	stillServes(t, f)
	expectCode(t, f.alice.Logout(ctx), noError)
	stillServes(t, f)
	if _, err := f.c.Login(ctx, "alice", "alice-pw"); err != nil {
		t.Fatalf("logins after the logout: %v", err)
	}
}

func TestNamesArePagedAndListOnlyLiveNames(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.Limits = api.Limits{MaxReplyBytes: 64 << 10} })
	ctx := ctxT(t)
	u := mustSession(t, f)
	want := map[string]bool{}
	for b := 0; b < 2; b++ {
		items := make([]client.Item, 500)
		for i := range items {
			items[i] = client.Item{Name: fmt.Sprintf("%d-%03d-%s", b, i, strings.Repeat("ü", 80)), Value: i}
			want[items[i].Name] = true
		}
		expectCode(t, u.Attr.SetMany(ctx, items), noError)
	}
	expectCode(t, u.Attr.Create(ctx, "gone", 1, client.Expiration(time.Second)), noError)
	expectCode(t, u.Attr.Create(ctx, "deleted", 1), noError)
	expectCode(t, u.Attr.Delete(ctx, "deleted"), noError)
	time.Sleep(1100 * time.Millisecond)
	// 1,000 names of ~165 bytes do not fit in 64 KiB: the unpaged form is refused.
	_, out := rawJSON(t, f.srv, "user.attr.names", map[string]any{"ust": f.alice.UST, "current_app": "CRM"})
	if subStatus(out) != string(events.CodeInvalidInput) {
		t.Fatalf("an unpaged listing over the reply limit: %v", out)
	}
	got := map[string]bool{}
	after := ""
	for pages := 0; ; pages++ {
		body := map[string]any{"ust": f.alice.UST, "current_app": "CRM", "limit": 300}
		if after != "" {
			body["after"] = after
		}
		_, out := rawJSON(t, f.srv, "user.attr.names", body)
		if out["status"] != "ok" || pages > 10 {
			t.Fatalf("page %d: %v", pages, out)
		}
		var prev string
		for _, n := range out["result"].([]any) {
			s := n.(string)
			if s <= prev || got[s] {
				t.Fatalf("page %d is not sorted or repeats %q", pages, s)
			}
			prev, got[s] = s, true
		}
		next, more := out["next"].(string)
		if !more {
			break
		}
		after = next
	}
	if len(got) != len(want) {
		t.Fatalf("paged names: %d, want %d (no expired, no deleted)", len(got), len(want))
	}
	for n := range want {
		if !got[n] {
			t.Fatalf("%q missing from the pages", n)
		}
	}
	// A small listing still comes whole, as Zato clients expect.
	b := mustLogin(t, f.c, "admin", adminPassword)
	bu, _ := b.User(ctx)
	expectCode(t, bu.Attr.Create(ctx, "one", 1), noError)
	if names, err := bu.Attr.Names(ctx); err != nil || len(names) != 1 || names[0] != "one" {
		t.Fatalf("a small listing: %v %v", names, err)
	}
}

func TestGetAndHistoryRepliesStayUnderTheReplyLimit(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.Limits = api.Limits{MaxReplyBytes: 256 << 10} })
	ctx := ctxT(t)
	u := mustSession(t, f)
	big := strings.Repeat("v", 60<<10)
	var names []string
	for i := 0; i < 8; i++ {
		names = append(names, fmt.Sprintf("big-%d", i))
		expectCode(t, u.Attr.Create(ctx, names[i], big), noError)
	}
	_, out := rawJSON(t, f.srv, "user.attr.get", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "data": names})
	if subStatus(out) != string(events.CodeInvalidInput) {
		t.Fatalf("a get of 8 x 60 KiB under a 256 KiB reply limit: %v", out)
	}
	_, out = rawJSON(t, f.srv, "user.attr.get", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "data": names[:3]})
	if out["status"] != "ok" {
		t.Fatalf("three of them fit: %v", out)
	}
	// The history pages by bytes even when the limit asks for more events.
	evs, out := historyOf(t, f, f.alice.UST, map[string]any{"limit": 1000, "types": []string{"attr.created"}})
	if len(evs) == 0 || len(evs) >= 8 || out["next"] == nil {
		t.Fatalf("history of 8 x 60 KiB events under 256 KiB: %d events, next %v", len(evs), out["next"])
	}
	_, out = rawJSON(t, f.srv, "history.at", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "at": time.Now().Format(time.RFC3339Nano)})
	if subStatus(out) != string(events.CodeInvalidInput) {
		t.Fatalf("history.at over the reply limit: %v", out)
	}
	stillServes(t, f)
}

// TestLargeHistoriesInParallelDoNotFailOtherUsers: many history reads of a large history
// at once are bounded (some are refused as busy) and other users' writes go on.
func TestLargeHistoriesInParallelDoNotFailOtherUsers(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a large history")
	}
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u := mustSession(t, f)
	val := strings.Repeat("x", 1000)
	for b := 0; b < 3; b++ {
		items := make([]client.Item, 1000)
		for i := range items {
			items[i] = client.Item{Name: fmt.Sprintf("%d-%d", b, i), Value: val}
		}
		expectCode(t, u.Attr.SetMany(ctx, items), noError)
	}
	var wg sync.WaitGroup
	var okN, busyN, otherN atomic.Int64
	at := time.Now().Format(time.RFC3339Nano)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, _ := json.Marshal(map[string]any{"ust": f.alice.UST, "current_app": "CRM", "at": at})
			nc, err := nats.Connect(f.srv.ClientURL())
			if err != nil {
				otherN.Add(1)
				return
			}
			defer nc.Close()
			rep, err := nc.Request("attrd.history.at", b, 30*time.Second)
			if err != nil {
				otherN.Add(1)
				return
			}
			var out map[string]any
			json.Unmarshal(rep.Data, &out)
			switch {
			case out["status"] == "ok":
				okN.Add(1)
			case subStatus(out) == string(events.CodeOutcomeUnknown):
				busyN.Add(1)
			default:
				otherN.Add(1)
			}
		}()
	}
	au, _ := f.admin.User(ctx)
	for i := 0; i < 10; i++ {
		start := time.Now()
		if err := au.Attr.Set(ctx, "meanwhile", i); err != nil {
			t.Fatalf("another user's write during the history reads: %v", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("another user's write took %s", d)
		}
	}
	wg.Wait()
	if otherN.Load() != 0 || okN.Load() == 0 {
		t.Fatalf("history reads: %d ok, %d busy, %d failed", okN.Load(), busyN.Load(), otherN.Load())
	}
	t.Logf("history reads: %d ok, %d busy", okN.Load(), busyN.Load())
}

// TestNamesReadTheExpiryOfRecordsOfAnOlderAttrd: a listing reads expiries from headers;
// a record without the expiry header but with a TTL (as an older attrd wrote every
// attribute record with a TTL) is read whole, so that one expired but not yet removed by
// the server is not listed, while a record with neither never expires.
func TestNamesReadTheExpiryOfRecordsOfAnOlderAttrd(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u := mustSession(t, f)
	expectCode(t, u.Attr.Create(ctx, "plain", 1), noError)
	js, err := jetstream.New(f.srv.apiConn)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UnixNano()
	for name, exp := range map[string]int64{"old-live": now + int64(time.Hour), "old-expired": now - int64(time.Second)} {
		data, err := msgpack.Marshal(map[string]any{"val": []byte("1"), "created": now, "mod": now, "exp": exp, "seq": uint64(1)})
		if err != nil {
			t.Fatal(err)
		}
		m := &nats.Msg{Subject: events.KVSubject(events.DefaultBucket, events.AttrKey(f.aliceID, "", name)), Data: data}
		if _, err := js.PublishMsg(ctx, m, jetstream.WithMsgTTL(time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
	_, out := rawJSON(t, f.srv, "user.attr.names", map[string]any{"ust": f.alice.UST, "current_app": "CRM"})
	got := map[string]bool{}
	for _, n := range out["result"].([]any) {
		got[n.(string)] = true
	}
	if !got["plain"] || !got["old-live"] || got["old-expired"] {
		t.Fatalf("names: %v (want plain and old-live, not old-expired)", out["result"])
	}
}
