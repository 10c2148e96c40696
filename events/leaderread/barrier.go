package leaderread

import (
	"context"
	"sync"
	"time"
)

// BarrierWait bounds one barrier write: a stream whose group has no leader takes none,
// and the reads waiting for it are refused rather than held.
const BarrierWait = 2 * time.Second

// Barriers sends a stream's barrier writes, the first step of a read index read: a
// write sent after the read arrived, whose acknowledged sequence is past every write
// acknowledged before the read (one leader orders them). One is in flight at a time;
// the next is shared by every read that arrives meanwhile: one write per round trip,
// whatever the load.
type Barriers struct {
	send func(ctx context.Context) (uint64, error)
	mu   sync.Mutex
	// next is the barrier to send after the one in flight (sending); reads arriving
	// now wait for it.
	next    *barrier
	sending bool
}

// barrier is one barrier write: done is closed once seq (its sequence) or err is set.
type barrier struct {
	done chan struct{}
	seq  uint64
	err  error
}

// NewBarriers returns Barriers that write with send, which returns the acknowledged
// sequence of one write to the stream the reads read.
func NewBarriers(send func(ctx context.Context) (uint64, error)) *Barriers {
	return &Barriers{send: send}
}

// Wait returns the sequence of a barrier sent after the call began.
func (b *Barriers) Wait(ctx context.Context) (uint64, error) {
	b.mu.Lock()
	if b.next == nil {
		b.next = &barrier{done: make(chan struct{})}
	}
	w := b.next
	if !b.sending {
		b.sending = true
		go b.run()
	}
	b.mu.Unlock()
	select {
	case <-w.done:
		return w.seq, w.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// run sends the waiting barriers one after the other until none waits.
func (b *Barriers) run() {
	for {
		b.mu.Lock()
		w := b.next
		b.next = nil
		if w == nil {
			b.sending = false
			b.mu.Unlock()
			return
		}
		b.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), BarrierWait)
		w.seq, w.err = b.send(ctx)
		cancel()
		close(w.done)
	}
}
