package projector

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/attrd/attrd/events"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// intent encodes the intent record of a folded chunk: its sequences, decisions, and
// the state before the chunk of every recorded key (rewritten keys are not recorded).
func (p *Projector) intent(items []item, decisions []events.Decision) ([]byte, error) {
	ck := &events.Checkpoint{First: items[0].seq, Last: items[len(items)-1].seq, Decisions: decisions,
		Before: make([]events.KeyState, 0, len(p.view.before))}
	for _, k := range p.view.dirty {
		if b, ok := p.view.before[k]; ok {
			ck.Before = append(ck.Before, events.KeyState{Key: k, Data: b})
		}
	}
	return events.Marshal(ck)
}

// writeWindow bounds the writes awaiting their acks, below the publisher's own limit
// (a renewal or a logout may write thousands of keys).
const writeWindow = 4096

// write stores the intent record, then every changed key, then the recorded rejections,
// and waits until all are stored. Nothing is kept per request key: a retry finds its
// first event by the stream's de-duplication (the duplicate's ack names it) and its
// decision among the recorded rejections (none: accepted).
func (p *Projector) write(ctx context.Context, first, last uint64, items []item, decisions []events.Decision, ckData []byte) error {
	// The intent record goes first, with compare-and-set on its own last revision: two
	// projectors writing one partition is a conflict here, and stops the second.
	ckFut, err := p.publish(events.CheckpointKey(p.part), ckData, p.ckptRev, 0, true)
	if err != nil {
		return err
	}
	// Nothing else of the batch is written before the intent record is stored: a
	// deposed projector (another instance fenced the record since) must fail here,
	// before any key of its batch can land.
	if err := p.waitCheckpoint(ctx, ckFut); err != nil {
		return err
	}
	if err := p.hook(p.cfg.Hooks.AfterCheckpoint, first, last); err != nil {
		return err
	}

	type pending struct {
		key string
		fut jetstream.PubAckFuture
	}
	now := time.Now().UnixNano()
	writes := make([]pending, 0, min(len(p.view.dirty)+len(items), writeWindow))
	settle := func() error {
		for _, w := range writes {
			ack, err := p.wait(ctx, w.fut)
			if err != nil && w.key != "" && isConflict(err) {
				ack, err = p.rewrite(ctx, w.key, now)
			}
			if err != nil {
				return fmt.Errorf("write %s: %w", w.key, err)
			}
			if w.key != "" && ack != nil {
				p.view.entries[w.key].rev = ack.Sequence
			}
		}
		writes = writes[:0]
		return nil
	}
	// enqueue adds a write in flight (key "": not a key of the view), settling the
	// window when it is full.
	enqueue := func(key string, f jetstream.PubAckFuture, err error) error {
		if err != nil || f == nil {
			return err
		}
		if writes = append(writes, pending{key, f}); len(writes) == writeWindow {
			return settle()
		}
		return nil
	}
	for _, k := range p.view.dirty {
		f, err := p.writeKey(k, now)
		if err := enqueue(k, f, err); err != nil {
			return err
		}
	}
	for i, it := range items {
		if decisions[i].Code == "" {
			continue
		}
		f, err := p.recordRejection(it, decisions[i])
		if err := enqueue("", f, err); err != nil {
			return err
		}
	}
	if err := settle(); err != nil {
		return err
	}
	p.view.locked(p.view.committed)
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

// writeKey publishes a changed key's new state: its record with a TTL, or a delete.
// It returns nil when there is nothing to write.
func (p *Projector) writeKey(key string, now int64) (jetstream.PubAckFuture, error) {
	e := p.view.entries[key]
	if e.rec == nil {
		if e.rev == 0 {
			return nil, nil // created and removed within the batch: nothing stored
		}
		return p.publishDelete(key, e.rev)
	}
	if a, ok := e.rec.(*events.AttrRecord); ok && a.Value == nil {
		// Recovery could not read the value of a key that only a session renewal
		// rewrites: KV expired it meanwhile. Its record is dead; leave it.
		return nil, nil
	}
	data, err := events.Marshal(e.rec)
	if err != nil {
		return nil, err
	}
	ttl, ok := p.ttl(key, e.rec, now)
	if !ok {
		if e.rev == 0 {
			return nil, nil // dead already and never stored (a replay of expired data)
		}
		return p.publishDelete(key, e.rev)
	}
	f, err := p.publishMsg(&nats.Msg{Subject: events.KVSubject(p.cfg.Bucket, key), Data: data, Header: events.RecordHeaders(e.rec, ttl > 0)}, e.rev, ttl, true)
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

// rewrite retries a write that lost its compare-and-set. The only other writer of a
// projector's keys is the server, whose expiry marker advances the key's revision; so
// the key is read again and, if its last message is such a marker or this very write
// (an ack lost and the publish retried: on R1 the retry comes back as a conflict, not a
// duplicate), written on top of it. Anything else is a second writer: stop.
func (p *Projector) rewrite(ctx context.Context, key string, now int64) (*jetstream.PubAck, error) {
	e := p.view.entries[key]
	m, err := p.load.stream.GetLastMsgForSubject(ctx, events.KVSubject(p.cfg.Bucket, key))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		e.rev = 0
	case err != nil:
		return nil, err
	case isMarker(m.Header) && m.Header.Get(jetstream.MarkerReasonHeader) != "":
		if e.rec == nil {
			return &jetstream.PubAck{Sequence: m.Sequence}, nil // expired: already gone
		}
		e.rev = m.Sequence
	default:
		if e.rec != nil && sameStored(key, m.Data, e.rec) {
			return &jetstream.PubAck{Sequence: m.Sequence}, nil
		}
		return nil, fmt.Errorf("key %s was written by another writer (seq %d): is a second projector running?", key, m.Sequence)
	}
	f, err := p.writeKey(key, now)
	if err != nil || f == nil {
		return nil, err
	}
	return p.wait(ctx, f)
}

// sameStored reports whether data, a stored record of key, is rec: compared decoded,
// since an older attrd encoded the same record with other field names.
func sameStored(key string, data []byte, rec any) bool {
	stored, err := events.DecodeRecord(key, data)
	return err == nil && sameRecord(stored, rec)
}

func (p *Projector) wait(ctx context.Context, f jetstream.PubAckFuture) (*jetstream.PubAck, error) {
	select {
	case ack := <-f.Ok():
		return ack, nil
	case err := <-f.Err():
		return nil, err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (p *Projector) waitCheckpoint(ctx context.Context, f jetstream.PubAckFuture) error {
	ack, err := p.wait(ctx, f)
	if err != nil {
		return fmt.Errorf("intent record: %w", err)
	}
	p.ckptRev = ack.Sequence
	return nil
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
