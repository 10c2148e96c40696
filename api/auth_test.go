package api

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/deploy/embedded/embeddedtest"
	"github.com/attrd/attrd/events"
)

// TestACachedSessionThatLooksEndedIsCheckedAgainstKV: another instance may have renewed
// the session a moment ago; the cache alone must not refuse it.
func TestACachedSessionThatLooksEndedIsCheckedAgainstKV(t *testing.T) {
	svc, ust, user, renewed, _ := serviceWithSession(t)
	ctx := context.Background()
	uid, sid, now := user.UserID, events.SessionID(ust), time.Now()
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

// TestAWriteAuthenticatesFromAnAgedCacheWhenKVCannotAnswer: a NATS node healed from
// a network cut answers KV reads "temporarily unavailable" for seconds while it
// already takes events; a write then takes the cache's older word (the fold checks the
// session again), a read does not, and a session the cache never saw is not taken.
func TestAWriteAuthenticatesFromAnAgedCacheWhenKVCannotAnswer(t *testing.T) {
	svc, ust, user, _, ns := serviceWithSession(t)
	ctx := context.Background()
	if _, err := svc.authenticate(ctx, ust); err != nil { // cached now
		t.Fatal(err)
	}
	svc.sessions.maxAge = 0 // every entry aged: KV is asked first
	if err := ns.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := svc.authenticate(rctx, ust)
	if err != nil {
		t.Fatalf("a write refused with a cached live session while KV cannot answer: %v", err)
	}
	if c.user.UserID != user.UserID {
		t.Fatalf("authenticated as %s, want %s", c.user.UserID, user.UserID)
	}
	read := context.WithValue(rctx, readKey{}, true)
	if _, err := svc.authenticate(read, ust); err == nil || !Unavailable(err) {
		t.Fatalf("a read authenticated without KV: %v, want KV's error", err)
	}
	if _, err := svc.authenticate(rctx, NewUST()); err == nil || !Unavailable(err) {
		t.Fatalf("an uncached session authenticated without KV: %v, want KV's error", err)
	}
}

// embeddedStore starts an embedded server with attrd's stream and bucket, and returns
// it, a connection to it and the bucket.
func embeddedStore(t *testing.T) (*server.Server, *nats.Conn, jetstream.KeyValue) {
	t.Helper()
	ns, nc := embeddedtest.Start(t, embedded.Options{})
	js, _ := jetstream.New(nc)
	_, kv, err := events.EnsureStore(context.Background(), js, events.DefaultStoreConfig())
	if err != nil {
		t.Fatal(err)
	}
	return ns, nc, kv
}

// serviceWithSession starts an embedded server with the stream and bucket, stores a
// user with a session an hour long, and returns a Service on it with the session's UST.
func serviceWithSession(t *testing.T) (*Service, string, *events.UserRecord, *events.SessionRecord, *server.Server) {
	t.Helper()
	ns, nc, kv := embeddedStore(t)
	ctx := context.Background()
	uid, ust := events.NewID(), NewUST()
	sid := events.SessionID(ust)
	user := &events.UserRecord{UserID: uid, Username: "u", Approved: true}
	sess := &events.SessionRecord{UserID: uid, ExpiresAt: time.Now().Add(time.Hour).UnixNano()}
	for key, rec := range map[string]any{events.UserKey(uid): user, events.SessionKey(sid): sess} {
		b, _ := events.Marshal(rec)
		if _, err := kv.Put(ctx, key, b); err != nil {
			t.Fatal(err)
		}
	}
	svc, err := New(ctx, nc, Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	return svc, ust, user, sess, ns
}
