// Package projector folds the event log into the projection: the only writer of the
// KV bucket. It reads the log in order through a durable pull consumer, decides every
// event against the projection as it stands after all earlier events (see Fold),
// writes the changed keys with per-key TTL, and hands each decision back to the
// waiting request.
//
// # Exactly once
//
// Events are folded in batches. For each batch the projector first writes an intent
// record (events.Checkpoint: the batch's sequences, its decisions, and the state before
// it of every key it changes), then the changed keys, then sends the decisions and acks
// the batch. All of these go to the one bucket stream over one connection, so the
// server stores them in that order. On start the projector reads the intent record and
// folds that batch again from the recorded state with the recorded decisions: whatever
// part of it had reached KV, the result is the same, and no event is applied twice or
// lost.
package projector

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// Config configures a Projector.
type Config struct {
	// Bucket is the projection bucket; it must exist (events.EnsureStore).
	Bucket string
	// Durable names the pull consumer on the event stream.
	Durable string
	// Partition names the intent record (p.<Partition>).
	Partition string
	// MaxBatch bounds the events folded together (default 512).
	MaxBatch int
	// Opener opens sealed values for Inherit items; nil rejects them.
	Opener Opener
	// DecisionTTL is how long a decision stays readable for retries (the dedup window).
	DecisionTTL time.Duration
	// Replies sends decisions to waiting requests (off for a replay).
	Replies bool
	// StopAtEnd makes Run return once it has folded every event the stream held when
	// Run started (replay).
	StopAtEnd bool
	// OnDecision, if set, sees every decision in log order (tests, replay verification).
	OnDecision func(events.Decision)
	// MaxCacheEntries bounds the cache (default 100000).
	MaxCacheEntries int
	// Logger; nil uses slog.Default().
	Logger *slog.Logger
	// Hooks let tests stop the projector between the steps of a batch.
	Hooks Hooks
}

// Hooks are called between the steps of folding a batch; an error stops Run at that
// point as a crash would, with nothing more written or acked.
type Hooks struct {
	BeforeCheckpoint func(first, last uint64) error // the events are stored, nothing written
	AfterCheckpoint  func(first, last uint64) error // intent written, keys not yet
	AfterWrites      func(first, last uint64) error // keys written, no reply, no ack
	BeforeAck        func(first, last uint64) error // replies sent, not acked
}

// Projector is the single ordered writer of the projection.
type Projector struct {
	cfg     Config
	nc      *nats.Conn
	js      jetstream.JetStream
	log     *slog.Logger
	view    *view
	load    *loader
	ckptRev uint64
	applied atomic.Uint64
	ready   chan struct{}
	batches atomic.Uint64
	events  atomic.Uint64

	// recovery: the batch of the intent record found at start, folded again.
	recover *events.Checkpoint
}

// New returns a projector on nc.
func New(nc *nats.Conn, cfg Config) (*Projector, error) {
	if cfg.Bucket == "" {
		cfg.Bucket = events.DefaultBucket
	}
	if cfg.Durable == "" {
		cfg.Durable = "projector"
	}
	if cfg.Partition == "" {
		cfg.Partition = "0"
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 512
	}
	if cfg.MaxCacheEntries <= 0 {
		cfg.MaxCacheEntries = 100_000
	}
	if cfg.DecisionTTL <= 0 {
		cfg.DecisionTTL = 2 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192))
	if err != nil {
		return nil, err
	}
	return &Projector{cfg: cfg, nc: nc, js: js, log: cfg.Logger, view: newView(), ready: make(chan struct{})}, nil
}

// Ready is closed once the projector has recovered and is consuming.
func (p *Projector) Ready() <-chan struct{} { return p.ready }

// Applied returns the stream sequence of the last event folded and written.
func (p *Projector) Applied() uint64 { return p.applied.Load() }

// Run folds the log until ctx is done (or, with StopAtEnd, until caught up). It returns
// nil on a clean stop.
func (p *Projector) Run(ctx context.Context) error {
	kv, err := p.js.KeyValue(ctx, p.cfg.Bucket)
	if err != nil {
		return fmt.Errorf("projection bucket %s: %w", p.cfg.Bucket, err)
	}
	kvs, err := p.js.Stream(ctx, events.KVStream(p.cfg.Bucket))
	if err != nil {
		return err
	}
	p.load = &loader{kv: kv, stream: kvs, bucket: p.cfg.Bucket, parallel: 32}
	evs, err := p.js.Stream(ctx, events.StreamName)
	if err != nil {
		return fmt.Errorf("event stream: %w", err)
	}
	start, err := p.recoverState(ctx)
	if err != nil {
		return err
	}
	var end uint64
	if p.cfg.StopAtEnd {
		info, err := evs.Info(ctx)
		if err != nil {
			return err
		}
		end = info.State.LastSeq
		if end < start {
			close(p.ready)
			return nil
		}
	}
	cons, err := p.consumer(ctx, evs, start)
	if err != nil {
		return err
	}
	msgs := make(chan jetstream.Msg, 4*p.cfg.MaxBatch)
	cc, err := cons.Consume(func(m jetstream.Msg) {
		select {
		case msgs <- m:
		case <-ctx.Done():
		}
	}, jetstream.PullMaxMessages(2*p.cfg.MaxBatch))
	if err != nil {
		return fmt.Errorf("consume: %w", err)
	}
	defer cc.Stop()
	close(p.ready)
	p.log.Info("projector running", "bucket", p.cfg.Bucket, "from_seq", start)

	batch := make([]jetstream.Msg, 0, p.cfg.MaxBatch)
	for {
		batch = batch[:0]
		select {
		case <-ctx.Done():
			return nil
		case m := <-msgs:
			batch = append(batch, m)
		}
		batch = p.fill(ctx, msgs, batch)
		if err := p.process(ctx, batch); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if p.cfg.StopAtEnd && p.Applied() >= end {
			return nil
		}
	}
}

// fill adds to the batch what is already waiting, and while recovering waits for the
// rest of the recorded batch, which must be folded as one.
func (p *Projector) fill(ctx context.Context, msgs chan jetstream.Msg, batch []jetstream.Msg) []jetstream.Msg {
	for len(batch) < p.cfg.MaxBatch || p.recovering(batch) {
		if p.recovering(batch) {
			select {
			case m := <-msgs:
				batch = append(batch, m)
				continue
			case <-ctx.Done():
				return batch
			}
		}
		select {
		case m := <-msgs:
			batch = append(batch, m)
		default:
			return batch
		}
	}
	return batch
}

// recovering reports whether batch stops short of the recorded batch's end.
func (p *Projector) recovering(batch []jetstream.Msg) bool {
	if p.recover == nil || len(batch) == 0 {
		return false
	}
	md, err := batch[len(batch)-1].Metadata()
	return err == nil && md.Sequence.Stream < p.recover.Last
}

// consumer (re)creates the projector's durable consumer at start. The intent record,
// not the consumer, is the projector's position: starting the consumer there redelivers
// the recorded batch at once instead of after AckWait. (A single projector per
// partition; fail-over between projectors will use a pinned consumer instead.)
func (p *Projector) consumer(ctx context.Context, evs jetstream.Stream, start uint64) (jetstream.Consumer, error) {
	if err := evs.DeleteConsumer(ctx, p.cfg.Durable); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil, fmt.Errorf("reset consumer: %w", err)
	}
	cfg := jetstream.ConsumerConfig{
		Durable:       p.cfg.Durable,
		AckPolicy:     jetstream.AckAllPolicy,
		AckWait:       30 * time.Second,
		MaxAckPending: 16 * p.cfg.MaxBatch,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	}
	if start > 1 {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = start
	}
	c, err := evs.CreateConsumer(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("create consumer: %w", err)
	}
	return c, nil
}

// recoverState reads the intent record and prepares to fold its batch again. It returns
// the first stream sequence to consume.
func (p *Projector) recoverState(ctx context.Context) (uint64, error) {
	key := events.CheckpointKey(p.cfg.Partition)
	e, err := p.load.read(ctx, key)
	if err != nil {
		return 0, fmt.Errorf("read intent record: %w", err)
	}
	p.ckptRev = e.rev
	ck, _ := e.rec.(*events.Checkpoint)
	if ck == nil {
		return 1, nil
	}
	if ck.First > ck.Last {
		// Nothing pending (a bucket rebuilt by replay): go on after Last.
		p.applied.Store(ck.Last)
		return ck.First, nil
	}
	p.recover = ck
	p.applied.Store(ck.First - 1)
	// The recorded states are the truth for these keys; their revisions and any attribute
	// values left out of the record come from KV.
	keys := make([]string, len(ck.Before))
	for i, ks := range ck.Before {
		keys[i] = ks.Key
	}
	if err := p.load.load(ctx, p.view, keys, nil); err != nil {
		return 0, err
	}
	for _, ks := range ck.Before {
		var rec any
		if ks.Data != nil {
			if rec, err = events.DecodeRecord(ks.Key, ks.Data); err != nil {
				return 0, err
			}
		}
		if a, ok := rec.(*events.AttrRecord); ok {
			if cur, ok := p.view.get(ks.Key).(*events.AttrRecord); ok {
				a.Value = cur.Value
			}
		}
		p.view.set(ks.Key, rec, false)
	}
	// Prefix scans are not trusted across the recorded states: scan again on demand.
	p.view.scanned = map[string]bool{}
	p.log.Info("projector recovering batch", "first", ck.First, "last", ck.Last)
	return ck.First, nil
}

// item is one event of a batch.
type item struct {
	msg   jetstream.Msg
	seq   uint64
	ev    *events.Event
	reply string
	bad   error
}

// process folds one batch: decode, load, fold, write intent and keys, reply, ack.
func (p *Projector) process(ctx context.Context, batch []jetstream.Msg) error {
	items := make([]item, 0, len(batch))
	var keys, prefixes []string
	for _, m := range batch {
		md, err := m.Metadata()
		if err != nil {
			return fmt.Errorf("event metadata: %w", err)
		}
		it := item{msg: m, seq: md.Sequence.Stream, reply: m.Headers().Get(events.HeaderReply)}
		if it.seq <= p.Applied() {
			continue // redelivered after it was folded
		}
		it.ev, it.bad = events.Decode(m.Data())
		if it.bad == nil && events.Subject(it.ev) != m.Subject() {
			it.bad = fmt.Errorf("event %s on subject %s, want %s", it.ev.ID, m.Subject(), events.Subject(it.ev))
		}
		if it.bad == nil {
			k, pr := Keys(it.ev)
			keys, prefixes = append(keys, k...), append(prefixes, pr...)
		}
		items = append(items, it)
	}
	if len(items) == 0 {
		return batch[len(batch)-1].Ack()
	}
	if err := p.load.load(ctx, p.view, keys, prefixes); err != nil {
		return err
	}

	decisions := make([]events.Decision, len(items))
	for start := 0; start < len(items); {
		end := p.foldChunk(items, decisions, start)
		if err := p.commit(ctx, items[start:end], decisions[start:end]); err != nil {
			return err
		}
		start = end
	}
	if len(p.view.entries) > p.cfg.MaxCacheEntries {
		p.view.reset()
	}
	return nil
}

// Bytes of the intent record per changed key and per event, at most (a key of 191
// escaped bytes and a record without its value; a decision).
const (
	intentBytesPerKey   = 800
	intentBytesPerEvent = 100
)

// foldChunk folds items from start on and returns where the chunk ends: where its intent
// record would pass half the connection's maximum payload (with at least one event in
// it), or at the end. A recorded batch being recovered is never cut.
func (p *Projector) foldChunk(items []item, decisions []events.Decision, start int) int {
	limit := int(p.nc.MaxPayload() / 2)
	i := start
	for i < len(items) {
		it := items[i]
		switch {
		case it.bad != nil:
			p.log.Warn("event rejected: unreadable", "seq", it.seq, "err", it.bad)
			decisions[i] = events.Decision{Seq: it.seq, Code: events.CodeInvalidInput}
		default:
			decisions[i] = Fold(p.view, it.seq, it.ev, p.cfg.Opener, p.recordedDecision(it.seq))
		}
		i++
		size := len(p.view.dirty)*intentBytesPerKey + (i-start)*intentBytesPerEvent
		if size > limit && (p.recover == nil || it.seq >= p.recover.Last) {
			break
		}
	}
	return i
}

// commit writes a folded chunk (intent record, keys, kept decisions), sends its
// decisions and acks it.
func (p *Projector) commit(ctx context.Context, items []item, decisions []events.Decision) error {
	first, last := items[0].seq, items[len(items)-1].seq
	p.batches.Add(1)
	p.events.Add(uint64(len(items)))
	if p.recover != nil && last >= p.recover.Last {
		p.recover = nil
	}
	if err := p.hook(p.cfg.Hooks.BeforeCheckpoint, first, last); err != nil {
		return err
	}
	if err := p.write(ctx, first, last, items, decisions); err != nil {
		return err
	}
	if err := p.hook(p.cfg.Hooks.AfterWrites, first, last); err != nil {
		return err
	}
	p.reply(items, decisions)
	if err := p.hook(p.cfg.Hooks.BeforeAck, first, last); err != nil {
		return err
	}
	p.applied.Store(last)
	// AckAll: one ack covers the chunk. Losing it is harmless: a redelivered event at or
	// below Applied is skipped.
	if err := items[len(items)-1].msg.Ack(); err != nil {
		p.log.Warn("ack failed", "seq", last, "err", err)
	}
	return nil
}

// Stats returns how many batches and events the projector has folded.
func (p *Projector) Stats() (batches, events uint64) { return p.batches.Load(), p.events.Load() }

// reply hands the decisions to their observers and to the waiting attrd instances: one
// message per instance per batch, whatever the batch's size.
func (p *Projector) reply(items []item, decisions []events.Decision) {
	byInbox := map[string][]events.Decision{}
	for i, it := range items {
		if p.cfg.OnDecision != nil {
			p.cfg.OnDecision(decisions[i])
		}
		if p.cfg.Replies && it.reply != "" {
			byInbox[it.reply] = append(byInbox[it.reply], decisions[i])
		}
	}
	for inbox, ds := range byInbox {
		data, err := events.Marshal(ds)
		if err == nil {
			err = p.nc.Publish(inbox, data)
		}
		if err != nil {
			p.log.Warn("decisions not sent", "inbox", inbox, "err", err)
		}
	}
}

func (p *Projector) recordedDecision(seq uint64) *events.Code {
	if p.recover == nil || seq < p.recover.First || seq > p.recover.Last {
		return nil
	}
	for i := range p.recover.Decisions {
		if p.recover.Decisions[i].Seq == seq {
			return &p.recover.Decisions[i].Code
		}
	}
	return nil
}

func (p *Projector) hook(h func(first, last uint64) error, first, last uint64) error {
	if h == nil {
		return nil
	}
	return h(first, last)
}

// write stores the intent record, then every changed key, then the decisions kept for
// retries, and waits until all are stored.
func (p *Projector) write(ctx context.Context, first, last uint64, items []item, decisions []events.Decision) error {
	ck := &events.Checkpoint{First: first, Last: last, Decisions: decisions, Before: make([]events.KeyState, 0, len(p.view.dirty))}
	for _, k := range p.view.dirty {
		ck.Before = append(ck.Before, events.KeyState{Key: k, Data: p.view.before[k]})
	}
	ckData, err := events.Marshal(ck)
	if err != nil {
		return err
	}
	// The intent record goes first, with compare-and-set on its own last revision: two
	// projectors writing one partition is a conflict here, and stops the second.
	ckFut, err := p.publish(events.CheckpointKey(p.cfg.Partition), ckData, p.ckptRev, 0, true)
	if err != nil {
		return err
	}
	ckWaited := false
	if p.cfg.Hooks.AfterCheckpoint != nil {
		if err := p.waitCheckpoint(ctx, ckFut); err != nil {
			return err
		}
		ckWaited = true
		if err := p.hook(p.cfg.Hooks.AfterCheckpoint, first, last); err != nil {
			return err
		}
	}

	type pending struct {
		key string
		fut jetstream.PubAckFuture
	}
	now := time.Now().UnixNano()
	writes := make([]pending, 0, len(p.view.dirty)+len(items))
	for _, k := range p.view.dirty {
		f, err := p.writeKey(k, now)
		if err != nil {
			return err
		}
		if f != nil {
			writes = append(writes, pending{k, f})
		}
	}
	for i, it := range items {
		if it.ev == nil || it.ev.RequestKey == "" {
			continue
		}
		data, _ := events.Marshal(&decisions[i])
		// Kept exactly as long as the stream remembers the request id (plus a margin),
		// with no compare-and-set: within the window one request key has one event.
		f, err := p.publish(events.DecisionKey(it.ev.RequestKey), data, 0, p.cfg.DecisionTTL+time.Minute, false)
		if err != nil {
			return err
		}
		writes = append(writes, pending{"", f})
	}

	if !ckWaited {
		if err := p.waitCheckpoint(ctx, ckFut); err != nil {
			return err
		}
	}
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
	p.view.dirty = p.view.dirty[:0]
	clear(p.view.before)
	return nil
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
	return p.publish(key, data, e.rev, ttl, true)
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
	m := &nats.Msg{Subject: events.KVSubject(p.cfg.Bucket, key), Data: data, Header: nats.Header{}}
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
		if e.rec != nil && bytes.Equal(m.Data, mustMarshal(e.rec)) {
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

func mustMarshal(rec any) []byte {
	if rec == nil {
		return nil
	}
	b, _ := events.Marshal(rec)
	return b
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
