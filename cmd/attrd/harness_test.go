package main

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

const adminPassword = "admin-password"

// fastPasswords keeps argon2id cheap in tests; production uses api.DefaultPasswordParams.
var fastPasswords = api.PasswordParams{Time: 1, MemoryK: 64, Threads: 1}

// testLogger discards logs unless ATTRD_TEST_LOG is set.
func testLogger() *slog.Logger {
	var level slog.Level
	if os.Getenv("ATTRD_TEST_LOG") != "" && level.UnmarshalText([]byte(os.Getenv("ATTRD_TEST_LOG"))) == nil {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	}
	return slog.New(slog.DiscardHandler)
}

// mustStart runs a whole attrd on an embedded server in a temp dir.
func mustStart(t testing.TB, mod func(*Config)) *Server {
	t.Helper()
	cfg := Config{DataDir: t.TempDir(), HTTPAddr: "127.0.0.1:0", NATSAddr: "127.0.0.1:0",
		AdminUsername: "admin", AdminPassword: adminPassword, Password: fastPasswords, Logger: testLogger()}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start attrd: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	if cfg.NATSURL == "" {
		toolCreds.Store(s.ClientURL(), credentialFile(cfg.DataDir))
	}
	return s
}

// toolCreds maps a test server's client URL to its operator credential: runCmd gives
// it to the operator tools pointed at that server, as an operator on the machine would.
var toolCreds sync.Map

// mustClient connects a client for app CRM.
func mustClient(t testing.TB, s *Server) *client.Client {
	t.Helper()
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return client.New(nc, "CRM")
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// mustLogin logs in or fails the test.
func mustLogin(t testing.TB, c *client.Client, user, pw string) *client.Session {
	t.Helper()
	s, err := c.Login(ctxT(t), user, pw)
	if err != nil {
		t.Fatalf("login %s: %v", user, err)
	}
	return s
}

// fixture is a server with a logged-in super-user and a logged-in regular user.
type fixture struct {
	srv      *Server
	c        *client.Client
	admin    *client.Session
	adminID  string
	alice    *client.Session
	aliceID  string
	aliceTok string
}

func newFixture(t testing.TB, mod func(*Config)) *fixture {
	t.Helper()
	f := &fixture{srv: mustStart(t, mod)}
	f.c = mustClient(t, f.srv)
	f.admin = mustLogin(t, f.c, "admin", adminPassword)
	u, err := f.admin.User(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	f.adminID = u.ID
	if f.aliceID, err = f.admin.CreateUser(ctxT(t), "alice", "alice-pw", false); err != nil {
		t.Fatal(err)
	}
	f.alice = mustLogin(t, f.c, "alice", "alice-pw")
	return f
}

// expectCode fails unless err carries the contract code want ("" for no error).
func expectCode(t testing.TB, err error, want events.Code) {
	t.Helper()
	if got := events.CodeOf(err); got != want {
		t.Fatalf("error %v: code %q, want %q", err, got, want)
	}
}

// raw sends a raw body to attrd.<op> and returns the reply's headers and decoded body.
func raw(t testing.TB, s *Server, op string, body []byte, hdr nats.Header) (nats.Header, map[string]any) {
	t.Helper()
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	m := &nats.Msg{Subject: "attrd." + op, Data: body, Header: hdr}
	rep, err := nc.RequestMsg(m, 10*time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", op, err)
	}
	var out map[string]any
	if err := json.Unmarshal(rep.Data, &out); err != nil {
		t.Fatalf("reply to %s is not JSON: %q", op, rep.Data)
	}
	return rep.Header, out
}

// rawJSON marshals v and sends it with raw.
func rawJSON(t testing.TB, s *Server, op string, v any) (nats.Header, map[string]any) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return raw(t, s, op, b, nil)
}

// subStatus returns the reply's first sub_status code, or "".
func subStatus(body map[string]any) string {
	ss, _ := body["sub_status"].([]any)
	if len(ss) == 0 {
		return ""
	}
	s, _ := ss[0].(string)
	return s
}

var errTest = errors.New("stopped by the test")

// mustKV opens the projection bucket.
func mustKV(t testing.TB, s *Server) jetstream.KeyValue {
	t.Helper()
	js, err := jetstream.New(s.apiConn)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(context.Background(), events.DefaultBucket)
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

// loadKeys loads a key file as a projector.Opener.
func loadKeys(path string) (*sealed.Keyring, error) { return sealed.LoadKeyFile(path) }

var jsonMarshal = json.Marshal

// regularUser creates a regular user (password name+"-pw") and logs it in.
func (f *fixture) regularUser(t testing.TB, name string) (string, *client.Session) {
	t.Helper()
	id, err := f.admin.CreateUser(ctxT(t), name, name+"-pw", false)
	if err != nil {
		t.Fatal(err)
	}
	return id, mustLogin(t, f.c, name, name+"-pw")
}
