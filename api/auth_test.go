package api

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
)

// TestACachedSessionThatLooksEndedIsCheckedAgainstKV: another instance may have renewed
// the session a moment ago; the cache alone must not refuse it.
func TestACachedSessionThatLooksEndedIsCheckedAgainstKV(t *testing.T) {
	ns, err := embedded.Start(embedded.Options{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	ctx := context.Background()
	js, _ := jetstream.New(nc)
	_, kv, err := events.EnsureStore(ctx, js, events.DefaultStoreConfig())
	if err != nil {
		t.Fatal(err)
	}
	uid, ust := events.NewID(), NewUST()
	sid := events.SessionID(ust)
	now := time.Now()
	user := &events.UserRecord{UserID: uid, Username: "u", Approved: true}
	renewed := &events.SessionRecord{UserID: uid, ExpiresAt: now.Add(time.Hour).UnixNano()}
	for key, rec := range map[string]any{events.UserKey(uid): user, events.SessionKey(sid): renewed} {
		b, _ := events.Marshal(rec)
		if _, err := kv.Put(ctx, key, b); err != nil {
			t.Fatal(err)
		}
	}
	svc, err := New(ctx, nc, Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	// The cache still holds the session as it was before the renewal, ended a second ago.
	svc.sessions.put(sid, &events.SessionRecord{UserID: uid, ExpiresAt: now.Add(-time.Second).UnixNano()}, user)
	c, err := svc.authenticate(ctx, ust)
	if err != nil {
		t.Fatalf("a renewed session refused from a stale cache: %v", err)
	}
	if c.session.ExpiresAt != renewed.ExpiresAt {
		t.Fatalf("authenticated with %v, want the renewed end", c.session.ExpiresAt)
	}
	if _, err := svc.authenticate(ctx, NewUST()); events.CodeOf(err) != events.CodeNoSession {
		t.Fatalf("an unknown UST: %v", err)
	}
}
