package api

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// Linearizable reads. A read must never return a value older than one whose write was
// acknowledged before the read was sent, on either side of a network partition. On a
// replicated bucket the read index (readindex.go) makes it so by construction; what
// follows came first and stays as the first gate (it refuses early, without a write,
// what the read index would refuse after its bound). A NATS
// server cut off from the others may still be, for seconds, the leader of a stream's
// Raft group in its own eyes (it steps down only after 10 s without a quorum), and
// answer reads from what it has, while the other side elects a leader and acknowledges
// writes. So an instance answers a read only while it has shown, within the last
// quorumBound, that its server reaches a quorum: it writes a heartbeat key into the
// projection bucket every quorumEvery, and a write is acknowledged only once a majority
// of the bucket's Raft group stored it. The other side cannot acknowledge a write
// through a new leader sooner than nats-server's minimum election timeout (4 s) after
// its followers last heard from the old one, which was no earlier than the heartbeat
// was sent; quorumBound (1.5 s) is well inside it. Otherwise the read is refused with
// E008004: nothing was read, try again (another instance may answer it).
//
// Reads also authenticate their caller afresh (the session cache, fed by a KV watch,
// can be behind a logout elsewhere by the watch's delay): on a replicated bucket through
// the read index; on one replica from this instance's own projector when it folds the
// caller's partition, else from KV. Writes may use the cache: the fold checks the
// caller's session again, in log order.

// Two servers answering as a stream's leader. A read takes the first answer, and the
// stream leader cut off with this instance's node answers first, from its old copy,
// when the cut heals and before it hears of the new leader (the quorum heartbeat,
// acknowledged by the new leader, does not rule that out). So after a loss of the
// quorum, reads wait until heartbeats have been acknowledged for quorumSettle: the old
// leader hears of the new one within a Raft heartbeat (1 s) of the routes' return, and
// the acknowledgement shows they are back. And when two answers to one read differ
// (events/leaderread), reads are refused for twoLeadersHold.

// The heartbeat's cadence, how long after a heartbeat was sent reads are answered, and
// how long after a loss of the quorum and after two leaders they wait.
const (
	quorumEvery    = 250 * time.Millisecond
	quorumBound    = 1500 * time.Millisecond
	quorumSettle   = 1500 * time.Millisecond
	twoLeadersHold = 2 * time.Second
)

// readKey marks a request context as a read that must be linearizable.
type readKey struct{}

// reading returns ctx marked as a linearizable read, or the refusal when this
// instance has not shown within quorumBound that it reaches a quorum.
func (s *Service) reading(ctx context.Context) (context.Context, error) {
	if since := time.Since(time.Unix(0, s.quorum.Load())); since > quorumBound {
		s.metrics.refused(refusedNoQuorum)
		return ctx, events.Errorf(events.CodeOutcomeUnknown,
			"this instance has not reached a quorum of NATS for %s: nothing read, try again", since.Round(time.Millisecond))
	}
	if back := time.Since(time.Unix(0, s.quorumBack.Load())); back < quorumSettle {
		s.metrics.refused(refusedNoQuorum)
		return ctx, events.Errorf(events.CodeOutcomeUnknown,
			"this instance reached a quorum of NATS again %s ago, after losing it: nothing read, try again", back.Round(time.Millisecond))
	}
	if since := s.leader.TwoLeadersSince(); since < twoLeadersHold {
		s.metrics.refused(refusedTwoLeaders)
		return ctx, events.Errorf(events.CodeOutcomeUnknown,
			"two NATS servers answered as a stream's leader %s ago (one is back from a network cut): nothing read, try again", since.Round(time.Millisecond))
	}
	return s.indexRead(context.WithValue(ctx, readKey{}, true))
}

// isRead reports whether ctx is a linearizable read's.
func isRead(ctx context.Context) bool { return ctx.Value(readKey{}) != nil }

// heartbeat writes this instance's heartbeat key once (writeHeartbeat), within
// quorumBound.
func (s *Service) heartbeat(ctx context.Context, js jetstream.JetStream, subject string) error {
	ctx, cancel := context.WithTimeout(ctx, quorumBound)
	defer cancel()
	_, err := s.writeHeartbeat(ctx, js, subject)
	return err
}

// writeHeartbeat writes this instance's heartbeat key and, when the write is
// acknowledged, notes when it was sent; it returns the write's sequence.
func (s *Service) writeHeartbeat(ctx context.Context, js jetstream.JetStream, subject string) (uint64, error) {
	sent := time.Now()
	seq, err := events.Barrier(js, subject, []byte(s.inbox))(ctx)
	if err != nil {
		return 0, err
	}
	s.reachedQuorum(sent)
	return seq, nil
}

// reachedQuorum notes a heartbeat (or a barrier) sent at sent and acknowledged.
func (s *Service) reachedQuorum(sent time.Time) {
	for {
		old := s.quorum.Load()
		if old >= sent.UnixNano() {
			return
		}
		if s.quorum.CompareAndSwap(old, sent.UnixNano()) {
			if old != 0 && sent.Sub(time.Unix(0, old)) > quorumBound {
				s.quorumBack.Store(sent.UnixNano()) // acknowledged again after a loss
			}
			return
		}
	}
}

// keepQuorum writes the heartbeat every quorumEvery until ctx ends.
func (s *Service) keepQuorum(ctx context.Context, js jetstream.JetStream, subject string) {
	t := time.NewTicker(quorumEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := s.heartbeat(ctx, js, subject); err != nil && ctx.Err() == nil {
			s.log.Debug("no quorum heartbeat", "err", err)
		}
	}
}
