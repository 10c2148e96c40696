package projector_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// TestALeaseRenewedWithItsAckLostIsStillReleased: a renewal stored while its holder
// stopped waiting for the acknowledgement moves the lease past the revision the holder
// knows; Release still gives it up at once (not at its expiry), and leaves a lease
// that another instance holds alone.
func TestALeaseRenewedWithItsAckLostIsStillReleased(t *testing.T) {
	e := mustEnv(t)
	ctx := context.Background()
	l, err := projector.NewLease(ctx, e.js, e.store.Bucket, "0", "first", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx, 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	// The renewal the holder never heard back from: the same owner, a later revision.
	data, _ := events.Marshal(&projector.LeaseRecord{Owner: "first"})
	if _, err := e.js.PublishMsg(ctx, &nats.Msg{Subject: events.KVSubject(e.store.Bucket, events.LeaseKey("0")), Data: data}, jetstream.WithMsgTTL(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatalf("release: %v", err)
	}
	st, _ := e.js.Stream(ctx, events.KVStream(e.store.Bucket))
	if r, held, err := projector.Holder(ctx, st, e.store.Bucket, "0"); err != nil || held {
		t.Fatalf("after the release: held by %q (%v)", r.Owner, err)
	}

	// Another's lease is not released by a holder that lost it.
	other, _ := projector.NewLease(ctx, e.js, e.store.Bucket, "0", "second", time.Minute)
	if err := other.Acquire(ctx, 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if err := l.Release(ctx); err == nil {
		t.Error("a lost lease was released")
	}
	if r, held, _ := projector.Holder(ctx, st, e.store.Bucket, "0"); !held || r.Owner != "second" {
		t.Fatalf("the other's lease: %q held %v", r.Owner, held)
	}
}
