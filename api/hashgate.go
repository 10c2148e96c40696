package api

import (
	"context"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/attrd/attrd/events"
)

// hashGate bounds password hashing: argon2id takes ~19 MiB and a core's worth of time
// per hash, so unbounded concurrent logins would exhaust memory and starve every other
// request. At most slots hashes run at once; up to queue more wait at most wait for a
// slot; anything beyond is refused at once, before any hashing.
type hashGate struct {
	slots   chan struct{}
	waiting atomic.Int64
	queue   int64
	wait    time.Duration
}

// Defaults of the password-hashing bound.
var (
	// DefaultPasswordConcurrency leaves half the cores to everything else.
	DefaultPasswordConcurrency = max(1, runtime.NumCPU()/2)
	DefaultPasswordQueue       = 64
	DefaultPasswordWait        = 2 * time.Second
)

func newHashGate(slots, queue int, wait time.Duration) *hashGate {
	return &hashGate{slots: make(chan struct{}, slots), queue: int64(queue), wait: wait}
}

// errBusy is the answer to a request refused by a load bound: nothing was done, and
// the client may retry (E008004, HTTP 503).
func errBusy(what string) error {
	return events.Errorf(events.CodeOutcomeUnknown, "busy: too many %s at once; nothing was done, try again", what)
}

// do runs f in a slot, or refuses with errBusy when none frees up in time.
func (g *hashGate) do(ctx context.Context, f func()) error {
	if g.waiting.Add(1) > g.queue+int64(cap(g.slots)) {
		g.waiting.Add(-1)
		return errBusy("password checks")
	}
	defer g.waiting.Add(-1)
	timer := time.NewTimer(g.wait)
	defer timer.Stop()
	select {
	case g.slots <- struct{}{}:
	case <-timer.C:
		return errBusy("password checks")
	case <-ctx.Done():
		return errBusy("password checks")
	}
	defer func() { <-g.slots }()
	f()
	return nil
}

// checkPassword checks a password within the hashing bound.
func (s *Service) checkPassword(ctx context.Context, password, hash string) (bool, error) {
	var ok bool
	err := s.hashes.do(ctx, func() { ok = CheckPassword(password, hash) })
	return ok, err
}

// hashPassword hashes a new password within the hashing bound.
func (s *Service) hashPassword(ctx context.Context, password string) (string, error) {
	var h string
	var herr error
	if err := s.hashes.do(ctx, func() { h, herr = HashPassword(password, s.cfg.Password) }); err != nil {
		return "", err
	}
	return h, herr
}
