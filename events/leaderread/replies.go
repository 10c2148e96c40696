package leaderread

import (
	"strconv"
	"sync"

	"github.com/nats-io/nats.go"
)

// Replies receives the answers to requests the service sends itself (its appends'
// probes, its reads of the streams) on one wildcard subscription, <prefix>.<token>,
// and hands each to the request waiting on its token: no subscription per request.
type Replies struct {
	prefix string
	sub    *nats.Subscription
	keep   func(*nats.Msg) bool // nil: every answer is handed on
	mu     sync.Mutex
	seq    uint64
	wait   map[string]chan *nats.Msg
}

// NewReplies subscribes to a fresh inbox prefix; keep, if set, drops the answers no
// request needs before they are handed on (cheaply, in the subscription's goroutine).
func NewReplies(nc *nats.Conn, keep func(*nats.Msg) bool) (*Replies, error) {
	r := &Replies{prefix: nc.NewInbox(), keep: keep, wait: map[string]chan *nats.Msg{}}
	sub, err := nc.Subscribe(r.prefix+".*", r.onReply)
	if err != nil {
		return nil, err
	}
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		return nil, err
	}
	r.sub = sub
	return r, nil
}

// Close unsubscribes.
func (r *Replies) Close() error { return r.sub.Unsubscribe() }

// Await registers a request that takes up to n answers at once (more are dropped): it
// returns their channel, the reply subject to send the request with, and forget, which
// unregisters it.
func (r *Replies) Await(n int) (answers <-chan *nats.Msg, subject string, forget func()) {
	ch := make(chan *nats.Msg, n)
	r.mu.Lock()
	r.seq++
	token := strconv.FormatUint(r.seq, 36)
	r.wait[token] = ch
	r.mu.Unlock()
	return ch, r.prefix + "." + token, func() {
		r.mu.Lock()
		delete(r.wait, token)
		r.mu.Unlock()
	}
}

func (r *Replies) onReply(m *nats.Msg) {
	if r.keep != nil && !r.keep(m) {
		return
	}
	token := m.Subject[len(r.prefix)+1:]
	r.mu.Lock()
	ch := r.wait[token]
	r.mu.Unlock()
	if ch != nil {
		select {
		case ch <- m:
		default: // more answers than the request takes
		}
	}
}
