package main

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/attrd/attrd/events"
)

func TestHealthzIsOKOnceServing(t *testing.T) {
	s := mustStart(t, nil)
	resp, err := http.Get("http://" + s.HTTPAddr() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("healthz: %d, want 200", resp.StatusCode)
	}
}

func TestFirstStartCreatesSuperUserWithConfiguredPassword(t *testing.T) {
	f := newFixture(t, nil)
	u, err := f.admin.User(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if !u.IsSuperUser || u.Username != "admin" {
		t.Fatalf("admin = %+v, want a super-user named admin", u)
	}
}

func TestFirstStartPrintsRandomPasswordOnceAndItWorks(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s := mustStart(t, func(c *Config) { c.AdminPassword, c.Stderr, c.DataDir = "", w, dir })
	w.Close()
	buf := make([]byte, 4096)
	n, _ := r.Read(buf)
	out := string(buf[:n])
	i := strings.Index(out, "password ")
	if i < 0 {
		t.Fatalf("no password printed: %q", out)
	}
	pw := strings.Fields(out[i+len("password "):])[0]
	mustLogin(t, mustClient(t, s), "admin", pw)

	// A second start on the same data dir has users already: nothing printed.
	s.Close()
	r2, w2, _ := os.Pipe()
	mustStart(t, func(c *Config) { c.AdminPassword, c.Stderr, c.DataDir = "", w2, dir })
	w2.Close()
	n, _ = r2.Read(buf)
	if n > 0 && strings.Contains(string(buf[:n]), "password") {
		t.Fatalf("second start printed a password: %q", buf[:n])
	}
}

func TestLoginRefusesWrongUnknownOrEmptyCredentials(t *testing.T) {
	f := newFixture(t, nil)
	for _, tc := range []struct{ user, pw string }{
		{"admin", "wrong"}, {"nobody", "x"}, {"admin", ""}, {"", adminPassword},
	} {
		_, err := f.c.Login(ctxT(t), tc.user, tc.pw)
		expectCode(t, err, events.CodeNotAllowed)
	}
}

func TestLoginWithoutFieldIsBadRequestAndUnknownAppIsE004001(t *testing.T) {
	f := newFixture(t, nil)
	hdr, body := rawJSON(t, f.srv, "user.login", map[string]any{"username": "admin", "current_app": "CRM"})
	if body["details"] != "Bad request" || hdr.Get("Nats-Service-Error-Code") != "400" {
		t.Fatalf("missing password: %v %v", hdr, body)
	}
	hdr, body = rawJSON(t, f.srv, "user.login", map[string]any{"username": "admin", "password": adminPassword})
	if body["details"] != "Bad request" || hdr.Get("Nats-Service-Error") != "Bad request" {
		t.Fatalf("missing current_app: %v %v", hdr, body)
	}
	hdr, body = rawJSON(t, f.srv, "user.login", map[string]any{"username": "admin", "password": adminPassword, "current_app": "ERP"})
	if subStatus(body) != "E004001" || body["status"] != "error" || hdr.Get("Nats-Service-Error-Code") != "200" {
		t.Fatalf("unknown app: %v %v", hdr, body)
	}
	if _, ok := body["ust"]; ok {
		t.Fatal("unknown app got a ust")
	}
}

func TestLogoutIsAlwaysOKAndEndsTheSession(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	if err := f.c.Resume("not-a-session").Logout(ctx); err != nil {
		t.Fatalf("logout of a bad UST: %v", err)
	}
	if err := f.alice.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	_, err := f.alice.User(ctx)
	expectCode(t, err, events.CodeNoSession)
	u := f.admin.UserByID(f.aliceID)
	_, err = u.Attr.Names(ctx) // the user lives on; only the session ended
	expectCode(t, err, noError)
}

// noError is the empty code: expectCode(t, err, noError) wants success.
const noError events.Code = ""

func TestWhoAmIAnswersTheSessionsUser(t *testing.T) {
	f := newFixture(t, nil)
	u, err := f.alice.User(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if u.ID != f.aliceID || u.Username != "alice" || u.IsSuperUser || u.Created.IsZero() {
		t.Fatalf("who am I = %+v", u)
	}
}

func TestOnlySuperUsersCreateAndApproveUsers(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	_, err := f.alice.CreateUser(ctx, "bob", "pw", false)
	expectCode(t, err, events.CodeNotAllowed)
	expectCode(t, f.alice.ApproveUser(ctx, f.aliceID), events.CodeNotAllowed)

	_, err = f.admin.CreateUser(ctx, "alice", "again", false)
	expectCode(t, err, events.CodeUsernameExists)

	bob, err := f.admin.CreateUser(ctx, "bob", "bob-pw", true)
	if err != nil {
		t.Fatal(err)
	}
	// Zato clients create, then approve: approving an approved user is ok.
	expectCode(t, f.admin.ApproveUser(ctx, bob), noError)
	expectCode(t, f.admin.ApproveUser(ctx, bob), noError)
	expectCode(t, f.admin.ApproveUser(ctx, "01NOSUCHUSER000000000000000"), events.CodeNotAllowed)
	b := mustLogin(t, f.c, "bob", "bob-pw")
	if u, _ := b.User(ctx); !u.IsSuperUser {
		t.Fatal("bob was created a super-user")
	}
}

func TestRenewExtendsTheSessionAndExpiredSessionsAreGone(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.SessionTTL = 2 * time.Second })
	ctx := ctxT(t)
	before := time.Now()
	exp, err := f.alice.Renew(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if exp.Before(before.Add(1500*time.Millisecond)) || exp.After(time.Now().Add(2*time.Second)) {
		t.Fatalf("renewed until %v, want about now+2s", exp)
	}
	time.Sleep(time.Until(exp) + 100*time.Millisecond) // expiry test: a sleep is the point
	_, err = f.alice.User(ctx)
	expectCode(t, err, events.CodeNoSession)
	_, err = f.alice.Renew(ctx)
	expectCode(t, err, events.CodeNoSession)
}

func TestRestartOnSameDataDirGoesOnWhereItStopped(t *testing.T) {
	dir := t.TempDir()
	s := mustStart(t, func(c *Config) { c.DataDir = dir })
	c := mustClient(t, s)
	sess := mustLogin(t, c, "admin", adminPassword)
	u, _ := sess.User(ctxT(t))
	if err := u.Attr.Create(ctxT(t), "kept", 42); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	s2 := mustStart(t, func(c *Config) { c.DataDir = dir })
	c2 := mustClient(t, s2)
	sess2 := c2.Resume(sess.UST) // sessions survive a restart
	u2, err := sess2.User(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	a, err := u2.Attr.Get(ctxT(t), "kept")
	if err != nil || !a.Found || string(a.Value) != "42" {
		t.Fatalf("after restart: %+v %v", a, err)
	}
	if err := u2.Attr.Update(ctxT(t), "kept", 43); err != nil {
		t.Fatalf("write after restart: %v", err)
	}
}

func TestUserCreateCommandCreatesAUserOnARunningServer(t *testing.T) {
	s := mustStart(t, nil)
	in, w, _ := os.Pipe()
	go func() { w.WriteString("carol-pw\n"); w.Close() }()
	out, err := os.CreateTemp(t.TempDir(), "out")
	if err != nil {
		t.Fatal(err)
	}
	// Without the internal credential the tool cannot reach the stream: a clear refusal.
	code := run(context.Background(), []string{"user", "create", "--username", "carol", "--nats-url", s.ClientURL(),
		"--creds", filepath.Join(t.TempDir(), "none")}, strings.NewReader("carol-pw\n"), out, out)
	if b, _ := os.ReadFile(out.Name()); code == 0 || !strings.Contains(string(b), "internal account") {
		t.Fatalf("without the credential: exit %d: %s", code, b)
	}
	code = run(context.Background(), withToolCreds([]string{"user", "create", "--username", "carol", "--nats-url", s.ClientURL()}), in, out, out)
	if code != 0 {
		b, _ := os.ReadFile(out.Name())
		t.Fatalf("exit %d: %s", code, b)
	}
	mustLogin(t, mustClient(t, s), "carol", "carol-pw")
}
