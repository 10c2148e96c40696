package projector

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
)

// Lease is one instance's claim to fold a partition: the key l.<partition> of the
// bucket, written with compare-and-set and a per-message TTL. The holder renews it
// every TTL/3; if the holder dies, the server expires the key and another instance
// takes it. The lease decides who folds; what makes a deposed holder harmless is the
// intent record's compare-and-set (the new holder rewrites the record before folding,
// so the old one's next record fails) and the compare-and-set of every key write.
type Lease struct {
	js      jetstream.JetStream
	stream  jetstream.Stream
	subject string
	// reads, if set, reads the lease from the bucket's leader (lastOf).
	reads *leaderread.Reader
	owner string
	ttl   time.Duration
	rev   uint64 // the lease message's sequence while held
	until time.Time
	// valid is until in Unix ns, for Valid (read by other goroutines).
	valid atomic.Int64
	// Progress, if set, is written with every renewal (the holder's applied sequence),
	// so that any instance can tell how far the log is folded.
	Progress func() uint64
	// RenewFailed, if set, is called for each renewal that fails (metrics).
	RenewFailed func()
}

// LeaseRecord is the lease key's value (events.LeaseRecord).
type LeaseRecord = events.LeaseRecord

// DefaultLeaseTTL is how long a lease outlives its holder's last renewal: the bound on
// a takeover after a holder dies (plus up to a second of the server's expiry timer and
// the waiting instance's poll).
const DefaultLeaseTTL = 2 * time.Second

// NewLease returns the lease of a partition in bucket for owner (a name for logs).
func NewLease(ctx context.Context, js jetstream.JetStream, bucket, partition, owner string, ttl time.Duration) (*Lease, error) {
	st, err := js.Stream(ctx, events.KVStream(bucket))
	if err != nil {
		return nil, err
	}
	if ttl <= 0 {
		ttl = DefaultLeaseTTL
	}
	return &Lease{js: js, stream: st, subject: events.KVSubject(bucket, events.LeaseKey(partition)), owner: owner, ttl: ttl}, nil
}

// TTL is the lease's time to live.
func (l *Lease) TTL() time.Duration { return l.ttl }

// Holder reads the lease of a partition from the bucket's stream (kvStream): its
// record, and whether anybody holds it (a lease not renewed for DefaultLeaseTTL is
// nobody's). It reads as the stream handle does (on a replicated bucket, a direct get
// from any replica: a moment behind at most), for status and readiness; the projector's
// own decisions read the lease from the leader.
func Holder(ctx context.Context, kvStream jetstream.Stream, bucket, partition string) (LeaseRecord, bool, error) {
	return holderWithin(ctx, nil, kvStream, bucket, partition, DefaultLeaseTTL)
}

// holderWithin is Holder for leases of the given TTL, read through reads if set.
func holderWithin(ctx context.Context, reads *leaderread.Reader, kvStream jetstream.Stream, bucket, partition string, ttl time.Duration) (LeaseRecord, bool, error) {
	l := &Lease{stream: kvStream, subject: events.KVSubject(bucket, events.LeaseKey(partition)), ttl: ttl, reads: reads}
	r, _, err := l.holder(ctx)
	return r, r.Owner != "", err
}

// Acquire waits until it holds the lease, polling every poll, or ctx ends. A lease
// that names this owner is a run of its own that ended without giving it up (its
// release lost): it is taken over at once rather than at its expiry.
func (l *Lease) Acquire(ctx context.Context, poll time.Duration) error {
	for {
		holder, rev, err := l.holder(ctx)
		if err == nil && (holder.Owner == "" || holder.Owner == l.owner) {
			if err = l.write(ctx, rev); err == nil {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(poll):
		}
	}
}

// lapsed reports whether a key kept alive by renewals every TTL/3 (a lease, a presence)
// has lapsed: its last message is a marker (expired, released), or was written longer
// ago than ttl and a margin for clocks (ttl 0: no such test).
func lapsed(m *jetstream.RawStreamMsg, ttl time.Duration) bool {
	return events.IsMarker(m.Header) || ttl > 0 && time.Since(m.Time) > ttl+leaseMargin
}

// holder reads the lease key: its record (Owner "": nobody holds it) and revision. A
// lease written longer ago than its TTL (and a margin for clocks) is nobody's, even
// before the server has marked it expired: right after an election the new leader of
// the bucket takes a moment to expire what is overdue, and its holder stopped counting
// on it (Valid) before then.
func (l *Lease) holder(ctx context.Context) (LeaseRecord, uint64, error) {
	var r LeaseRecord
	m, err := lastOf(ctx, l.reads, l.stream, l.subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return r, 0, nil
	}
	if err != nil {
		return r, 0, err
	}
	if lapsed(m, l.ttl) {
		return r, m.Sequence, nil // expired or released
	}
	if err := events.Unmarshal(m.Data, &r); err != nil {
		return LeaseRecord{}, m.Sequence, nil // unreadable: take it over
	}
	return r, m.Sequence, nil
}

// write claims or renews the lease on top of revision rev.
func (l *Lease) write(ctx context.Context, rev uint64) error {
	r := LeaseRecord{Owner: l.owner}
	if l.Progress != nil {
		r.Applied = l.Progress()
	}
	data, err := events.Marshal(&r)
	if err != nil {
		return err
	}
	sent := time.Now()
	// Nats-TTL makes the server remove a lease nobody renews; compare-and-set on the
	// key's last sequence makes a claim or a renewal fail if anyone else wrote it.
	ack, err := l.js.PublishMsg(ctx, &nats.Msg{Subject: l.subject, Data: data},
		jetstream.WithExpectLastSequencePerSubject(rev), jetstream.WithMsgTTL(l.ttl))
	if err != nil {
		return err
	}
	l.rev, l.until = ack.Sequence, sent.Add(l.ttl)
	l.valid.Store(l.until.UnixNano())
	return nil
}

// leaseMargin is how long before its end a lease is no longer counted on: for timers
// that fire late and clocks that run at slightly different rates.
const leaseMargin = 200 * time.Millisecond

// Valid reports whether this holder's lease is certainly still its own: its last
// renewal was sent less than the TTL (less a margin) ago. Another instance can claim
// it only once the server has expired it, which is after that.
func (l *Lease) Valid() bool {
	return time.Now().UnixNano() < l.valid.Load()-int64(leaseMargin)
}

// ErrLeaseLost says another instance holds the lease now.
var ErrLeaseLost = errors.New("the projector's lease was taken by another instance")

// Keep renews the lease every TTL/3 until ctx ends (nil) or the lease is lost:
// another instance wrote it (ErrLeaseLost), or no renewal succeeded before it expired.
func (l *Lease) Keep(ctx context.Context) error {
	t := time.NewTicker(l.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, l.ttl/3)
		err := l.write(rctx, l.rev)
		cancel()
		if err != nil && l.RenewFailed != nil {
			l.RenewFailed()
		}
		switch {
		case err == nil:
		case isConflict(err):
			return ErrLeaseLost
		case time.Now().After(l.until):
			return fmt.Errorf("%w: no renewal within %s: %v", ErrLeaseLost, l.ttl, err)
		}
	}
}

// Release gives the lease up so that another instance takes over at once.
func (l *Lease) Release(ctx context.Context) error {
	err := l.release(ctx, l.rev)
	if isConflict(err) {
		// A renewal sent as the run stopped may be stored with its acknowledgement lost
		// (its context ended first): the lease moved on without this holder knowing.
		// Still its own at the last revision: released there; anyone else's: left.
		if r, rev, herr := l.holder(ctx); herr == nil && r.Owner == l.owner && rev != 0 {
			err = l.release(ctx, rev)
		}
	}
	return err
}

// release deletes the lease on top of revision rev (compare-and-set: only this
// holder's own).
func (l *Lease) release(ctx context.Context, rev uint64) error {
	m := &nats.Msg{Subject: l.subject, Header: nats.Header{}}
	m.Header.Set("KV-Operation", "DEL")
	_, err := l.js.PublishMsg(ctx, m, jetstream.WithExpectLastSequencePerSubject(rev), jetstream.WithMsgTTL(deleteMarkerTTL))
	return err
}
