package api

import (
	"context"
	"crypto/subtle"
	"errors"
	"sync"
	"time"

	"github.com/attrd/attrd/events"
)

// Logins in flight. Before any lookup or hashing, a login must find room on this
// instance: at most one password check in flight per username, and LoginsPerAddress per
// remote address. An attempt with the same password as the check in flight for its
// username joins it and shares its outcome: it is the same guess (a service logging
// one user in from several workers at once), so it costs no second hash and counts no
// second failure. Any other attempt over either bound is refused at once, as a
// throttled one is (E005001), and counts as a failed login of its username and its
// address. So a flood of guesses at one username, or from one address, holds at most
// that many places in the password gate however many it sends at once, and the
// failures it piles up throttle it as if each had been checked.
//
// The bounds are per instance, as the password gate they protect is: with k instances
// at most k checks of one username run at once. The failure counters stay shared
// (the throttle bucket): refusals are added to them in batches a few times a second,
// so that a flood of refusals costs a few KV writes, not one each.
type loginFlights struct {
	perAddr int

	mu     sync.Mutex
	checks map[string]*loginCheck // the check in flight, by username throttle key
	byAddr map[string]int         // checks in flight, by address throttle key
	// refused holds the failures not yet added to the shared counters, by throttle
	// key; at most maxUncounted keys (more are dropped: the counters are a guard).
	refused map[string]int
}

// loginCheck is one password check in flight; its outcome is set before done closes.
type loginCheck struct {
	password string
	joined   int // attempts that share it
	done     chan struct{}
	good     bool
	user     *events.UserRecord
	err      error
}

// errLoginInFlight refuses an attempt over the in-flight bounds.
var errLoginInFlight = errors.New("another password check of this username, or too many from this address, in flight")

// DefaultLoginsPerAddress bounds the password checks in flight from one address.
const DefaultLoginsPerAddress = 4

// Bounds of the refusals kept for counting.
const (
	maxUncounted      = 100_000
	countRefusalsEach = 200 * time.Millisecond
)

func newLoginFlights(perAddr int) *loginFlights {
	return &loginFlights{perAddr: perAddr, checks: map[string]*loginCheck{}, byAddr: map[string]int{}, refused: map[string]int{}}
}

// check runs a login's password check (run) within the bounds, joins the one in
// flight with the same password, or refuses with errLoginInFlight.
func (l *loginFlights) check(ctx context.Context, username, password, addr string, run func() (bool, *events.UserRecord, error)) (bool, *events.UserRecord, error) {
	c, first := l.enter(username, password, addr)
	if c == nil {
		return false, nil, errLoginInFlight
	}
	if !first {
		select {
		case <-c.done:
			return c.good, c.user, c.err
		case <-ctx.Done():
			return false, nil, ctx.Err()
		}
	}
	// Even if run panics, the places are given back and those who joined are answered.
	defer func() {
		l.leave(username, addr)
		close(c.done)
	}()
	c.good, c.user, c.err = run()
	return c.good, c.user, c.err
}

// enter returns the check to run (first) or to join for a login, or nil when it is
// refused; then the attempt is kept to be counted as a failure.
func (l *loginFlights) enter(username, password, addr string) (c *loginCheck, first bool) {
	uk, ak := throttleKeys(username, addr)
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.checks[uk]; c != nil {
		if subtle.ConstantTimeCompare([]byte(c.password), []byte(password)) == 1 {
			c.joined++
			return c, false
		}
	} else if ak == "" || l.byAddr[ak] < l.perAddr {
		c := &loginCheck{password: password, done: make(chan struct{})}
		l.checks[uk] = c
		if ak != "" {
			l.byAddr[ak]++
		}
		return c, true
	}
	for _, k := range []string{uk, ak} {
		if _, ok := l.refused[k]; k != "" && (ok || len(l.refused) < maxUncounted) {
			l.refused[k]++
		}
	}
	return nil, false
}

// leave gives back the places enter took.
func (l *loginFlights) leave(username, addr string) {
	uk, ak := throttleKeys(username, addr)
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.checks, uk)
	if ak != "" {
		if l.byAddr[ak]--; l.byAddr[ak] <= 0 {
			delete(l.byAddr, ak)
		}
	}
}

// takeRefused returns the refusals not yet counted and forgets them.
func (l *loginFlights) takeRefused() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.refused) == 0 {
		return nil
	}
	r := l.refused
	l.refused = map[string]int{}
	return r
}

// countRefusals adds the refused attempts to the shared failure counters every
// countRefusalsEach until ctx ends, and once more then.
func (s *Service) countRefusals(ctx context.Context) {
	tick := time.NewTicker(countRefusalsEach)
	defer tick.Stop()
	count := func(ctx context.Context) {
		refused := s.logins.takeRefused()
		if s.throttle == nil {
			return // no counters to add them to
		}
		for k, n := range refused {
			if err := s.throttle.bump(ctx, k, n); err != nil {
				s.log.Warn("refused logins not counted", "err", err)
				return
			}
		}
	}
	for {
		select {
		case <-tick.C:
			count(ctx)
		case <-ctx.Done():
			last, cancel := context.WithTimeout(context.Background(), time.Second)
			count(last)
			cancel()
			return
		}
	}
}
