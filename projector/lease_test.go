package projector_test

import (
	"context"
	"errors"
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

// TestAHolderThatCannotRenewGivesTheLeaseUpWithinItsTTL: a holder whose renewals no
// longer reach a quorum (here its connection is gone) stops keeping the lease, and so
// its run stops folding (Partitions cancels the run when Keep ends), within the lease
// TTL of its last renewal and a renewal's interval: ErrLeaseLost. The others take the
// lease over once it has lapsed; what a holder writes after that is fenced by its
// successor's intent record (TestAPausedProjectorWritesNothingAfterItsSuccessorStarted).
func TestAHolderThatCannotRenewGivesTheLeaseUpWithinItsTTL(t *testing.T) {
	e := mustEnv(t)
	ctx := context.Background()
	nc, err := nats.Connect(e.nc.ConnectedUrl())
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	const ttl = time.Second
	l, err := projector.NewLease(ctx, js, e.store.Bucket, "0", "cut", ttl)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx, 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	kept := make(chan error, 1)
	go func() { kept <- l.Keep(ctx) }()
	time.Sleep(ttl) // a few renewals
	cut := time.Now()
	nc.Close()
	select {
	case err := <-kept:
		if !errors.Is(err, projector.ErrLeaseLost) {
			t.Fatalf("Keep ended with %v, want ErrLeaseLost", err)
		}
		if took := time.Since(cut); took > ttl+ttl/3+300*time.Millisecond {
			t.Fatalf("the lease was given up %s after the last renewal could reach the server, TTL %s", took, ttl)
		}
	case <-time.After(5 * ttl):
		t.Fatal("a holder that cannot renew kept its lease")
	}
}
