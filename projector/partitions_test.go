package projector_test

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

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
	en, kvs := partitionedEnv(t, n)
	store, ctx := en.store, context.Background()
	start := func(name string) { startPartitions(t, en, name) }
	held := func() map[string]int { return leasesHeld(ctx, kvs, store.Bucket, n) }
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

// TestAGoneInstancesPartitionsGoStraightToTheirSuccessors: when an instance is gone
// (its presence not renewed) before the others' watches have seen it go (during a
// network cut the server's expiry waits for the bucket's new leader), each of its
// partitions is claimed by the instance it is assigned to once the gone one leaves
// the list, and by no other: a partition claimed by another would be handed over a
// second time when the watches catch up, seconds into the outage (issue 21).
func TestAGoneInstancesPartitionsGoStraightToTheirSuccessors(t *testing.T) {
	const n = 12
	en, kvs := partitionedEnv(t, n)
	store, ctx := en.store, context.Background()
	start := func(name string) { startPartitions(t, en, name) }
	holders := func() []string {
		out := make([]string, n)
		for p := range n {
			if r, ok, err := projector.Holder(ctx, kvs, store.Bucket, events.PartitionName(p)); err == nil && ok {
				out[p] = r.Owner
			}
		}
		return out
	}
	// a and b share the partitions: a the even ones, b the odd ones (a joined first).
	start("a")
	time.Sleep(10 * time.Millisecond)
	start("b")
	want := func(p int) string { return []string{"a", "b"}[p%2] }
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		h, ok := holders(), true
		for p := range n {
			ok = ok && h[p] == want(p)
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a and b do not share the partitions: %v", h)
		}
	}
	// Both settled: partitions go to settled instances only.
	for _, name := range []string{"a", "b"} {
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			e, err := en.kv.Get(ctx, events.PresenceKey(name))
			var r events.PresenceRecord
			if err == nil && events.Unmarshal(e.Value(), &r) == nil && !r.Unsettled {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("instance %s never settled", name)
			}
		}
	}
	// Instance c joins as the oldest (its record says so), and is never heard of
	// again: its presence key stays (no TTL: the others' watches never see it go), so
	// partitions 0, 3, 6 and 9 are assigned to it, handed over to it, and left free.
	silentOldestInstance(t, en, "c")
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		h := holders()
		if h[0] == "" && h[3] == "" && h[6] == "" && h[9] == "" {
			break // handed over to c
		}
		if time.Now().After(deadline) {
			t.Fatalf("c's partitions were not handed over to it: %v", h)
		}
	}
	// Once c is gone (its presence a lease TTL old), each of its partitions goes to the
	// instance it is assigned to without c (a, b: a for even partitions, b for odd),
	// and to no other.
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		h, done := holders(), true
		for p := range n {
			if h[p] == "" {
				done = false
			} else if h[p] == "c" {
				t.Fatalf("partition %d held by c, which never ran", p)
			}
		}
		if done {
			for _, p := range []int{0, 3, 6, 9} {
				if h[p] != want(p) {
					t.Fatalf("partition %d of the gone instance was claimed by %s, want its successor %s (all: %v)", p, h[p], want(p), h)
				}
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("c's partitions were not claimed: %v", h)
		}
	}
}

// startPartitions runs the partitions of instance name on en's store, with a lease
// TTL of a second, until the test ends or the function it returns is called.
func startPartitions(t *testing.T, en *env, name string) (stop func()) {
	return startPartitionsSettling(t, en, name, 0)
}

// startPartitionsSettling is startPartitions with a settling time (0: the default).
func startPartitionsSettling(t *testing.T, en *env, name string, settle time.Duration) (stop func()) {
	t.Helper()
	p, err := projector.NewPartitions(context.Background(), en.nc, projector.PartitionsConfig{Instance: name, LeaseTTL: time.Second,
		Settle: settle, Logger: quiet, Projector: projector.Config{Bucket: en.store.Bucket, Logger: quiet}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = p.Run(ctx) }()
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
	}
	t.Cleanup(stop)
	return stop
}

// TestAnUnsettledInstanceTakesNoOthersPartition: an instance that has not settled (just
// started, or back from a network cut, where its node's old copies showed leases free)
// takes no partition assigned to another while a settled instance is alive; once
// settled, it takes it. Here instance a stops, and the only settled instance left, c,
// renews its presence but folds nothing (as one whose node is slow): b, settling for
// 6 s, waits, though the leases have been free for more than two TTLs.
func TestAnUnsettledInstanceTakesNoOthersPartition(t *testing.T) {
	const n = 2
	en, kvs := partitionedEnv(t, n)
	store, ctx := en.store, context.Background()
	held := func() map[string]int { return leasesHeld(ctx, kvs, store.Bucket, n) }
	stopA := startPartitions(t, en, "a")
	for deadline := time.Now().Add(10 * time.Second); held()["a"] != n; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a does not hold the partitions: %v", held())
		}
	}
	aliveOldestInstance(t, en, "c")
	taken := leaseWrites(t, en)
	began := time.Now()
	startPartitionsSettling(t, en, "b", 6*time.Second)
	stopA()
	time.Sleep(5 * time.Second) // b is unsettled until 6 s after its start
	if at, ok := taken("b"); ok && at.Sub(began) < 5*time.Second {
		t.Fatalf("unsettled b took a lease %s after its start", at.Sub(began).Round(time.Millisecond))
	}
	for deadline := time.Now().Add(10 * time.Second); held()["b"] != n; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("settled b does not take the partitions: %v", held())
		}
	}
	t.Logf("b took the partitions %s after its start", time.Since(began).Round(time.Millisecond))
}

// TestUnsettledInstancesTakeThePartitionsOfSettledOnesAllGone: when every settled
// instance is gone by a fresh reading (here the only one, a, is never heard of again,
// as an instance whose node was cut off while the bucket had no leader, so that every
// other instance's renewals failed and unsettled it), the unsettled instances left take
// its partitions at once, each the ones the list will assign it, rather than after
// settling. b and c settle for 10 s; they take the partitions within 4.
func TestUnsettledInstancesTakeThePartitionsOfSettledOnesAllGone(t *testing.T) {
	const n = 4
	en, kvs := partitionedEnv(t, n)
	store, ctx := en.store, context.Background()
	held := func() map[string]int { return leasesHeld(ctx, kvs, store.Bucket, n) }
	silentOldestInstance(t, en, "a")
	began := time.Now()
	startPartitionsSettling(t, en, "b", 10*time.Second)
	startPartitionsSettling(t, en, "c", 10*time.Second)
	for deadline := time.Now().Add(4 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		h := held()
		if h["b"]+h["c"] == n {
			if h["b"] == 0 || h["c"] == 0 {
				t.Fatalf("the partitions went to one instance: %v", h)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("unsettled b and c hold %v %s after their start, with the only settled instance gone",
				h, time.Since(began).Round(time.Millisecond))
		}
	}
	t.Logf("b and c took the partitions %s after their start", time.Since(began).Round(time.Millisecond))
}

// TestAnInstanceWhoseWatchFellBehindListsTheInstancesByAFreshReading: the watch of the
// presence keys can fall behind (its consumer lost with a node, a new one waiting for
// the meta group), and partitions handed out by an old list go where nobody looks for
// them: the list is also read afresh every TTL/3. Here b's watch stops (its consumer
// paused) after it saw x settled; x then says it is not (as after a long outage of the
// bucket): by the records every instance is unsettled, so the partitions go to all,
// and b takes partition 1 (and, x folding nothing, partition 0 once it has been free
// for two TTLs), which its watch alone would have left to x.
func TestAnInstanceWhoseWatchFellBehindListsTheInstancesByAFreshReading(t *testing.T) {
	const n = 2
	en, kvs := partitionedEnv(t, n)
	store, ctx := en.store, context.Background()
	held := func() map[string]int { return leasesHeld(ctx, kvs, store.Bucket, n) }
	unsettleX := oldestInstance(t, en, "x")
	startPartitionsSettling(t, en, "b", time.Minute)
	// b's watch: the consumer of the presence keys.
	var watch string
	for deadline := time.Now().Add(10 * time.Second); watch == ""; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no watch of the presence keys")
		}
		for ci := range kvs.ListConsumers(ctx).Info() {
			if strings.HasSuffix(ci.Config.FilterSubject, ".i.>") {
				watch = ci.Name
			}
		}
	}
	// Two lease TTLs with x settled: b, unsettled, takes nothing.
	for began := time.Now(); time.Since(began) < 2*time.Second; time.Sleep(50 * time.Millisecond) {
		if h := held(); h["b"] != 0 {
			t.Fatalf("unsettled b took a partition while x is settled: %v", h)
		}
	}
	if _, err := en.js.PauseConsumer(ctx, kvs.CachedInfo().Config.Name, watch, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	unsettleX()
	began := time.Now()
	holds1 := func() bool {
		r, ok, err := projector.Holder(ctx, kvs, store.Bucket, events.PartitionName(1))
		return err == nil && ok && r.Owner == "b"
	}
	for deadline := began.Add(5 * time.Second); !holds1(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("b holds %v 5 s after x said it is not settled, its watch paused", held())
		}
	}
	paused := false
	for ci := range kvs.ListConsumers(ctx).Info() {
		paused = paused || ci.Name == watch && ci.Paused
	}
	if !paused {
		t.Fatal("b's watch is not paused: the test proves nothing")
	}
	t.Logf("b took partition 1 %s after x said it is not settled", time.Since(began).Round(time.Millisecond))
}

// leasesHeld counts the leases of a bucket's n partitions each instance holds.
func leasesHeld(ctx context.Context, kvs jetstream.Stream, bucket string, n int) map[string]int {
	out := map[string]int{}
	for p := range n {
		if r, ok, err := projector.Holder(ctx, kvs, bucket, events.PartitionName(p)); err == nil && ok {
			out[r.Owner]++
		}
	}
	return out
}

// silentOldestInstance writes the presence record of an instance that joined before
// any other and is never heard of again: no TTL, so no watch sees it go, but a lease
// TTL after it, it is gone by the bucket's reading.
func silentOldestInstance(t *testing.T, en *env, name string) {
	t.Helper()
	data, err := events.Marshal(&events.PresenceRecord{Instance: name, Joined: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := en.kv.Put(context.Background(), events.PresenceKey(name), data); err != nil {
		t.Fatal(err)
	}
}

// leaseWrites watches the bucket's leases and returns when an owner first took one.
func leaseWrites(t *testing.T, en *env) (first func(owner string) (time.Time, bool)) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := en.kv.Watch(ctx, "l.>", jetstream.UpdatesOnly())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	seen := map[string]time.Time{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for e := range w.Updates() {
			var r events.LeaseRecord
			if e == nil || e.Operation() != jetstream.KeyValuePut || events.Unmarshal(e.Value(), &r) != nil {
				continue
			}
			mu.Lock()
			if _, ok := seen[r.Owner]; !ok {
				seen[r.Owner] = time.Now()
			}
			mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); _ = w.Stop(); <-done })
	return func(owner string) (time.Time, bool) {
		mu.Lock()
		defer mu.Unlock()
		at, ok := seen[owner]
		return at, ok
	}
}

// aliveOldestInstance renews, until the test ends, the presence record of an instance
// that joined before any other and folds nothing.
func aliveOldestInstance(t *testing.T, en *env, name string) {
	t.Helper()
	oldestInstance(t, en, name)
}

// oldestInstance renews, every 200 ms until the test ends, the presence record of an
// instance that joined before any other and folds nothing; unsettle makes its record
// say it is not settled, as one whose renewals failed for a while.
func oldestInstance(t *testing.T, en *env, name string) (unsettle func()) {
	t.Helper()
	var unsettled atomic.Bool
	put := func(ctx context.Context) error {
		data, err := events.Marshal(&events.PresenceRecord{Instance: name, Joined: 1, Unsettled: unsettled.Load()})
		if err == nil {
			_, err = en.kv.Put(ctx, events.PresenceKey(name), data)
		}
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			_ = put(ctx)
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	if err := put(ctx); err != nil {
		t.Fatal(err)
	}
	return func() {
		unsettled.Store(true)
		if err := put(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// partitionedEnv starts an embedded server with a store of n partitions and returns it
// with the bucket's stream.
func partitionedEnv(t *testing.T, n int) (*env, jetstream.Stream) {
	t.Helper()
	store := events.DefaultStoreConfig()
	store.Partitions = n
	en := mustEnvStore(t, embedded.Options{}, store)
	kvs, err := en.js.Stream(context.Background(), events.KVStream(store.Bucket))
	if err != nil {
		t.Fatal(err)
	}
	return en, kvs
}
