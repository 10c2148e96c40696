package projector

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/attrd/attrd/events"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// intent encodes the intent record of a folded chunk: its sequences, decisions, and
// the state before the chunk of every recorded key (rewritten keys are not recorded).
// With a chunk still in flight (prev: its writes not all acknowledged), the record
// covers both: from prev's first event, with prev's decisions too, and the state
// before prev of every key either changed, so that recovery folds both again from a
// state that holds whatever part of prev reached KV.
func (p *Projector) intent(prev *flight, items []item, decisions []events.Decision) ([]byte, error) {
	ck := &events.Checkpoint{First: items[0].seq, Last: items[len(items)-1].seq, Decisions: decisions,
		Before: make([]events.KeyState, 0, len(p.view.before))}
	seen := map[string]bool{}
	if prev != nil {
		ck.First = prev.items[0].seq
		ck.Decisions = append(slices.Clip(prev.decisions), decisions...)
		for _, ks := range prev.before {
			ck.Before = append(ck.Before, ks)
			seen[ks.Key] = true
		}
	}
	for _, ks := range p.recorded() {
		if !seen[ks.Key] {
			ck.Before = append(ck.Before, ks)
		}
	}
	return events.Marshal(ck)
}

// recorded returns the chunk's recorded keys with their states before it, and the
// revisions those states were read at.
func (p *Projector) recorded() []events.KeyState {
	out := make([]events.KeyState, 0, len(p.view.before))
	for _, k := range p.view.dirty {
		if b, ok := p.view.before[k]; ok {
			ks := events.KeyState{Key: k, Data: b}
			if old := p.view.undo[k]; old != nil && !p.view.unverified[k] {
				ks.Rev = old.rev
			}
			out = append(out, ks)
		}
	}
	return out
}

// writeWindow bounds the writes awaiting their acks, below the publisher's own limit
// (a renewal or a logout may write thousands of keys).
const writeWindow = 4096

// pendingWrite is a write on its way: a key of the view with the record written (rec
// nil: deleted), or, with key "", a recorded rejection.
type pendingWrite struct {
	key string
	rec any
	fut jetstream.PubAckFuture
	// prior is the key's entry as the view read it before this chunk changed it (nil:
	// absent); priorKnown is false for a bulk effect's rewrite, which keeps none.
	prior      *entry
	priorKnown bool
}

// sendIntent publishes a chunk's intent record, with compare-and-set on the record's
// own last revision: two projectors writing one partition is a conflict there, and
// stops the second. Nothing else of the chunk may be sent before it is stored
// (awaitIntent): a deposed projector (another instance fenced the record since) must
// fail there, before any key of its chunk can land.
func (p *Projector) sendIntent(data []byte) (jetstream.PubAckFuture, error) {
	return p.publish(events.CheckpointKey(p.part), data, p.ckptRev, 0, true)
}

// sendWrites publishes every changed key of the chunk just folded (its final state),
// then its recorded rejections, settling in windows of writeWindow; it returns the
// writes of the last window, still on their way. Nothing is kept per request key: a
// retry finds its first event by the stream's de-duplication (the duplicate's ack names
// it) and its decision among the recorded rejections (none: accepted).
func (p *Projector) sendWrites(ctx context.Context, items []item, decisions []events.Decision, now int64) ([]pendingWrite, error) {
	writes := make([]pendingWrite, 0, min(len(p.view.dirty)+len(items), writeWindow))
	enqueue := func(w pendingWrite, err error) error {
		if err != nil || w.fut == nil {
			return err
		}
		if writes = append(writes, w); len(writes) == writeWindow {
			err := p.settle(ctx, writes, now)
			writes = writes[:0]
			return err
		}
		return nil
	}
	for _, k := range p.view.dirty {
		e := p.view.entries[k]
		f, err := p.writeRecord(k, e.rec, e.rev, now)
		prior, known := p.view.flying[k]
		if err := enqueue(pendingWrite{key: k, rec: e.rec, fut: f, prior: prior, priorKnown: known}, err); err != nil {
			return nil, err
		}
	}
	for i, it := range items {
		if decisions[i].Code == "" {
			continue
		}
		f, err := p.recordRejection(it, decisions[i])
		if err := enqueue(pendingWrite{fut: f}, err); err != nil {
			return nil, err
		}
	}
	return writes, nil
}

// settle waits until writes are stored; a key write that lost its compare-and-set to
// the server's expiry marker is written again (rewrite). Each stored key's revision is
// the base of its next write.
func (p *Projector) settle(ctx context.Context, writes []pendingWrite, now int64) error {
	for _, w := range writes {
		ack, err := p.wait(ctx, w.fut)
		if err != nil && w.key != "" && isConflict(err) {
			ack, err = p.rewrite(ctx, w, now)
		}
		if err != nil {
			return fmt.Errorf("write %s: %w", w.key, err)
		}
		if w.key != "" && ack != nil {
			p.view.entries[w.key].rev = ack.Sequence
		}
	}
	return nil
}

// recordRejection appends a rejected event's decision to the log, on its user's
// decision subject, so that the history shows the decision that was made rather than
// one recomputed from part of the log. Nats-Msg-Id is per sequence: a batch folded
// again after a crash records it once (within the de-duplication window; readers take
// the first of any repeats, which are equal).
func (p *Projector) recordRejection(it item, d events.Decision) (jetstream.PubAckFuture, error) {
	uid := events.UserOfSubject(it.msg.Subject())
	if it.ev != nil {
		uid = it.ev.UserID
	}
	data, err := events.Marshal(&d)
	if err != nil {
		return nil, err
	}
	m := &nats.Msg{Subject: p.layout.DecisionSubject(uid), Data: data, Header: nats.Header{}}
	return p.js.PublishMsgAsync(m, jetstream.WithMsgID(fmt.Sprintf("decision-%d", it.seq)), jetstream.WithExpectStream(events.StreamName))
}

// writeRecord publishes a key's new state on top of revision rev: its record with a
// TTL, or (rec nil) a delete. It returns nil when there is nothing to write.
func (p *Projector) writeRecord(key string, rec any, rev uint64, now int64) (jetstream.PubAckFuture, error) {
	if rec == nil {
		if rev == 0 {
			return nil, nil // created and removed within the batch: nothing stored
		}
		return p.publishDelete(key, rev)
	}
	if a, ok := rec.(*events.AttrRecord); ok && a.Value == nil {
		// Recovery could not read the value of a key that only a session renewal
		// rewrites: KV expired it meanwhile. Its record is dead; leave it.
		return nil, nil
	}
	data, err := events.Marshal(rec)
	if err != nil {
		return nil, err
	}
	ttl, ok := p.ttl(key, rec, now)
	if !ok {
		if rev == 0 {
			return nil, nil // dead already and never stored (a replay of expired data)
		}
		return p.publishDelete(key, rev)
	}
	f, err := p.publishMsg(&nats.Msg{Subject: events.KVSubject(p.cfg.Bucket, key), Data: data, Header: events.RecordHeaders(rec, ttl > 0)}, rev, ttl, true)
	return f, err
}

func (p *Projector) ttl(key string, rec any, now int64) (time.Duration, bool) {
	return TTL(key, rec, p.view.Session, now)
}

// TTL is when KV should remove a record: the attribute's expiry, capped at its
// session's end for a session attribute (session looks the session up); a session's
// end. 0 keeps it. ok is false when the record is dead already.
func TTL(key string, rec any, session func(sid string) *events.SessionRecord, now int64) (ttl time.Duration, ok bool) {
	var until int64
	switch r := rec.(type) {
	case *events.SessionRecord:
		until = r.ExpiresAt
	case *events.SessionRefRecord:
		until = r.ExpiresAt
	case *events.AttrRecord:
		until = r.ExpiresAt
		if sid, ok := sessionOfAttrKey(key); ok {
			s := session(sid)
			if s == nil {
				return 0, false
			}
			if until == 0 || s.ExpiresAt < until {
				until = s.ExpiresAt
			}
		}
	default:
		return 0, true
	}
	if until == 0 {
		return 0, true
	}
	if until <= now {
		return 0, false
	}
	// The server keeps whole seconds (truncating) and at least 1s: round up, so that KV
	// never removes a record before it expires; reads filter by the record's own expiry.
	secs := (until - now + int64(time.Second) - 1) / int64(time.Second)
	return time.Duration(max(secs, 1)) * time.Second, true
}

// publish writes a key of the bucket directly on its subject. kv.Put and kv.Update
// cannot carry Nats-TTL and would drop a key's TTL (nats.go#1994), so the projector
// publishes what kv.Update would, plus the TTL: Nats-Expected-Last-Subject-Sequence is
// the compare-and-set (0: the key must have no message), Nats-TTL the expiry.
func (p *Projector) publish(key string, data []byte, rev uint64, ttl time.Duration, cas bool) (jetstream.PubAckFuture, error) {
	return p.publishMsg(&nats.Msg{Subject: events.KVSubject(p.cfg.Bucket, key), Data: data}, rev, ttl, cas)
}

// publishMsg is publish for a message with headers of its own.
func (p *Projector) publishMsg(m *nats.Msg, rev uint64, ttl time.Duration, cas bool) (jetstream.PubAckFuture, error) {
	if m.Header == nil {
		m.Header = nats.Header{}
	}
	opts := []jetstream.PublishOpt{}
	if cas {
		opts = append(opts, jetstream.WithExpectLastSequencePerSubject(rev))
	}
	if ttl > 0 {
		opts = append(opts, jetstream.WithMsgTTL(ttl))
	}
	return p.js.PublishMsgAsync(m, opts...)
}

// publishDelete writes a KV delete marker, with a TTL so that the marker itself goes
// away (kv.Delete refuses a TTL, but the server keeps one on any message of a bucket
// with per-message TTL).
func (p *Projector) publishDelete(key string, rev uint64) (jetstream.PubAckFuture, error) {
	m := &nats.Msg{Subject: events.KVSubject(p.cfg.Bucket, key), Header: nats.Header{}}
	m.Header.Set("KV-Operation", "DEL")
	return p.js.PublishMsgAsync(m, jetstream.WithExpectLastSequencePerSubject(rev), jetstream.WithMsgTTL(deleteMarkerTTL))
}

// deleteMarkerTTL is how long a delete marker stays in the bucket.
const deleteMarkerTTL = 10 * time.Minute

// rewrite retries a write of rec to key that lost its compare-and-set. The only other
// writer of a projector's keys is the server, whose expiry marker advances the key's
// revision; so the key is read again and, if its last message is such a marker or this
// very write (an ack lost and the publish retried: on R1 the retry comes back as a
// conflict, not a duplicate), written on top of it. Anything else is a second writer:
// stop. (rec is the record of the chunk the write belongs to: the view may hold a later
// chunk's state of the key already.)
//
// The server's expiry explains the conflict only if the record the write replaces has
// expired by now: a key that shows an expiry marker (or nothing) while that record
// would still live was read, for the fold, from a server that was behind — a stream
// leader cut off by a network partition and back, which goes on answering reads as the
// leader until it hears of the new one (issue 17). Writing on top would land a record
// folded from an old state: stop instead (ErrStaleRead), and the next run reads again.
func (p *Projector) rewrite(ctx context.Context, w pendingWrite, now int64) (*jetstream.PubAck, error) {
	key, rec := w.key, w.rec
	e := p.view.entries[key]
	m, err := p.load.leaderLast(ctx, key)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		if err := p.expiredPrior(w, now); err != nil {
			return nil, err
		}
		e.rev = 0
	case err != nil:
		return nil, err
	case events.IsMarker(m.Header) && m.Header.Get(jetstream.MarkerReasonHeader) != "":
		if err := p.expiredPrior(w, now); err != nil {
			return nil, err
		}
		if rec == nil {
			return &jetstream.PubAck{Sequence: m.Sequence}, nil // expired: already gone
		}
		e.rev = m.Sequence
	default:
		if rec != nil && sameStored(key, m.Data, rec) {
			return &jetstream.PubAck{Sequence: m.Sequence}, nil
		}
		return nil, fmt.Errorf("key %s was written by another writer (seq %d, %s; this write %s, on top of %d): is a second projector running?",
			key, m.Sequence, describeStored(key, m.Data), describeRecord(rec), e.rev)
	}
	f, err := p.writeRecord(key, rec, e.rev, now)
	if err != nil || f == nil {
		return nil, err
	}
	return p.wait(ctx, f)
}

// ErrStaleRead says a key write's compare-and-set failed in a way only a fold on an
// old state of the key explains: the run stops, and the next one reads again.
var ErrStaleRead = errors.New("the fold read a key from a server that was behind")

// expiredPrior checks that the record w replaces, if any, has expired by now (or is
// about to: the server keeps whole seconds), as an expiry marker or a key gone says.
func (p *Projector) expiredPrior(w pendingWrite, now int64) error {
	if !w.priorKnown {
		return nil // a bulk effect's rewrite keeps no prior state
	}
	if w.prior == nil || w.prior.rec == nil {
		// Absent when folded: a marker of the server's since (its delete markers
		// expire into expiry markers) leaves it absent.
		return nil
	}
	if ttl, live := p.ttl(w.key, w.prior.rec, now); live && (ttl == 0 || ttl > time.Second) {
		return fmt.Errorf("%w: key %s shows an expiry while the record folded on (%s) lives on", ErrStaleRead, w.key, describeRecord(w.prior.rec))
	}
	return nil
}

// describeStored and describeRecord name a record by the event that wrote it (evidence
// in an error).
func describeStored(key string, data []byte) string {
	rec, err := events.DecodeRecord(key, data)
	if err != nil {
		return "unreadable"
	}
	return describeRecord(rec)
}

func describeRecord(rec any) string {
	switch r := rec.(type) {
	case *events.AttrRecord:
		return fmt.Sprintf("written for the event at %d", r.Seq)
	case nil:
		return "a delete"
	default:
		return fmt.Sprintf("%T", rec)
	}
}

// sameStored reports whether data, a stored record of key, is rec: compared decoded,
// since an older attrd encoded the same record with other field names.
func sameStored(key string, data []byte, rec any) bool {
	stored, err := events.DecodeRecord(key, data)
	return err == nil && sameRecord(stored, rec)
}

// wait waits for a write's acknowledgement; every one of the bucket raises the floor
// of this run's reads (seen).
func (p *Projector) wait(ctx context.Context, f jetstream.PubAckFuture) (*jetstream.PubAck, error) {
	select {
	case ack := <-f.Ok():
		if ack.Stream == p.load.stream.CachedInfo().Config.Name {
			p.saw(ack.Sequence)
		}
		return ack, nil
	case err := <-f.Err():
		return nil, err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// waitCheckpoint waits for the intent record data's write. A compare-and-set failure
// is checked against the record itself, read from the bucket's leader: if it is this
// one, stored after the revision written on, the write took.
//
// NATS subtlety: a publish reaches every server that believes it leads the stream. A
// leader back from a network cut, not yet told of the new one, checks the
// compare-and-set against its old copy and answers "wrong last sequence" at once,
// while the real leader stores the record and its acknowledgement, second, is never
// read (and on one replica, a write retried after its ack was lost comes back as a
// conflict too). Taken as it came, the run stopped on a record that was stored, right
// after every heal that found such a leader (issue 17).
func (p *Projector) waitCheckpoint(ctx context.Context, f jetstream.PubAckFuture, data []byte) error {
	ack, err := p.wait(ctx, f)
	if h := p.cfg.Hooks.IntentAnswer; h != nil {
		ack, err = h(ack, err)
	}
	if err != nil && isConflict(err) {
		if seq, stored := p.intentStored(ctx, data); stored {
			p.log.Info("intent record stored, though its write was answered as a conflict", "seq", seq, "err", err)
			ack, err = &jetstream.PubAck{Sequence: seq}, nil
		}
	}
	if err != nil {
		return fmt.Errorf("intent record: %w", err)
	}
	p.ckptRev = ack.Sequence
	p.saw(ack.Sequence)
	return nil
}

// intentStored reads the intent record from the bucket's leader and reports whether
// it is data, written after the revision the write was on, and at which sequence. A
// server behind cannot show it (it cannot have stored what the leader has not), so a
// stale answer only says no.
func (p *Projector) intentStored(ctx context.Context, data []byte) (uint64, bool) {
	// From the leader: a copy holding this run's floor may not hold the record yet.
	m, err := p.load.leaderLast(ctx, events.CheckpointKey(p.part))
	if err != nil || m.Sequence <= p.ckptRev || !bytes.Equal(m.Data, data) {
		return 0, false
	}
	return m.Sequence, true
}

// saw raises seen to seq.
func (p *Projector) saw(seq uint64) { raiseTo(&p.seen, seq) }

// raiseTo raises a to seq if it is below it.
func raiseTo(a *atomic.Uint64, seq uint64) {
	for {
		cur := a.Load()
		if seq <= cur || a.CompareAndSwap(cur, seq) {
			return
		}
	}
}

// isConflict reports a compare-and-set failure: 10071 on R1, 10164 on replicated streams.
func isConflict(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	return apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}
