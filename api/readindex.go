package api

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
)

// The read index (Raft's, built on JetStream). On a replicated bucket a read is
// linearizable by construction: it waits for a barrier, a write of this instance's
// heartbeat key sent after the read arrived, acknowledged at sequence B (B is past
// every write acknowledged before the read: one leader orders them); then it reads its
// keys with a direct get that any replica answers, taking the answer only from a copy
// that holds B (events/leaderread Snapshots), else asking again, and answers E008004
// after readIndexWait. Neither a follower behind nor a leader cut off by a partition
// and back can answer it old, whoever answers first. Reads arriving while a barrier is
// on its way share the next one: one write per round trip, whatever the load.
//
// On a bucket of one replica there is one copy, always current: reads take the local
// projector's view or read the key as before, with no barrier.

// readIndexWait bounds a read's wait for its barrier and for a copy that holds it.
const readIndexWait = leaderread.BarrierWait

// noDirectRecheck is how long reads go to the leader after the bucket showed direct
// gets off, before they try the read index again.
const noDirectRecheck = 10 * time.Second

// directOff reports whether the bucket lately showed direct gets off.
func (s *Service) directOff() bool { return time.Now().UnixNano() < s.noDirectUntil.Load() }

// floorKey marks a read's context with its barrier's sequence.
type floorKey struct{}

// readFloor returns the sequence a read's keys must be read at or past (0: none, a
// bucket of one replica).
func readFloor(ctx context.Context) uint64 {
	f, _ := ctx.Value(floorKey{}).(uint64)
	return f
}

// indexRead waits for a barrier for a read on a replicated bucket and marks ctx with
// it; on a bucket of one replica it returns ctx as it is.
func (s *Service) indexRead(ctx context.Context) (context.Context, error) {
	if s.barriers == nil {
		return ctx, nil
	}
	bctx, cancel := context.WithTimeout(ctx, readIndexWait)
	defer cancel()
	seq, err := s.barriers.Wait(bctx)
	if err != nil {
		s.metrics.refused(refusedNoQuorum)
		return ctx, events.Errorf(events.CodeOutcomeUnknown, "no write of this instance reached a quorum of NATS (%v): nothing read, try again", err)
	}
	return context.WithValue(ctx, floorKey{}, seq), nil
}

// sendBarrier returns the barriers' write: this instance's heartbeat key (quorum.go).
func (s *Service) sendBarrier(js jetstream.JetStream, subject string) func(ctx context.Context) (uint64, error) {
	return func(ctx context.Context) (uint64, error) { return s.writeHeartbeat(ctx, js, subject) }
}

// scanIndexed reads the last message of every key under a wildcard subject from a
// copy of the bucket that holds floor; ok is false when one answer cannot hold them all
// or the bucket serves no direct gets, and the caller lists them another way.
func (s *Service) scanIndexed(ctx context.Context, wildcard string, floor uint64) (map[string]*jetstream.RawStreamMsg, bool, error) {
	if s.directOff() {
		return nil, false, nil
	}
	msgs, err := s.indexedLast(ctx, []string{wildcard}, floor)
	if errors.Is(err, leaderread.ErrTooMany) || errors.Is(err, leaderread.ErrNoDirect) {
		return nil, false, nil
	}
	return msgs, err == nil, err
}

// indexedLast is Snapshots.Last on the bucket from a copy that holds floor, within
// readIndexWait. ErrNoDirect and ErrTooMany are for the caller to read another way;
// anything else that ends the read without an answer (a copy behind, nobody answering,
// the read's own time) is E008004: nothing read, try again.
func (s *Service) indexedLast(ctx context.Context, subjects []string, floor uint64) (map[string]*jetstream.RawStreamMsg, error) {
	rctx, cancel := context.WithTimeout(ctx, readIndexWait)
	defer cancel()
	// NATS subtlety: any replica answers a direct get, from its own copy; the floor
	// (a barrier's sequence) makes a copy behind wait or fail rather than answer.
	msgs, err := s.snaps.Last(rctx, s.kvStream.CachedInfo().Config.Name, s.heartbeatSubject, subjects, floor)
	switch {
	case err == nil, errors.Is(err, leaderread.ErrTooMany):
		return msgs, err
	case errors.Is(err, leaderread.ErrNoDirect):
		// An older attrd turned them off (a rolling upgrade): read from the leader
		// for a while, then look again.
		s.noDirectUntil.Store(time.Now().Add(noDirectRecheck).UnixNano())
		return nil, err
	case errors.Is(err, leaderread.ErrBehind):
		s.metrics.refused(refusedBehind)
		return nil, events.Errorf(events.CodeOutcomeUnknown, "no copy of the bucket that holds every write acknowledged before this read answered (%v): nothing read, try again", err)
	}
	return nil, events.Errorf(events.CodeOutcomeUnknown, "no copy of the bucket answered this read (%v): nothing read, try again", err)
}

// readIndexed reads key from a copy of the bucket that holds floor (readIndexedKeys).
func (s *Service) readIndexed(ctx context.Context, key string, floor uint64) (rec any, ok bool, err error) {
	recs, ok, err := s.readIndexedKeys(ctx, []string{key}, floor)
	return recs[key], ok, err
}

// readIndexedKeys reads keys, in one request (a few hundred at a time), from a copy of
// the bucket that holds floor: their records by key (absent: none, deleted or expired);
// ok is false when the bucket serves no direct gets (an older attrd turned them off),
// and the caller reads another way.
func (s *Service) readIndexedKeys(ctx context.Context, keys []string, floor uint64) (map[string]any, bool, error) {
	if s.directOff() {
		return nil, false, nil
	}
	subjects := make([]string, len(keys))
	for i, k := range keys {
		subjects[i] = events.KVSubject(s.cfg.Bucket, k)
	}
	msgs, cached := fromPrefetch(ctx, subjects)
	if !cached {
		var err error
		msgs, err = s.indexedLast(ctx, subjects, floor)
		switch {
		case errors.Is(err, leaderread.ErrNoDirect):
			return nil, false, nil
		case err != nil:
			return nil, true, fmt.Errorf("read %d keys: %w", len(keys), err)
		}
	}
	recs := make(map[string]any, len(keys))
	for i, k := range keys {
		m := msgs[subjects[i]]
		if m == nil || events.IsMarker(m.Header) {
			continue
		}
		rec, err := events.DecodeRecord(k, m.Data)
		if err != nil {
			return nil, true, err
		}
		recs[k] = rec
	}
	return recs, true, nil
}

// prefetched is one read index request that served a whole read: the keys it asked for
// (their subjects) and their last messages, from one copy holding the read's barrier.
// A read's later key reads are answered from it when it asked for them all.
type prefetched struct {
	asked map[string]bool
	msgs  map[string]*jetstream.RawStreamMsg
}

type prefetchKey struct{}

// prefetch reads, in one request, the keys a read of attributes will most likely need
// (its caller's session and user, as the session cache names the user, and the
// attributes asked for, of the user or of the caller's own session), and marks ctx with
// them: one round trip instead of one per step. A guess that was wrong (the cache
// behind) costs only the requests the read would have made anyway.
func (s *Service) prefetch(ctx context.Context, session bool, req *Request) context.Context {
	floor := readFloor(ctx)
	if floor == 0 || s.directOff() {
		return ctx
	}
	ust := req.CurrentUST
	if !session && req.UST != "" {
		ust = req.UST
	}
	if ust == "" {
		return ctx
	}
	sid := events.SessionID(ust)
	cached, _, _, ok := s.sessions.get(sid)
	if !ok || cached == nil {
		return ctx
	}
	names, _, err := req.names(s.cfg.Limits)
	if err != nil || len(names) == 0 {
		return ctx
	}
	prefix := events.AttrPrefix(cached.UserID, "")
	switch {
	case session && events.SessionID(req.TargetUST) != sid:
		return ctx // another session's attributes: its user is not known yet
	case session:
		prefix = events.AttrPrefix(cached.UserID, sid)
	case req.UserID != "" && req.UserID != cached.UserID:
		if !events.ValidUserID(req.UserID) {
			return ctx
		}
		prefix = events.AttrPrefix(req.UserID, "")
	}
	keys := []string{events.SessionKey(sid), events.UserKey(cached.UserID)}
	for _, n := range names {
		keys = append(keys, prefix+events.EncodeName(n))
	}
	subjects := make([]string, len(keys))
	asked := make(map[string]bool, len(keys))
	for i, k := range keys {
		subjects[i] = events.KVSubject(s.cfg.Bucket, k)
		asked[subjects[i]] = true
	}
	msgs, err := s.indexedLast(ctx, subjects, floor)
	if err != nil {
		return ctx // the read's own requests say what is wrong
	}
	return context.WithValue(ctx, prefetchKey{}, &prefetched{asked: asked, msgs: msgs})
}

// fromPrefetch returns the last messages of subjects from ctx's prefetch, when it
// asked for them all.
func fromPrefetch(ctx context.Context, subjects []string) (map[string]*jetstream.RawStreamMsg, bool) {
	p, _ := ctx.Value(prefetchKey{}).(*prefetched)
	if p == nil {
		return nil, false
	}
	for _, subj := range subjects {
		if !p.asked[subj] {
			return nil, false
		}
	}
	return p.msgs, true
}
