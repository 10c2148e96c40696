package api

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/attrd/attrd/events"
)

// holdSlot runs a task in g's only slot until release is closed; it returns once the
// slot is taken.
func holdSlot(t *testing.T, g *Gate, release chan struct{}) {
	t.Helper()
	held := make(chan struct{})
	go g.Do(context.Background(), "holder", func() { close(held); <-release })
	<-held
}

// waitForWaiters returns once n callers wait at g.
func waitForWaiters(t *testing.T, g *Gate, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		g.mu.Lock()
		w := g.waiting
		g.mu.Unlock()
		if w == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d waiters, want %d", w, n)
		}
		runtime.Gosched()
	}
}

// TestTheGateServesKeysInTurnNotInArrivalOrder: ten waiters of one key queued before
// one of another key do not make it wait behind all ten.
func TestTheGateServesKeysInTurnNotInArrivalOrder(t *testing.T) {
	g := NewGate(1, -1, 10*time.Second, "checks")
	release := make(chan struct{})
	holdSlot(t, g, release)
	var mu sync.Mutex
	var order []string
	var wg sync.WaitGroup
	queue := func(key string, n int) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := g.Do(context.Background(), key, func() {
				mu.Lock()
				order = append(order, key)
				mu.Unlock()
			}); err != nil {
				t.Error(err)
			}
		}()
		waitForWaiters(t, g, n)
	}
	for i := 1; i <= 10; i++ {
		queue("flood", i)
	}
	queue("alice", 11)
	close(release)
	wg.Wait()
	if len(order) != 11 || order[1] != "alice" {
		t.Fatalf("served %v: alice should come second, after one of the flood's", order)
	}
}

// TestTheGateRefusesAtOnceWhatItCouldNotServeInTime: with runs timed at a second on one
// slot and a wait of 2.5 s, the third waiter is refused at once (not after waiting
// 2.5 s) with a Retry-After that covers the queue ahead of it.
func TestTheGateRefusesAtOnceWhatItCouldNotServeInTime(t *testing.T) {
	g := NewGate(1, -1, 2500*time.Millisecond, "checks")
	g.mean = time.Second
	release := make(chan struct{})
	holdSlot(t, g, release)
	for i := 1; i <= 2; i++ {
		go g.Do(context.Background(), fmt.Sprint("k", i), func() {})
		waitForWaiters(t, g, i)
	}
	start := time.Now()
	err := g.Do(context.Background(), "other", func() { t.Error("ran beyond the bound") })
	if took := time.Since(start); took > 100*time.Millisecond {
		t.Fatalf("the refusal took %s", took)
	}
	if events.CodeOf(err) != events.CodeOutcomeUnknown || events.RetryAfterOf(err) < 3*time.Second {
		t.Fatalf("refusal %v, retry after %s; want E008004 after at least 3s", err, events.RetryAfterOf(err))
	}
	close(release)
}

// TestTheGateRefusesBeyondItsQueueAndWhenTheWaitEnds: a full queue refuses at once; a
// waiter not served within the wait is refused then, and leaves the queue.
func TestTheGateRefusesBeyondItsQueueAndWhenTheWaitEnds(t *testing.T) {
	g := NewGate(1, 1, 200*time.Millisecond, "checks")
	release := make(chan struct{})
	holdSlot(t, g, release)
	waited := make(chan error)
	go func() { waited <- g.Do(context.Background(), "a", func() {}) }()
	waitForWaiters(t, g, 1)
	if err := g.Do(context.Background(), "b", func() {}); events.CodeOf(err) != events.CodeOutcomeUnknown || events.RetryAfterOf(err) < time.Second {
		t.Fatalf("beyond the queue: %v", err)
	}
	if err := <-waited; events.CodeOf(err) != events.CodeOutcomeUnknown {
		t.Fatalf("after the wait: %v", err)
	}
	waitForWaiters(t, g, 0)
	close(release)
	// The slot is free again for the next caller.
	ran := false
	if err := g.Do(context.Background(), "c", func() { ran = true }); err != nil || !ran {
		t.Fatalf("after the holder left: %v, ran %v", err, ran)
	}
}

// TestAFullGateMakesRoomForAKeyWithFewerPlaces: one key filling the whole queue does
// not keep another key out: the newcomer takes the place of that key's last waiter,
// which is refused at once; a key that holds as many as the newcomer would is not
// displaced, and the newcomer is refused.
func TestAFullGateMakesRoomForAKeyWithFewerPlaces(t *testing.T) {
	g := NewGate(1, 4, 10*time.Second, "checks")
	release := make(chan struct{})
	holdSlot(t, g, release)
	flood := make(chan error, 4)
	for i := 1; i <= 4; i++ {
		go func() { flood <- g.Do(context.Background(), "flood", func() {}) }()
		waitForWaiters(t, g, i)
	}
	served := make(chan error, 1)
	go func() { served <- g.Do(context.Background(), "alice", func() {}) }()
	if err := <-flood; events.CodeOf(err) != events.CodeOutcomeUnknown {
		t.Fatalf("the displaced waiter: %v, want busy", err)
	}
	waitForWaiters(t, g, 4)
	// Now flood holds 3 places and alice 1: bob (who would hold 1) displaces flood
	// again; then flood 2, alice 1, bob 1: carol displaces flood once more.
	for _, who := range []string{"bob", "carol"} {
		go func() { served <- g.Do(context.Background(), who, func() {}) }()
		if err := <-flood; events.CodeOf(err) != events.CodeOutcomeUnknown {
			t.Fatalf("the waiter displaced by %s: %v, want busy", who, err)
		}
		waitForWaiters(t, g, 4)
	}
	// flood 1, alice 1, bob 1, carol 1: nobody holds more than a newcomer would.
	if err := g.Do(context.Background(), "dave", func() {}); events.CodeOf(err) != events.CodeOutcomeUnknown {
		t.Fatalf("dave with an evenly shared full queue: %v, want busy", err)
	}
	close(release)
	for range 3 {
		if err := <-served; err != nil {
			t.Fatalf("a newcomer given a place: %v", err)
		}
	}
	if err := <-flood; err != nil {
		t.Fatalf("the flood's remaining waiter: %v", err)
	}
}
