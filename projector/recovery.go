package projector

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/attrd/attrd/events"
	"github.com/nats-io/nats.go/jetstream"
)

// consumer creates this run's consumer of the event stream. The intent record, not the
// consumer, is the projector's position: starting the consumer there redelivers the
// recorded batch at once instead of after AckWait.
func (p *Projector) consumer(ctx context.Context, evs jetstream.Stream, start uint64) (jetstream.Consumer, error) {
	cfg := jetstream.ConsumerConfig{
		// A consumer of this run alone: no other instance's consumer is ever deleted
		// or reset, and the server removes this one soon after its holder is gone.
		Name:              consumerName(p.cfg.Durable),
		InactiveThreshold: 30 * time.Second,
		FilterSubject:     p.layout.PartitionSubjects(p.cfg.Partition),
		AckPolicy:         jetstream.AckAllPolicy,
		// Deliveries lost on their way (a consumer leader change) come again only after
		// AckWait, and the fold cannot go past them: a short AckWait bounds that stall.
		// A batch that takes longer is redelivered and skipped (at or below Applied).
		AckWait:       5 * time.Second,
		MaxAckPending: 16 * p.cfg.MaxBatch,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		// One replica, in memory: the intent record, not the consumer, is the position,
		// so the consumer's state need not survive anything. A replicated one cost every
		// delivery and ack a Raft round of its own (an R1 consumer made updates on R3
		// 27% faster), and at a leader change it lost deliveries in flight (see
		// checkDelivery). It is put on the run's own server (placement.go); if its
		// node goes, the pull's heartbeats stop, the run ends within seconds
		// (ErrNoHeartbeat), and the next one creates a consumer on a node that is up,
		// from the intent record.
		Replicas: 1, MemoryStorage: true,
	}
	if start > 1 {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = start
	}
	if h := p.cfg.Hooks.CreateConsumer; h != nil {
		if err := h(); err != nil {
			return nil, fmt.Errorf("create consumer: %w", err)
		}
	}
	c, err := evs.CreateConsumer(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("create consumer: %w", err)
	}
	c, p.consumerName = p.place(ctx, evs, cfg, c)
	return c, nil
}

// fence rewrites the intent record as it is, with compare-and-set: its new revision
// makes any earlier holder's next intent record fail, so a deposed projector (paused,
// partitioned) stops before it writes anything more. A bucket without one gets an
// empty record ("nothing folded yet").
//
// It returns the record it rewrote (nil: none before) and its new revision. The
// compare-and-set also proves the record read was the latest, whichever server
// answered the read.
func (p *Projector) fence(ctx context.Context) (*events.Checkpoint, uint64, error) {
	key := events.CheckpointKey(p.part)
	e, err := p.load.read(ctx, key)
	if err != nil {
		return nil, 0, fmt.Errorf("read intent record: %w", err)
	}
	ck, _ := e.rec.(*events.Checkpoint)
	var data []byte
	if ck != nil {
		data, err = events.Marshal(ck)
	} else {
		data, err = events.Marshal(&events.Checkpoint{First: 1, Last: 0})
	}
	if err != nil {
		return nil, 0, err
	}
	f, err := p.publish(key, data, e.rev, 0, true)
	if err != nil {
		return nil, 0, err
	}
	ack, err := p.wait(ctx, f)
	if err != nil {
		return nil, 0, fmt.Errorf("fence the intent record: %w", err)
	}
	return ck, ack.Sequence, nil
}

// recoverState reads the intent record and prepares to fold its batch again. It returns
// the first stream sequence to consume.
//
// It takes the intent record fence wrote, not a new read of it: a read right after a
// leader change of the bucket's stream can be answered by a server that is behind, and
// an old record would fold old batches again. The fence's compare-and-set proved that
// record the latest.
func (p *Projector) recoverState(ctx context.Context, fenced *events.Checkpoint, rev uint64) (uint64, error) {
	p.ckptRev = rev
	ck := fenced
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
		cur := p.view.entries[ks.Key]
		if p.staleImage(ck, ks, cur) {
			// KV held a later state than the recorded one before the batch, and none of
			// the batch's writes reached the key: the record's state was read from a
			// server that was behind. KV's is the state before the batch.
			p.log.Warn("projector recovery: a recorded state older than the bucket's; folding on the bucket's",
				"key", ks.Key, "recorded_rev", ks.Rev, "rev", cur.rev)
			p.metrics.staleImage()
			continue
		}
		var rec any
		var err error
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
		p.view.locked(func() {
			p.view.set(ks.Key, rec, loaded)
			if ks.Rev == 0 || cur.rev != ks.Rev {
				p.view.unverified[ks.Key] = true
			}
		})
	}
	// Prefix scans are not trusted across the recorded states: scan again on demand.
	p.view.scanned = map[string]bool{}
	p.log.Info("projector recovering batch", "first", ck.First, "last", ck.Last, "fence", rev, "states", recoveredStates(ck, p.view))
	return ck.First, nil
}

// staleImage reports whether a key's recorded state before batch ck (ks) is older than
// what KV held before the batch: KV (cur, read now from a copy holding the fence) has moved
// past the revision the state was read at, to a record written for an event before the
// batch, so no write of the batch reached the key, and the state was read from a server
// that was behind (a stream leader back from a network cut, answering from its old
// copy). A marker (a delete, an expiry) tells nothing of who wrote it: not stale.
func (p *Projector) staleImage(ck *events.Checkpoint, ks events.KeyState, cur *entry) bool {
	if ks.Rev == 0 || cur == nil || cur.rev == ks.Rev || cur.rec == nil {
		return false
	}
	seq, ok := events.RecordSeq(cur.rec)
	return ok && seq < ck.First
}

// recoveredStates describes, for the log, the first keys of an intent record: each with
// the revision its state was read at and the key's revision now (evidence when a
// recovery is followed step by step, issue 17).
func recoveredStates(ck *events.Checkpoint, v *view) string {
	var b strings.Builder
	for i, ks := range ck.Before {
		if i == 20 {
			fmt.Fprintf(&b, " and %d more", len(ck.Before)-i)
			break
		}
		var now uint64
		if e := v.entries[ks.Key]; e != nil {
			now = e.rev
		}
		fmt.Fprintf(&b, "%s@%d→%d ", ks.Key, ks.Rev, now)
	}
	return strings.TrimSpace(b.String())
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

// startRecording notes, once per bucket, the first sequence whose decisions this
// projector records (events before it were folded by an attrd that did not record
// them). The key is written only if absent: a conflict means it is there already.
func (p *Projector) startRecording(ctx context.Context, start uint64) error {
	key := events.RecordingKey(p.part)
	e, err := p.load.read(ctx, key)
	if err != nil {
		return fmt.Errorf("read %s: %w", key, err)
	}
	if e.rec != nil {
		return nil
	}
	data, err := events.Marshal(&events.RecordingRecord{Since: start})
	if err != nil {
		return err
	}
	f, err := p.publish(key, data, e.rev, 0, true)
	if err == nil {
		_, err = p.wait(ctx, f)
	}
	if err != nil && !isConflict(err) {
		return fmt.Errorf("write %s: %w", key, err)
	}
	return nil
}
