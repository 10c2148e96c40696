package main

import (
	"bytes"
	"encoding/base64"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

func TestEncryptedValuesReadPlainOrAsCiphertextAndPlaintextIsNowhereOnDisk(t *testing.T) {
	dir := t.TempDir()
	f := newFixture(t, func(c *Config) { c.DataDir = dir })
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	const secret = "plaintext-needle-7c1f9a"
	const secret2 = "second-needle-b83e1d"
	expectCode(t, u.Attr.Create(ctx, "card", secret, client.Encrypt(true)), noError)
	got, err := u.Attr.Get(ctx, "card")
	if err != nil || !got.IsEncrypted || string(got.Value) != `"`+secret+`"` {
		t.Fatalf("decrypting get: %+v %v", got, err)
	}
	raw, _ := u.Attr.Get(ctx, "card", client.Decrypt(false))
	var b64 string
	if raw.Decode(&b64) != nil || !raw.IsEncrypted {
		t.Fatalf("decrypt:false: %+v", raw)
	}
	if ct, err := base64.StdEncoding.DecodeString(b64); err != nil || bytes.Contains(ct, []byte(secret)) {
		t.Fatalf("decrypt:false did not return base64 ciphertext: %q", b64)
	}
	// Update without encrypt keeps the setting: the new value is sealed too.
	expectCode(t, u.Attr.Update(ctx, "card", secret2), noError)
	if got, _ := u.Attr.Get(ctx, "card"); !got.IsEncrypted || string(got.Value) != `"`+secret2+`"` {
		t.Fatalf("update without encrypt: %+v", got)
	}
	// A batch of encrypted values through set and update_many.
	expectCode(t, u.Attr.SetMany(ctx, []client.Item{{Name: "s1", Value: secret, Encrypt: client.Bool(true)}}), noError)
	// encrypt:false re-stores plain, and the flag follows.
	expectCode(t, u.Attr.Update(ctx, "s1", "now-plain", client.Encrypt(false)), noError)
	if got, _ := u.Attr.Get(ctx, "s1", client.Decrypt(false)); got.IsEncrypted || string(got.Value) != `"now-plain"` {
		t.Fatalf("update with encrypt:false: %+v", got)
	}
	sa := f.alice.SessionAttr(f.alice.UST)
	expectCode(t, sa.Create(ctx, "sess-secret", secret2, client.Encrypt(true)), noError)

	f.srv.Close() // flush everything to disk
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, s := range []string{secret, secret2} {
			if bytes.Contains(b, []byte(s)) {
				t.Errorf("plaintext %q found in %s", s, path)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestCallersReachOnlyTheirOwnAttributesUnlessSuperUser(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	bobID, bob := f.regularUser(t, "bob")

	// alice on bob's user attributes: E005001 for every operation.
	onBob := f.alice.UserByID(bobID).Attr
	expectCode(t, onBob.Create(ctx, "x", 1), events.CodeNotAllowed)
	_, err := onBob.Get(ctx, "x")
	expectCode(t, err, events.CodeNotAllowed)
	_, err = onBob.Names(ctx)
	expectCode(t, err, events.CodeNotAllowed)
	expectCode(t, onBob.Delete(ctx, "x"), events.CodeNotAllowed)

	// The super-user reaches bob's, and an unknown user id is E005001.
	expectCode(t, f.admin.UserByID(bobID).Attr.Create(ctx, "by-admin", 1), noError)
	bu, _ := bob.User(ctx)
	if ok, _ := bu.Attr.Exists(ctx, "by-admin"); !ok {
		t.Fatal("the super-user's write is not bob's attribute")
	}
	expectCode(t, f.admin.UserByID("01NOSUCHUSER000000000000000").Attr.Create(ctx, "x", 1), events.CodeNotAllowed)

	// Session attributes: alice on bob's session is E005001; the super-user may.
	expectCode(t, f.alice.SessionAttr(bob.UST).Create(ctx, "x", 1), events.CodeNotAllowed)
	expectCode(t, f.admin.SessionAttr(bob.UST).Create(ctx, "x", 1), noError)
	// A regular user reaches the sessions of their own user.
	alice2 := mustLogin(t, f.c, "alice", "alice-pw")
	expectCode(t, alice2.SessionAttr(f.alice.UST).Create(ctx, "from-other-session", 1), noError)
	// Unknown target or current session: E007001.
	expectCode(t, f.alice.SessionAttr("no-such-ust").Create(ctx, "x", 1), events.CodeNoSession)
	expectCode(t, f.c.Resume("no-such-ust").SessionAttr(f.alice.UST).Create(ctx, "x", 1), events.CodeNoSession)
	_, err = f.c.Resume("no-such-ust").User(ctx)
	expectCode(t, err, events.CodeNoSession)
}

func TestSessionAttributesEndWithTheSession(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	other := mustLogin(t, f.c, "alice", "alice-pw")
	sa := f.alice.SessionAttr(f.alice.UST)
	expectCode(t, sa.Create(ctx, "cart", []int{1, 2}), noError)
	expectCode(t, other.SessionAttr(other.UST).Create(ctx, "cart", "other session"), noError)
	expectCode(t, f.alice.Logout(ctx), noError)
	// The logged-out session's attributes are gone: reached through another session.
	_, err := other.SessionAttr(f.alice.UST).Get(ctx, "cart")
	expectCode(t, err, events.CodeNoSession)
	got, err := other.SessionAttr(other.UST).Get(ctx, "cart")
	if err != nil || string(got.Value) != `"other session"` {
		t.Fatalf("another session's attribute: %+v %v", got, err)
	}
	// And gone from the projection itself.
	kv := mustKV(t, f.srv)
	keys, _ := kv.ListKeysFiltered(ctx, events.AttrPrefix(f.aliceID, events.SessionID(f.alice.UST))+">")
	for k := range keys.Keys() {
		t.Fatalf("key %s of a logged-out session is still in the projection", k)
	}
}

func TestSessionAttributesNeverOutliveTheirSessionUnlessRenewed(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.SessionTTL = 3 * time.Second })
	ctx := ctxT(t)
	sa := f.alice.SessionAttr(f.alice.UST)
	expectCode(t, sa.Create(ctx, "long", 1, client.Expiration(time.Hour)), noError)
	kv := mustKV(t, f.srv)
	key := events.AttrKey(f.aliceID, events.SessionID(f.alice.UST), "long")
	ttl := func() string {
		st, _ := f.srv.apiConn.JetStream()
		m, err := st.GetLastMsg(events.KVStream(events.DefaultBucket), events.KVSubject(events.DefaultBucket, key))
		if err != nil {
			t.Fatal(err)
		}
		return m.Header.Get("Nats-TTL")
	}
	start := time.Now()
	if got := ttl(); got != "3s" {
		t.Fatalf("TTL of a 1h attribute in a 3s session = %q, want 3s", got)
	}
	time.Sleep(1500 * time.Millisecond) // expiry test: renew half-way through the session
	if _, err := f.alice.Renew(ctx); err != nil {
		t.Fatal(err)
	}
	if got := ttl(); got != "3s" {
		t.Fatalf("after renew the TTL follows the session's new end: %q", got)
	}
	time.Sleep(time.Until(start.Add(3500 * time.Millisecond))) // past the first end, before the renewed one
	if _, err := kv.Get(ctx, key); err != nil {
		t.Fatalf("after renew the attribute must outlive the session's first end: %v", err)
	}
}

func TestRepeatedRequestIDReturnsTheFirstOutcomeAndAppendsNothing(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	js, _ := f.srv.apiConn.JetStream()
	count := func() uint64 {
		si, err := js.StreamInfo(events.StreamName)
		if err != nil {
			t.Fatal(err)
		}
		return si.State.Msgs
	}
	expectCode(t, u.Attr.Create(ctx, "x", 1, client.RequestID("r-1")), noError)
	n := count()
	// The same request again: the first outcome (ok), and nothing appended, even though
	// a second create would now be E009001.
	expectCode(t, u.Attr.Create(ctx, "x", 1, client.RequestID("r-1")), noError)
	if count() != n {
		t.Fatalf("a repeated request id appended an event: %d -> %d", n, count())
	}
	// Errors are replayed too.
	expectCode(t, u.Attr.Update(ctx, "y", 1, client.RequestID("r-2")), events.CodeNoAttr)
	expectCode(t, u.Attr.Create(ctx, "y", 1), noError)
	expectCode(t, u.Attr.Update(ctx, "y", 1, client.RequestID("r-2")), events.CodeNoAttr)
	// Among several decisions of the user, each retry finds its own: rejections before
	// and after an accepted request.
	expectCode(t, u.Attr.Update(ctx, "z", 1, client.RequestID("r-4")), events.CodeNoAttr)
	expectCode(t, u.Attr.Create(ctx, "z2", 1, client.RequestID("r-5")), noError)
	expectCode(t, u.Attr.Create(ctx, "z2", 1, client.RequestID("r-6")), events.CodeAttrExists)
	expectCode(t, u.Attr.Create(ctx, "z2", 1, client.RequestID("r-5")), noError)
	expectCode(t, u.Attr.Update(ctx, "z", 1, client.RequestID("r-4")), events.CodeNoAttr)
	expectCode(t, u.Attr.Create(ctx, "z2", 1, client.RequestID("r-6")), events.CodeAttrExists)
	// The same id from another caller is another request.
	bob, _ := f.admin.CreateUser(ctx, "bob", "pw", false)
	_ = bob
	b := mustLogin(t, f.c, "bob", "pw")
	bu, _ := b.User(ctx)
	expectCode(t, bu.Attr.Create(ctx, "x", 1, client.RequestID("r-1")), noError)
	if ok, _ := bu.Attr.Exists(ctx, "x"); !ok {
		t.Fatal("another caller's request with the same id was not applied")
	}
	// The Nats-Msg-Id header is the request id too.
	_, body := raw(t, f.srv, "user.attr.create", []byte(`{"ust":"`+f.alice.UST+`","current_app":"CRM","name":"h","value":1}`), nats.Header{"Nats-Msg-Id": []string{"r-3"}})
	_, body2 := raw(t, f.srv, "user.attr.create", []byte(`{"ust":"`+f.alice.UST+`","current_app":"CRM","name":"h","value":1}`), nats.Header{"Nats-Msg-Id": []string{"r-3"}})
	if body["status"] != "ok" || body2["status"] != "ok" {
		t.Fatalf("Nats-Msg-Id as request id: %v then %v", body, body2)
	}
}

func TestRepeatedRequestIDSurvivesARestart(t *testing.T) {
	dir := t.TempDir()
	f := newFixture(t, func(c *Config) { c.DataDir = dir })
	u, _ := f.alice.User(ctxT(t))
	expectCode(t, u.Attr.Update(ctxT(t), "missing", 1, client.RequestID("r-9")), events.CodeNoAttr)
	f.srv.Close()
	s2 := mustStart(t, func(c *Config) { c.DataDir = dir })
	u2 := mustClient(t, s2).Resume(f.alice.UST).UserByID(f.aliceID)
	expectCode(t, u2.Attr.Create(ctxT(t), "missing", 1), noError)
	expectCode(t, u2.Attr.Update(ctxT(t), "missing", 1, client.RequestID("r-9")), events.CodeNoAttr)
	// Reused for another request after the restart: refused, not the first outcome.
	expectCode(t, u2.Attr.Update(ctxT(t), "missing", 2, client.RequestID("r-9")), events.CodeInvalidInput)
}

func TestBadInputGetsAClearErrorAndTheServiceStaysUp(t *testing.T) {
	f := newFixture(t, nil)
	bodies := map[string][]byte{
		"garbage":   {0xff, 0x00, 0x13, 0x37},
		"truncated": []byte(`{"ust":"x","current_app":"CRM","name":"a`),
		"trailing":  []byte(`{"current_app":"CRM"} {}`),
		"array":     []byte(`[1,2]`),
		"string":    []byte(`"hello"`),
	}
	for name, b := range bodies {
		hdr, body := raw(t, f.srv, "user.attr.create", b, nil)
		if body["details"] != "Bad request" || hdr.Get("Nats-Service-Error-Code") != "400" {
			t.Fatalf("%s: %v %v", name, hdr, body)
		}
	}
	big := []byte(`{"current_app":"CRM","ust":"` + f.alice.UST + `","name":"a","value":"` + strings.Repeat("x", 2<<20) + `"}`)
	nc, _ := nats.Connect(f.srv.ClientURL())
	defer nc.Close()
	rep, err := nc.Request("attrd.user.attr.create", big, 10*time.Second)
	if err != nil {
		t.Fatalf("2 MiB body: %v", err)
	}
	if !strings.Contains(string(rep.Data), "E008002") {
		t.Fatalf("2 MiB body: %s", rep.Data)
	}
	// Still serving.
	u, _ := f.alice.User(ctxT(t))
	expectCode(t, u.Attr.Create(ctxT(t), "after", 1), noError)
}

func TestMsgpackRequestGetsAMsgpackReply(t *testing.T) {
	f := newFixture(t, nil)
	nc, _ := nats.Connect(f.srv.ClientURL())
	defer nc.Close()
	send := func(op string, body map[string]any) map[string]any {
		b, _ := msgpack.Marshal(body)
		m := &nats.Msg{Subject: "attrd." + op, Data: b, Header: nats.Header{"Content-Type": []string{"application/msgpack"}}}
		rep, err := nc.RequestMsg(m, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var out map[string]any
		if err := msgpack.Unmarshal(rep.Data, &out); err != nil {
			t.Fatalf("reply is not msgpack: %q", rep.Data)
		}
		return out
	}
	out := send("user.attr.create", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "name": "m", "value": uint64(1) << 62})
	if out["status"] != "ok" {
		t.Fatalf("create: %v", out)
	}
	out = send("user.attr.get", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "name": "m"})
	if v, ok := out["value"].(uint64); !ok && out["value"] != int64(1)<<62 || ok && v != 1<<62 {
		t.Fatalf("value through msgpack = %#v, want 1<<62", out["value"])
	}
}

// TestRequestsOnOneEndpointAreHandledConcurrently: micro calls a handler one request
// at a time per endpoint. With every batch of the projector slowed by 100ms, 20 updates
// handled one by one take over 2s; dispatched concurrently they share a few batches.
func TestRequestsOnOneEndpointAreHandledConcurrently(t *testing.T) {
	slow := projector.Hooks{BeforeCheckpoint: func(first, last uint64) error { time.Sleep(100 * time.Millisecond); return nil }}
	f := newFixture(t, func(c *Config) { c.ProjectorHooks = slow })
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "c", 0), noError)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- u.Attr.Update(ctx, "c", i)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		expectCode(t, err, noError)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("20 updates took %v: handled one at a time", d)
	}
}

// TestMalformedIDsAreRefusedNotFailed: a user_id or session_id goes into keys and
// subjects; one that is not an id is E005001 (or E008002), never a 500 or a wildcard.
func TestMalformedIDsAreRefusedNotFailed(t *testing.T) {
	f := newFixture(t, nil)
	for _, id := range []string{"*", ">", "a.b", "../x", "a b", "01ABC", strings.Repeat("Z", 26)} {
		_, body := rawJSON(t, f.srv, "user.attr.create", map[string]any{"ust": f.admin.UST, "current_app": "CRM", "user_id": id, "name": "x", "value": 1})
		if subStatus(body) != "E005001" {
			t.Fatalf("attr create for user_id %q: %v", id, body)
		}
		_, body = rawJSON(t, f.srv, "user.approve", map[string]any{"ust": f.admin.UST, "current_app": "CRM", "user_id": id})
		if subStatus(body) != "E005001" {
			t.Fatalf("approve %q: %v", id, body)
		}
		_, body = rawJSON(t, f.srv, "history.list", map[string]any{"ust": f.admin.UST, "current_app": "CRM", "user_id": id})
		if subStatus(body) != "E005001" {
			t.Fatalf("history of %q: %v", id, body)
		}
	}
	_, body := rawJSON(t, f.srv, "history.list", map[string]any{"ust": f.admin.UST, "current_app": "CRM", "session_id": "*"})
	if subStatus(body) != "E008002" {
		t.Fatalf("history of session *: %v", body)
	}
}
