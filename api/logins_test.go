package api

import (
	"context"
	"errors"
	"runtime"
	"testing"

	"github.com/attrd/attrd/events"
)

// TestOneUsernameAndOneAddressHoldBoundedPlaces: a check of a username with another
// password while one is in flight, or one address over its bound, is refused, and
// every refusal is kept to be counted as a failure of its username and its address.
func TestOneUsernameAndOneAddressHoldBoundedPlaces(t *testing.T) {
	l := newLoginFlights(2)
	enter := func(user, pw, addr string) bool {
		c, first := l.enter(user, pw, addr)
		return c != nil && first
	}
	if !enter("alice", "guess-1", "198.51.100.1") {
		t.Fatal("the first check of alice was refused")
	}
	if c, _ := l.enter("alice", "guess-2", "198.51.100.2"); c != nil {
		t.Fatal("a second check of alice with another password was let in")
	}
	if !enter("bob", "pw", "198.51.100.1") {
		t.Fatal("the address's second place was refused")
	}
	if c, _ := l.enter("carol", "pw", "198.51.100.1"); c != nil {
		t.Fatal("a third check from one address was let in")
	}
	if !enter("carol", "pw", "") {
		t.Fatal("carol with no address was refused")
	}
	_, a1 := throttleKeys("", "198.51.100.1")
	_, a2 := throttleKeys("", "198.51.100.2")
	want := map[string]int{"u.alice": 1, a2: 1, "u.carol": 1, a1: 1}
	got := l.takeRefused()
	if len(got) != len(want) {
		t.Fatalf("refusals kept %v, want %v", got, want)
	}
	for k, n := range want {
		if got[k] != n {
			t.Fatalf("refusals kept %v, want %v", got, want)
		}
	}
	if again := l.takeRefused(); again != nil {
		t.Fatalf("refusals kept twice: %v", again)
	}
	// Leaving frees the places; nothing is left behind.
	l.leave("alice", "198.51.100.1")
	l.leave("bob", "198.51.100.1")
	l.leave("carol", "")
	if len(l.checks) != 0 || len(l.byAddr) != 0 {
		t.Fatalf("places left after every check ended: %v %v", l.checks, l.byAddr)
	}
	if !enter("alice", "guess-3", "198.51.100.1") {
		t.Fatal("alice after her check ended was refused")
	}
}

// TestTheSamePasswordJoinsTheCheckInFlight: logins of one user with the same password
// at once (a service's workers) share one check and its outcome; none is refused, none
// counted, and a check that panics still answers those who joined and frees its place.
func TestTheSamePasswordJoinsTheCheckInFlight(t *testing.T) {
	l := newLoginFlights(1)
	ctx := context.Background()
	release := make(chan struct{})
	runs := 0
	u := &events.UserRecord{UserID: "u1"}
	first := make(chan error)
	go func() {
		_, _, err := l.check(ctx, "svc", "right", "198.51.100.9", func() (bool, *events.UserRecord, error) {
			runs++
			<-release
			return true, u, nil
		})
		first <- err
	}()
	// joinedBy waits until the check in flight has n attempts joined to it.
	joinedBy := func(n int) {
		for {
			l.mu.Lock()
			c := l.checks["u.svc"]
			ok := c != nil && c.joined == n
			l.mu.Unlock()
			if ok {
				return
			}
			runtime.Gosched()
		}
	}
	joinedBy(0)
	joined := make(chan bool, 3)
	for range 3 {
		go func() {
			good, got, err := l.check(ctx, "svc", "right", "198.51.100.9", func() (bool, *events.UserRecord, error) {
				t.Error("a joined attempt ran a check of its own")
				return false, nil, nil
			})
			joined <- good && got == u && err == nil
		}()
	}
	joinedBy(3)
	// Another password is refused meanwhile, even from an address with room.
	if _, _, err := l.check(ctx, "svc", "wrong", "", nil); !errors.Is(err, errLoginInFlight) {
		t.Fatalf("another password while one is in flight: %v", err)
	}
	close(release)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if !<-joined {
			t.Fatal("a joined attempt did not share the outcome")
		}
	}
	if runs != 1 {
		t.Fatalf("%d checks ran", runs)
	}
	if r := l.takeRefused(); len(r) != 1 || r["u.svc"] != 1 {
		t.Fatalf("refusals kept %v: only the other password's", r)
	}
	// A check that panics frees its place.
	func() {
		defer func() { recover() }()
		l.check(ctx, "svc", "right", "", func() (bool, *events.UserRecord, error) { panic("boom") })
	}()
	if len(l.checks) != 0 {
		t.Fatalf("a panicked check kept its place: %v", l.checks)
	}
}
