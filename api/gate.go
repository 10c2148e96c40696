package api

import (
	"container/list"
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/attrd/attrd/events"
)

// Gate bounds work done at once and shares the waiting fairly. At most slots run
// together. Those that wait are queued by key (an address, a username, a user) and
// served round-robin over the keys, so that one key with many waiters never makes
// another key wait behind all of them. At most queue wait (queue < 0: any number),
// and no more than would get a slot within wait, judged by the recent mean time of a
// run. When that is full, a newcomer takes the place of the last waiter of the key
// holding the most places, if that key holds more than the newcomer's would; else it
// is refused at once. One still waiting when wait ends is refused then. A refusal is
// busy (E008004, HTTP 503: nothing was done) and says when to come back
// (events.Error.RetryAfter). It bounds password hashing (argon2id takes ~19 MiB and a
// core's worth of time per hash), history folds and the REST requests in flight.
type Gate struct {
	mu      sync.Mutex
	slots   int
	free    int
	queue   int
	wait    time.Duration
	what    string
	waiting int
	// keys holds the keys with waiters in the order they are served (*gateKey);
	// byKey finds a key's element.
	keys  list.List
	byKey map[string]*list.Element
	// mean is the recent mean time of a run (an exponential moving average).
	mean time.Duration
	// refused counts the requests refused as busy (metrics).
	refused atomic.Uint64
}

// busy counts a refusal and returns its error.
func (g *Gate) busy(retryAfter time.Duration) error {
	g.refused.Add(1)
	return errBusy(g.what, retryAfter)
}

// Refused returns how many requests the gate refused as busy.
func (g *Gate) Refused() uint64 { return g.refused.Load() }

// Load returns the slots in use and the requests waiting for one.
func (g *Gate) Load() (busy, waiting int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.slots - g.free, g.waiting
}

// gateKey is one key's waiters, first come first.
type gateKey struct {
	key     string
	waiters list.List // of *waiter
}

// waiter is one caller waiting for a slot. ready is closed, under the gate's lock, when
// its wait is over: with granted set when a slot was handed to it, without when it was
// refused to make room for a key with fewer places.
type waiter struct {
	ready   chan struct{}
	granted bool
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
	return &Gate{slots: slots, free: slots, queue: queue, wait: wait, what: what, byKey: map[string]*list.Element{}}
}

// errBusy is the answer to a request refused by a load bound: nothing was done, and
// the client may come back after retryAfter (E008004, HTTP 503).
func errBusy(what string, retryAfter time.Duration) error {
	err := events.Errorf(events.CodeOutcomeUnknown, "busy: too many %s at once; nothing was done, try again", what)
	err.RetryAfter = max(retryAfter, time.Second)
	return err
}

// Do runs f in a slot, waiting its key's turn, or refuses with a busy error when no
// slot would free up in time.
func (g *Gate) Do(ctx context.Context, key string, f func()) error {
	if err := g.acquire(ctx, key); err != nil {
		return err
	}
	start := time.Now()
	defer func() { g.release(time.Since(start)) }()
	f()
	return nil
}

// Admits reports, without taking anything, whether a caller of key would now get a
// slot or a place in the queue; when not, the busy refusal it would get. A caller
// checks it before costly work that leads to the gate (reads, lookups), so that a
// flood is refused before that work, not after it.
func (g *Gate) Admits(key string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	_, err := g.admit(key)
	return err
}

// admit decides whether a new caller of key may wait. When the queue is full (or
// would not serve it in time), it may still wait if another key holds more places
// than key would: that key's last waiter is the victim, refused to make room. So a
// full queue is shared fairly too: no key keeps another out by numbers.
func (g *Gate) admit(key string) (victim *gateKey, err error) {
	if g.free > 0 && g.waiting == 0 {
		return nil, nil
	}
	// Ahead of a new waiter: every waiter, and the runs in every slot.
	ahead := g.startsIn(g.waiting + 1)
	if (g.queue < 0 || g.waiting < g.queue) && ahead <= g.wait {
		return nil, nil
	}
	mine := 0
	if ke, ok := g.byKey[key]; ok {
		mine = ke.Value.(*gateKey).waiters.Len()
	}
	for e := g.keys.Front(); e != nil; e = e.Next() {
		if gk := e.Value.(*gateKey); gk.waiters.Len() > mine+1 && (victim == nil || gk.waiters.Len() > victim.waiters.Len()) {
			victim = gk
		}
	}
	if victim == nil {
		return nil, g.busy(ahead)
	}
	return victim, nil
}

// acquire takes a slot for key, waiting its turn.
func (g *Gate) acquire(ctx context.Context, key string) error {
	g.mu.Lock()
	if g.free > 0 && g.waiting == 0 {
		g.free--
		g.mu.Unlock()
		return nil
	}
	victim, err := g.admit(key)
	if err != nil {
		g.mu.Unlock()
		return err
	}
	if victim != nil {
		last := victim.waiters.Back()
		g.dequeue(victim, last)
		close(last.Value.(*waiter).ready) // not granted: refused
	}
	w := &waiter{ready: make(chan struct{})}
	gk, el := g.enqueue(key, w)
	g.mu.Unlock()

	timer := time.NewTimer(g.wait)
	defer timer.Stop()
	select {
	case <-w.ready:
	case <-timer.C:
	case <-ctx.Done():
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if w.granted {
		return nil // a slot came (maybe as the wait ended: take it)
	}
	select {
	case <-w.ready: // made room for a key with fewer places: already out of the queue
	default:
		g.dequeue(gk, el)
	}
	return g.busy(g.startsIn(g.waiting + 1))
}

// startsIn estimates how long the n-th waiter waits for its slot: n runs of the mean
// time, shared by the slots. It is 0 until a run was timed.
func (g *Gate) startsIn(n int) time.Duration {
	return time.Duration(n) * g.mean / time.Duration(g.slots)
}

// enqueue adds w behind key's waiters; a key with no waiters goes behind every key.
func (g *Gate) enqueue(key string, w *waiter) (*gateKey, *list.Element) {
	ke, ok := g.byKey[key]
	if !ok {
		ke = g.keys.PushBack(&gateKey{key: key})
		g.byKey[key] = ke
	}
	gk := ke.Value.(*gateKey)
	g.waiting++
	return gk, gk.waiters.PushBack(w)
}

// dequeue takes a waiter out of its key's queue, and the key out of the order when it
// has no more.
func (g *Gate) dequeue(gk *gateKey, el *list.Element) {
	gk.waiters.Remove(el)
	g.waiting--
	if gk.waiters.Len() == 0 {
		g.keys.Remove(g.byKey[gk.key])
		delete(g.byKey, gk.key)
	}
}

// release ends a run that took d: the slot goes to the first waiter of the next key
// in turn, and that key, if it has more waiters, goes behind the others.
func (g *Gate) release(d time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.mean == 0 {
		g.mean = d
	} else {
		g.mean += (d - g.mean) / 8
	}
	ke := g.keys.Front()
	if ke == nil {
		g.free++
		return
	}
	gk := ke.Value.(*gateKey)
	w := gk.waiters.Front().Value.(*waiter)
	g.dequeue(gk, gk.waiters.Front())
	if gk.waiters.Len() > 0 {
		g.keys.MoveToBack(ke)
	}
	w.granted = true
	close(w.ready)
}

// checkPassword checks a password within the hashing bound, waiting key's turn.
func (s *Service) checkPassword(ctx context.Context, key, password, hash string) (bool, error) {
	var ok bool
	err := s.hashes.Do(ctx, key, func() { ok = CheckPassword(password, hash) })
	return ok, err
}

// hashPassword hashes a new password within the hashing bound, waiting key's turn.
func (s *Service) hashPassword(ctx context.Context, key, password string) (string, error) {
	var h string
	var herr error
	if err := s.hashes.Do(ctx, key, func() { h, herr = HashPassword(password, s.cfg.Password) }); err != nil {
		return "", err
	}
	return h, herr
}
