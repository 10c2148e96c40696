package projector

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/attrd/attrd/events"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/trace"
)

// item is one event of a batch.
type item struct {
	msg   jetstream.Msg
	seq   uint64
	ev    *events.Event
	reply string
	bad   error
	span  trace.Span // the fold's span, when the event carries a trace (tracing.go)
	// change is what the event changed that watchers see, when it was accepted
	// (feed.go); nil otherwise.
	change *events.Change
}

// process folds one batch: decode, load, fold, write intent and keys, reply, ack.
func (p *Projector) process(ctx context.Context, batch []jetstream.Msg) (err error) {
	start := time.Now()
	var appended time.Time // the last event's append
	defer func() {
		if err == nil {
			p.metrics.batchDone(len(batch), time.Since(start), p.Applied(), appended)
		}
	}()
	items := make([]item, 0, len(batch))
	var keys, prefixes []string
	for _, m := range batch {
		md, err := m.Metadata()
		if err != nil {
			return fmt.Errorf("event metadata: %w", err)
		}
		if err := p.checkDelivery(md); err != nil {
			p.metrics.gap()
			return err
		}
		p.metrics.delivered(md)
		appended = md.Timestamp
		it := item{msg: m, seq: md.Sequence.Stream, reply: m.Headers().Get(events.HeaderReply)}
		if it.seq <= p.Applied() {
			continue // redelivered after it was folded
		}
		if !events.IsEventSubject(m.Subject()) {
			continue // a decision or an erasure record this projector wrote: not an event
		}
		it.ev, it.bad = events.Decode(m.Data())
		if it.bad == nil {
			// A data key that cannot be read now (or unwrapped: a key file without the
			// key that wrapped it) stops the run rather than reject the event.
			if err := p.openPersonal(ctx, it.ev); err != nil {
				return err
			}
		}
		if it.bad == nil && p.layout.Subject(it.ev) != m.Subject() {
			it.bad = fmt.Errorf("event %s on subject %s, want %s", it.ev.ID, m.Subject(), p.layout.Subject(it.ev))
		}
		if it.bad == nil {
			k, pr := Keys(it.ev)
			keys, prefixes = append(keys, k...), append(prefixes, pr...)
			it.span = p.startFold(m, it.seq, it.ev)
		}
		items = append(items, it)
	}
	if len(items) == 0 {
		return p.endBatch(ctx, batch)
	}
	if err := p.load.load(ctx, p.view, keys, prefixes); err != nil {
		return err
	}
	if err := p.loadErasures(ctx, items); err != nil {
		return err
	}

	decisions := make([]events.Decision, len(items))
	for start := 0; start < len(items); {
		if it := items[start]; p.cross(it) {
			// A decision that reads other partitions: they must have committed what came
			// before it (this partition too: the chunk in flight lands first), and it
			// reads their state as it stood then (cross.go).
			if err := p.land(ctx); err != nil {
				return err
			}
			if err := p.crossRead(ctx, it.seq, it.ev); err != nil {
				return err
			}
		}
		var end int
		var intent []byte
		var err error
		p.view.locked(func() { end, intent, err = p.foldCommittable(items, decisions, start) })
		if err != nil {
			return err
		}
		more := end < len(items) || p.more != nil && p.more()
		if err := p.commit(ctx, items[start:end], decisions[start:end], intent, more); err != nil {
			return err
		}
		start = end
	}
	return p.endBatch(ctx, batch)
}

// endBatch ends a batch: the chunk in flight lands unless more events wait to be
// folded (the next chunk's intent record will carry it), Applied passes the batch's
// tail, and a cache grown past its bound is emptied.
func (p *Projector) endBatch(ctx context.Context, batch []jetstream.Msg) error {
	if p.flight != nil && (p.more == nil || !p.more()) {
		if err := p.land(ctx); err != nil {
			return err
		}
	}
	if err := p.passTail(batch); err != nil {
		return err
	}
	if p.flight == nil && len(p.view.entries) > p.cfg.MaxCacheEntries {
		p.view.locked(p.view.reset)
	}
	return nil
}

// ErrDeliveryGap says the consumer skipped deliveries: the run stops, and the next one
// consumes again from the intent record.
var ErrDeliveryGap = errors.New("the event consumer skipped deliveries")

// checkDelivery makes sure no delivery was lost between the last message and this one.
// The server numbers a consumer's deliveries 1, 2, 3, … (redeliveries included), so a
// number that does not follow the last one means messages were lost on their way: when
// a replicated consumer's leader changes, messages already sent by the old leader but
// never received are redelivered only after AckWait, while the new leader goes on
// with later ones at once. Folding on would skip events (and Applied would pass them,
// so that a retried request reads "folded" while its change is not in the projection).
// A gap in *stream* sequences, by contrast, is normal (deleted messages).
func (p *Projector) checkDelivery(md *jetstream.MsgMetadata) error {
	if got := md.Sequence.Consumer; got != p.delivered+1 {
		return fmt.Errorf("%w: delivery %d (stream sequence %d) after delivery %d", ErrDeliveryGap, got, md.Sequence.Stream, p.delivered)
	}
	p.delivered = md.Sequence.Consumer
	return nil
}

// passTail moves Applied over recorded decisions that end a batch, once every event
// before them is folded and committed, so that the projector's position reaches the
// log's end. With a chunk in flight, that waits until it lands.
func (p *Projector) passTail(batch []jetstream.Msg) error {
	last := batch[len(batch)-1]
	md, err := last.Metadata()
	if err != nil || md.Sequence.Stream <= p.Applied() {
		return err
	}
	if p.flight != nil {
		p.tail = last
		return nil
	}
	p.applied.Store(md.Sequence.Stream)
	return last.Ack()
}

// Bytes of the intent record per changed key and per event, at most (a key of 191
// escaped bytes and a record without its value; a decision).
const (
	intentBytesPerKey   = 800
	intentBytesPerEvent = 100
)

// foldCommittable folds the next chunk from start on and returns where it ends and its
// encoded intent record. A chunk whose intent record would not fit in one message is
// taken back and folded again as its first event alone; an event whose effects alone
// cannot be recorded is rejected (E008002) with an error in the log, so that no event
// can stop the fold by failing to commit again and again.
func (p *Projector) foldCommittable(items []item, decisions []events.Decision, start int) (int, []byte, error) {
	limit := int(p.nc.MaxPayload()) - intentHeadroom
	end := p.foldChunk(items, decisions, start, len(items))
	intent, err := p.intent(nil, items[start:end], decisions[start:end])
	if err != nil || len(intent) <= limit {
		return end, intent, err
	}
	p.view.rollback()
	if end-start > 1 {
		end = p.foldChunk(items, decisions, start, start+1)
		if intent, err = p.intent(nil, items[start:end], decisions[start:end]); err != nil || len(intent) <= limit {
			return end, intent, err
		}
		p.view.rollback()
	}
	it := items[start]
	p.log.Error("event rejected: its effects do not fit in an intent record", "seq", it.seq, "event", it.ev.ID,
		"bytes", len(intent), "max_payload", p.nc.MaxPayload())
	decisions[start] = events.Decision{Seq: it.seq, EventID: it.ev.ID, UserID: it.ev.UserID, Fingerprint: it.ev.Fingerprint,
		Code: events.CodeInvalidInput}
	items[start].change = nil
	intent, err = p.intent(nil, items[start:end], decisions[start:end])
	return end, intent, err
}

// intentHeadroom is what a message needs besides the intent record: subject, headers.
const intentHeadroom = 4096

// foldChunk folds items from start up to stop and returns where the chunk ends: where
// its intent record would pass half the connection's maximum payload (with at least
// one event in it), or at stop. A recorded batch being recovered is never cut.
func (p *Projector) foldChunk(items []item, decisions []events.Decision, start, stop int) int {
	limit := int(p.nc.MaxPayload() / 2)
	size := func(events int) int { return len(p.view.before)*intentBytesPerKey + events*intentBytesPerEvent }
	i := start
	for i < stop {
		it := items[i]
		recovering := p.recover != nil && it.seq <= p.recover.Last
		if i > start && !recovering && it.ev != nil && size(i-start)+(len(it.ev.Attrs)+4)*intentBytesPerKey > limit {
			break // this event's own effects would take the record past the limit
		}
		if i > start && p.cross(it) {
			break // it reads other partitions: it starts the next chunk, once this one is committed
		}
		switch {
		case it.bad != nil:
			p.log.Warn("event rejected: unreadable", "seq", it.seq, "err", it.bad)
			decisions[i] = events.Decision{Seq: it.seq, Code: events.CodeInvalidInput}
		default:
			live := events.AttrsLiveBefore(it.ev, p.view)
			decisions[i] = Fold(p.view, it.seq, it.ev, p.cfg.Opener, p.recordedDecision(it.seq))
			items[i].change = nil
			if decisions[i].Code == "" {
				items[i].change = events.ChangeOf(it.seq, it.ev, live, p.view)
			}
		}
		i++
		if size(i-start) > limit && (p.recover == nil || it.seq >= p.recover.Last) {
			break
		}
	}
	return i
}

// cross reports whether an item's decision reads other partitions' state and must be
// folded at the start of a chunk, after crossRead. A recorded batch being recovered
// is folded with its recorded decisions and reads nothing of other partitions.
func (p *Projector) cross(it item) bool {
	if it.bad != nil || p.recordedDecision(it.seq) != nil || p.recover != nil && it.seq <= p.recover.Last {
		return false
	}
	actor, username := p.crossReads(it.ev)
	return actor || username
}

// reply hands the decisions to their observers and to the waiting attrd instances: one
// message per instance per batch, whatever the batch's size.
func (p *Projector) reply(items []item, decisions []events.Decision) {
	endFolds(items, decisions)
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

func (p *Projector) hook(h func(first, last uint64) error, first, last uint64) error {
	if h == nil {
		return nil
	}
	return h(first, last)
}
