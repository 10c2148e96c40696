package api

import (
	"context"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/attrd/attrd/events"
)

// Gate bounds work done at once: at most slots run together; up to queue more wait
// at most wait for a slot (queue < 0: any number may wait); anything beyond, or
// anything still waiting when wait ends, is refused at once as busy (E008004, HTTP
// 503: nothing was done, the client may retry). It bounds password hashing (argon2id
// takes ~19 MiB and a core's worth of time per hash), history folds and the REST
// requests in flight.
type Gate struct {
	slots   chan struct{}
	waiting atomic.Int64
	queue   int64
	wait    time.Duration
	what    string
}

// Defaults of the password-hashing bound.
var (
	// DefaultPasswordConcurrency leaves half the cores to everything else.
	DefaultPasswordConcurrency = max(1, runtime.NumCPU()/2)
	DefaultPasswordQueue       = 64
	DefaultPasswordWait        = 2 * time.Second
)

// NewGate returns a gate; what names the work in the busy refusal ("password checks").
func NewGate(slots, queue int, wait time.Duration, what string) *Gate {
	return &Gate{slots: make(chan struct{}, slots), queue: int64(queue), wait: wait, what: what}
}

// errBusy is the answer to a request refused by a load bound: nothing was done, and
// the client may retry (E008004, HTTP 503).
func errBusy(what string) error {
	return events.Errorf(events.CodeOutcomeUnknown, "busy: too many %s at once; nothing was done, try again", what)
}

// Do runs f in a slot, or refuses with a busy error when none frees up in time.
func (g *Gate) Do(ctx context.Context, f func()) error {
	waiting := g.waiting.Add(1)
	defer g.waiting.Add(-1)
	if g.queue >= 0 && waiting > g.queue+int64(cap(g.slots)) {
		return errBusy(g.what)
	}
	timer := time.NewTimer(g.wait)
	defer timer.Stop()
	select {
	case g.slots <- struct{}{}:
	case <-timer.C:
		return errBusy(g.what)
	case <-ctx.Done():
		return errBusy(g.what)
	}
	defer func() { <-g.slots }()
	f()
	return nil
}

// checkPassword checks a password within the hashing bound.
func (s *Service) checkPassword(ctx context.Context, password, hash string) (bool, error) {
	var ok bool
	err := s.hashes.Do(ctx, func() { ok = CheckPassword(password, hash) })
	return ok, err
}

// hashPassword hashes a new password within the hashing bound.
func (s *Service) hashPassword(ctx context.Context, password string) (string, error) {
	var h string
	var herr error
	if err := s.hashes.Do(ctx, func() { h, herr = HashPassword(password, s.cfg.Password) }); err != nil {
		return "", err
	}
	return h, herr
}
