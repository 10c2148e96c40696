package projector

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// The pipelined commit. A chunk is committed in two steps, each a round trip to the
// bucket's stream: its intent record (which must be stored before any of its keys is
// sent: fencing), then its keys. Under load, the next chunk's intent record goes out
// right behind this chunk's keys, so that one round trip serves both:
//
//	chunk J:  intent J ─ack─▶ keys J ─────────────────────────────▶ acks J ▶ reply J
//	chunk K:                         (folded meanwhile) intent J+K ─ack─▶ keys K ─▶ …
//
// One connection carries them to one stream, so the server stores the record after
// J's keys. But a key of J may still fail (an expiry marker's conflict, written again
// when J lands), so until J's writes are all acknowledged K's intent record covers J
// too: J's sequences and decisions, and the state before J of every key either
// changed. A crash at any point is recovered from the latest stored record by folding
// again whatever it covers. K's keys still wait for K's own record (fencing), and a lone
// request, with no next chunk, lands at once: nothing waits for a chunk that may
// never come.

// flight is a chunk whose intent record is stored and whose writes are on their way.
type flight struct {
	items     []item
	decisions []events.Decision
	writes    []pendingWrite
	before    []events.KeyState // its recorded keys' states before it
	now       int64             // the time its TTLs were computed at
	// erased are the users it deletes (erase.go): such a chunk lands alone, before any
	// other intent record is sent, and its own is replaced before its decisions go out.
	erased []string
}

func (f *flight) span() (first, last uint64) { return f.items[0].seq, f.items[len(f.items)-1].seq }

// commit writes a folded chunk: its intent record (covering the chunk in flight, if
// any), then, once the record is stored and the chunk in flight has landed, its keys
// and recorded rejections. With more to fold (more), the chunk stays in flight, to land
// when the next one's intent record is on its way; otherwise it lands now.
func (p *Projector) commit(ctx context.Context, items []item, decisions []events.Decision, intent []byte, more bool) error {
	first, last := items[0].seq, items[len(items)-1].seq
	p.batches.Add(1)
	p.events.Add(uint64(len(items)))
	if p.recover != nil && last >= p.recover.Last {
		p.recover = nil
	}
	if err := p.hook(p.cfg.Hooks.BeforeCheckpoint, first, last); err != nil {
		return err
	}
	if p.flight != nil && len(p.flight.erased) > 0 {
		if err := p.land(ctx); err != nil {
			return err // a deletion lands alone (erase.go)
		}
	}
	if p.flight != nil {
		both, err := p.intent(p.flight, items, decisions)
		if err != nil {
			return err
		}
		if len(both) <= int(p.nc.MaxPayload())-intentHeadroom {
			intent = both
		} else if err := p.land(ctx); err != nil {
			return err // both would not fit in one record: land first, record this alone
		}
	}
	ckFut, err := p.sendIntent(intent)
	if err != nil {
		return err
	}
	if f := p.flight; f != nil {
		ffirst, flast := f.span()
		if err := p.hook(p.cfg.Hooks.InFlight, ffirst, flast); err != nil {
			return err
		}
		if err := p.land(ctx); err != nil {
			return err
		}
	}
	if err := p.waitCheckpoint(ctx, ckFut, intent); err != nil {
		return err
	}
	if err := p.hook(p.cfg.Hooks.AfterCheckpoint, first, last); err != nil {
		return err
	}
	f := &flight{items: items, decisions: decisions, before: p.recorded(), now: time.Now().UnixNano(), erased: deletedUsers(items, decisions)}
	p.view.locked(p.view.sending)
	if f.writes, err = p.sendWrites(ctx, items, decisions, f.now); err != nil {
		return err
	}
	p.view.locked(p.view.committed)
	p.flight = f
	if more {
		return nil
	}
	return p.land(ctx)
}

// land waits until the chunk in flight is stored, then hands its decisions out and
// acks it: Applied passes it (and the tail of the batch that waited for it).
func (p *Projector) land(ctx context.Context) error {
	f := p.flight
	if f == nil {
		return nil
	}
	first, last := f.span()
	if err := p.settle(ctx, f.writes, f.now); err != nil {
		return err
	}
	p.flight = nil
	p.view.locked(p.view.landed)
	if err := p.hook(p.cfg.Hooks.AfterWrites, first, last); err != nil {
		return err
	}
	if len(f.erased) > 0 {
		// Before the decisions go out: "deleted" means erased.
		if err := p.finishErasures(ctx, f, last); err != nil {
			return err
		}
	}
	p.reply(f.items, f.decisions)
	p.announce(f.items)
	if err := p.hook(p.cfg.Hooks.BeforeAck, first, last); err != nil {
		return err
	}
	p.applied.Store(last)
	if p.recover == nil {
		p.serving.Store(true) // a recovered batch has landed: the view is current
	}
	// AckAll: one ack covers the chunk. Losing it is harmless: a redelivered event at or
	// below Applied is skipped.
	if err := f.items[len(f.items)-1].msg.Ack(); err != nil {
		p.log.Warn("ack failed", "seq", last, "err", err)
	}
	if t := p.tail; t != nil {
		p.tail = nil
		return p.passTail([]jetstream.Msg{t})
	}
	return nil
}
