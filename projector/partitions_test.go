package projector_test

import (
	"context"
	"testing"
	"time"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// TestAnInstanceTakesPartitionsOnlyOnceSettled: a second instance gets no partition
// until it has renewed and read back its presence without a failure for the settling
// time (a node back from a network cut takes renewals before it answers reads, and a
// partition handed to it then stopped there), and then takes its share by handover.
func TestAnInstanceTakesPartitionsOnlyOnceSettled(t *testing.T) {
	const n = 4
	store := events.DefaultStoreConfig()
	store.Partitions = n
	en := mustEnvStore(t, embedded.Options{}, store)
	ctx := context.Background()
	start := func(name string) *projector.Partitions {
		p, err := projector.NewPartitions(ctx, en.nc, projector.PartitionsConfig{Instance: name, LeaseTTL: time.Second, Logger: quiet,
			Projector: projector.Config{Bucket: store.Bucket, Logger: quiet}})
		if err != nil {
			t.Fatal(err)
		}
		rctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); _ = p.Run(rctx) }()
		t.Cleanup(func() { cancel(); <-done })
		return p
	}
	kvs, err := en.js.Stream(ctx, events.KVStream(store.Bucket))
	if err != nil {
		t.Fatal(err)
	}
	held := func() map[string]int {
		out := map[string]int{}
		for p := range n {
			if r, ok, err := projector.Holder(ctx, kvs, store.Bucket, events.PartitionName(p)); err == nil && ok {
				out[r.Owner]++
			}
		}
		return out
	}
	wait := func(what string, within time.Duration, ok func(map[string]int) bool) time.Duration {
		t.Helper()
		begin := time.Now()
		for !ok(held()) {
			if time.Since(begin) > within {
				t.Fatalf("%s: not within %s (%v)", what, within, held())
			}
			time.Sleep(20 * time.Millisecond)
		}
		return time.Since(begin)
	}
	start("a")
	wait("the first instance holds every partition", 10*time.Second, func(h map[string]int) bool { return h["a"] == n })
	settled := func(name string) bool {
		e, err := en.kv.Get(ctx, events.PresenceKey(name))
		var r events.PresenceRecord
		return err == nil && events.Unmarshal(e.Value(), &r) == nil && !r.Unsettled
	}
	for deadline := time.Now().Add(10 * time.Second); !settled("a"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the first instance never settled")
		}
	}
	began := time.Now()
	start("b")
	for time.Since(began) < 500*time.Millisecond { // half the settling time (the lease TTL, 1 s)
		if h := held(); h["b"] != 0 {
			t.Fatalf("an unsettled instance took partitions %s after its start: %v", time.Since(began), h)
		}
		if settled("b") {
			t.Fatalf("instance b's presence says settled %s after its start", time.Since(began))
		}
		time.Sleep(20 * time.Millisecond)
	}
	wait("the second instance takes its share", 10*time.Second, func(h map[string]int) bool { return h["a"] == n/2 && h["b"] == n/2 })
	t.Logf("the second instance held its share %s after its start", time.Since(began).Round(time.Millisecond))
}
