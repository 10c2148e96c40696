package events_test

import (
	"context"
	"errors"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/deploy/embedded/embeddedtest"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// TestADestroyedDataKeyIsGoneAndNeverMadeAgain: a user's data key is made once (two
// makers agree), opens what it sealed, and once destroyed its message is gone from the
// bucket's stream, a tombstone stands in its place, no key is made again for the user,
// and what it sealed stays sealed (erased) for a reader with the key file.
func TestADestroyedDataKeyIsGoneAndNeverMadeAgain(t *testing.T) {
	js, ctx := storeForKeys(t)
	raw, _ := sealed.NewDataKey()
	ring, err := sealed.NewKeyring("k1", map[string][]byte{"k1": raw})
	if err != nil {
		t.Fatal(err)
	}
	a, err := events.OpenDataKeys(ctx, js, ring)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := events.OpenDataKeys(ctx, js, ring)
	uid := events.NewID()
	ka, err := a.Ensure(ctx, uid)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := b.Ensure(ctx, uid)
	if err != nil {
		t.Fatal(err)
	}
	ev := &events.Event{ID: events.NewID(), Type: events.AttrCreated, UserID: uid, Actor: uid, RemoteAddr: "192.0.2.1",
		Attrs: []events.AttrItem{{Name: "n", Value: []byte(`"secret"`)}}}
	if err := events.SealPersonal(ev, ka, ka); err != nil {
		t.Fatal(err)
	}
	if ev.Attrs[0].Value != nil || ev.RemoteAddr != "" || ev.PII == nil || ev.APII == nil {
		t.Fatalf("sealed event still holds personal data: %+v", ev)
	}
	sealedCopy := *ev
	sealedCopy.Attrs = append([]events.AttrItem(nil), ev.Attrs...)
	if events.OpenPersonal(ev, kb, kb); ev.Erased || string(ev.Attrs[0].Value) != `"secret"` || ev.RemoteAddr != "192.0.2.1" {
		t.Fatalf("the other maker's key does not open it: %+v", ev)
	}

	kv, _ := js.KeyValue(ctx, events.DataKeysBucket)
	e, err := kv.Get(ctx, events.DataKeyKey(uid))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Destroy(ctx, uid); err != nil {
		t.Fatal(err)
	}
	st, _ := js.Stream(ctx, events.KVStream(events.DataKeysBucket))
	if _, err := st.GetMsg(ctx, e.Revision()); !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Fatalf("the key's message is still in the stream: %v", err)
	}
	fresh, _ := events.OpenDataKeys(ctx, js, ring)
	if k, err := fresh.Get(ctx, uid); k != nil || err != nil {
		t.Fatalf("a destroyed key reads as %v, %v", k, err)
	}
	if _, err := fresh.Ensure(ctx, uid); !errors.Is(err, events.ErrErased) {
		t.Fatalf("a key made again for a deleted user: %v", err)
	}
	if err := fresh.Open(ctx, &sealedCopy); err != nil || !sealedCopy.Erased || sealedCopy.Attrs[0].Value != nil {
		t.Fatalf("what the destroyed key sealed opens: %v %+v", err, sealedCopy)
	}
	if err := a.Destroy(ctx, uid); err != nil {
		t.Fatalf("destroying twice: %v", err)
	}
}

// TestARotationReWrapsEveryDataKey: a rotation to a new primary key re-wraps every
// data key (ATTRD_ROTATE_USERS of them, 2,000 by default; the figure in
// docs/PERFORMANCE.md is for 100,000), after which a ring of the new key alone opens
// each; a second rotation re-wraps none. It prints the rate.
func TestARotationReWrapsEveryDataKey(t *testing.T) {
	n := 2000
	if v, err := strconv.Atoi(os.Getenv("ATTRD_ROTATE_USERS")); err == nil && v > 0 {
		n = v
	}
	js, ctx := storeForKeys(t)
	k1, _ := sealed.NewDataKey()
	k2, _ := sealed.NewDataKey()
	oldRing, _ := sealed.NewKeyring("k1", map[string][]byte{"k1": k1})
	bothRing, _ := sealed.NewKeyring("k2", map[string][]byte{"k1": k1, "k2": k2})
	newRing, _ := sealed.NewKeyring("k2", map[string][]byte{"k2": k2})
	old, _ := events.OpenDataKeys(ctx, js, oldRing)
	uids := make([]string, n)
	for i := range uids {
		uids[i] = events.NewID()
		if _, err := old.Ensure(ctx, uids[i]); err != nil {
			t.Fatal(err)
		}
	}
	both, _ := events.OpenDataKeys(ctx, js, bothRing)
	start := time.Now()
	r, err := both.Rotate(ctx, 0)
	took := time.Since(start)
	if err != nil || r.Rewrapped != n {
		t.Fatalf("rotation: %+v %v", r, err)
	}
	t.Logf("re-wrapped %d data keys in %s (%.0f a second)", n, took.Round(time.Millisecond), float64(n)/took.Seconds())
	fresh, _ := events.OpenDataKeys(ctx, js, newRing)
	for _, uid := range []string{uids[0], uids[n/2], uids[n-1]} {
		if k, err := fresh.Get(ctx, uid); k == nil || err != nil {
			t.Fatalf("a re-wrapped key does not open with the new key alone: %v", err)
		}
	}
	if r, err := both.Rotate(ctx, 0); err != nil || r.Rewrapped != 0 || r.Current != n {
		t.Fatalf("a second rotation: %+v %v", r, err)
	}
}

// TestAnEventAboutAMadeUpUserMakesNoDataKey: an access.denied for a user id that names
// nobody (a caller probing ids) seals its actor's address with the actor's key and
// makes no key for the made-up id: attackers cannot fill the data keys bucket.
func TestAnEventAboutAMadeUpUserMakesNoDataKey(t *testing.T) {
	js, ctx := storeForKeys(t)
	raw, _ := sealed.NewDataKey()
	ring, _ := sealed.NewKeyring("k1", map[string][]byte{"k1": raw})
	dk, _ := events.OpenDataKeys(ctx, js, ring)
	caller, madeUp := events.NewID(), events.NewID()
	ev := &events.Event{ID: events.NewID(), Type: events.AccessDenied, UserID: madeUp, Actor: caller, ActorName: "mallory", RemoteAddr: "192.0.2.66"}
	if err := dk.Seal(ctx, ev); err != nil {
		t.Fatal(err)
	}
	if ev.APII == nil || ev.RemoteAddr != "" || ev.ActorName != "" {
		t.Fatalf("the caller's address is not sealed: %+v", ev)
	}
	kv, _ := js.KeyValue(ctx, events.DataKeysBucket)
	if _, err := kv.Get(ctx, events.DataKeyKey(madeUp)); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("a data key was made for a made-up user id: %v", err)
	}
	if _, err := kv.Get(ctx, events.DataKeyKey(caller)); err != nil {
		t.Fatalf("the caller has no data key: %v", err)
	}
}

// storeForKeys starts an embedded server with attrd's stream and buckets.
func storeForKeys(t *testing.T) (jetstream.JetStream, context.Context) {
	t.Helper()
	_, nc := embeddedtest.Start(t, embedded.Options{})
	js, _ := jetstream.New(nc)
	ctx := context.Background()
	if _, _, err := events.EnsureStore(ctx, js, events.DefaultStoreConfig()); err != nil {
		t.Fatal(err)
	}
	return js, ctx
}

// TestAKeyDestroyedElsewhereLeavesEveryInstancesMemory: an instance that read a user's
// data key (and keeps it for minutes) forgets it as soon as another instance destroys
// it: it follows the bucket's changes. Without that it would go on opening the deleted
// user's data.
func TestAKeyDestroyedElsewhereLeavesEveryInstancesMemory(t *testing.T) {
	js, ctx := storeForKeys(t)
	raw, _ := sealed.NewDataKey()
	ring, _ := sealed.NewKeyring("k1", map[string][]byte{"k1": raw})
	here, _ := events.OpenDataKeys(ctx, js, ring)
	there, _ := events.OpenDataKeys(ctx, js, ring)
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := here.Follow(fctx); err != nil {
		t.Fatal(err)
	}
	uid := events.NewID()
	if _, err := there.Ensure(ctx, uid); err != nil {
		t.Fatal(err)
	}
	if k, err := here.Get(ctx, uid); k == nil || err != nil {
		t.Fatalf("read here: %v %v", k, err)
	}
	if err := there.Destroy(ctx, uid); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		k, err := here.Get(ctx, uid)
		if err != nil {
			t.Fatal(err)
		}
		if k == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("a key destroyed elsewhere is still in this instance's memory")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
