package main

// Hostile and careless clients: every case here once crashed, wedged or starved attrd,
// or made it give a wrong answer. Each proves the service stays up and answers clearly.

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/attrd/attrd/api/client"
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

var _ = strings.Repeat
var _ = http.StatusOK
