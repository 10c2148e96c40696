// Package projector folds the event log into the projection: the only writer of the
// KV bucket. It reads the log in order through a pull consumer of its own, decides every
// event against the projection as it stands after all earlier events (see Fold),
// writes the changed keys with per-key TTL, and hands each decision back to the
// waiting request. Of several attrd instances, the one holding the partition's Lease
// folds; the intent record fences any other.
//
// # Exactly once
//
// Events are folded in batches. For each batch the projector first writes an intent
// record (events.Checkpoint: the batch's sequences, its decisions, and the state before
// it of every key it changes) and waits for it to be stored, then the changed keys, then
// sends the decisions and acks the batch. All of these go to the one bucket stream over one connection, so the
// server stores them in that order. On start the projector reads the intent record and
// folds that batch again from the recorded state with the recorded decisions: whatever
// part of it had reached KV, the result is the same, and no event is applied twice or
// lost.
package projector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
)

// Config configures a Projector.
type Config struct {
	// Bucket is the projection bucket; it must exist (events.EnsureStore).
	Bucket string
	// Durable prefixes the name of each run's consumer of the event stream.
	Durable string
	// Partition is the partition this projector folds (of the layout the event
	// stream's metadata gives); it names its intent record (p.<n>), recording record
	// (r.<n>) and lease (l.<n>).
	Partition int
	// MaxBatch bounds the events folded together (default 512).
	MaxBatch int
	// Opener opens sealed values for Inherit items; nil rejects them.
	Opener Opener
	// DataKeys open what is personal in events (version 3) and are destroyed when a
	// user is deleted (erase.go); nil: events are folded as they come.
	DataKeys *events.DataKeys
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
	// Hooks let tests stop the projector between the steps of a batch, and play
	// what a server would do.
	Hooks Hooks
	// Metrics, if set, records the projector's progress for Prometheus.
	Metrics *Metrics
	// Reads, if set, reads keys as the bucket's leader has them (events/leaderread):
	// shared by an instance's runs, so that each knows of the elections seen before
	// it started. nil: each run makes its own for a replicated bucket, and reads a
	// bucket of one replica (one server: no old copy answers) plainly.
	Reads *leaderread.Reader
}

// Hooks are called between the steps of folding a batch; an error stops Run at that
// point as a crash would, with nothing more written or acked. The fields that are not
// functions change what a run asks of the servers, for tests.
type Hooks struct {
	BeforeCheckpoint func(first, last uint64) error // the events are stored, nothing written
	AfterCheckpoint  func(first, last uint64) error // intent written, keys not yet
	AfterWrites      func(first, last uint64) error // keys written, no reply, no ack
	BeforeAck        func(first, last uint64) error // replies sent, not acked
	// InFlight is called for a chunk whose keys are on their way when the next chunk's
	// intent record (covering both) has been sent, before the first chunk lands: between
	// the two pipelined steps.
	InFlight func(first, last uint64) error
	// Announce is called before a landed chunk is announced on the feed (feed.go); an
	// error drops the announcement, as a lost core NATS message would be.
	Announce func(first, last uint64) error
	// IntentAnswer, if set, sees the answer to each intent record's write and may
	// replace it (a test plays a server that answers first from an old copy).
	IntentAnswer func(ack *jetstream.PubAck, err error) (*jetstream.PubAck, error)
	// CreateConsumer, if set, is called before a run creates its consumer; an error
	// is taken as the server's (a test plays a meta group without a leader).
	CreateConsumer func() error
	// ConsumerAnywhere keeps each run's consumer wherever the server put it, rather
	// than on the run's own server (placement.go): a test of a consumer on another
	// node than its run's.
	ConsumerAnywhere bool
	// PlaceBudget, if set, replaces how long a run tries to put its consumer on its
	// own server (placeBudget): a test on a loaded machine counts the tries alone.
	PlaceBudget time.Duration
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
	// seen is the highest sequence of the bucket's stream this run saw stored (an
	// acknowledged write): a key of the partition is read only from a copy holding it.
	seen atomic.Uint64
	// layout is the event stream's partitioning, and part this projector's partition
	// by name.
	layout  events.Layout
	part    string
	applied atomic.Uint64
	// announced is the last sequence the feed has announced (feed.go).
	announced uint64
	ready     chan struct{}
	batches   atomic.Uint64
	events    atomic.Uint64

	// recovery: the batch of the intent record found at start, folded again.
	recover *events.Checkpoint
	// consumerName is this run's consumer of the event stream, and delivered the
	// consumer sequence of the last message it delivered (see checkDelivery).
	consumerName string
	delivered    uint64

	// flight is the chunk whose writes are on their way (pipeline.go); tail, the last
	// message of a batch whose Applied waits for it to land; more reports whether
	// events are waiting to be folded.
	flight *flight
	tail   jetstream.Msg
	more   func() bool

	// serving says the view may answer reads (Committed): not while a recovered batch
	// is folded again, since the view then holds the states from before that batch,
	// older than what KV may already hold of it.
	serving atomic.Bool

	metrics *partitionMetrics // nil: none
}

// New returns a projector on nc.
func New(nc *nats.Conn, cfg Config) (*Projector, error) {
	if cfg.Bucket == "" {
		cfg.Bucket = events.DefaultBucket
	}
	if cfg.Durable == "" {
		cfg.Durable = "projector"
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 512
	}
	if cfg.MaxCacheEntries <= 0 {
		cfg.MaxCacheEntries = 100_000
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	// An ack can be lost (a leader change, a node lost): without a timeout its future
	// would never complete and the projector would hang holding its lease. With one,
	// the write fails, the run stops, and the next run recovers from the intent record
	// (ackTimeout).
	//
	// A JetStream API request sent while a stream has no leader (an election after a
	// node was cut off) is answered by nobody and waits out its timeout, even if a
	// leader comes a moment later: apiTimeout, rather than the default five seconds,
	// so that a run starting during an election tries again soon after it (issue 21).
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192), jetstream.WithPublishAsyncTimeout(ackTimeout),
		jetstream.WithDefaultTimeout(apiTimeout))
	if err != nil {
		return nil, err
	}
	return &Projector{cfg: cfg, nc: nc, js: js, log: cfg.Logger, view: newView(), ready: make(chan struct{}),
		part: events.PartitionName(cfg.Partition), metrics: cfg.Metrics.of(cfg.Partition)}, nil
}

// ackTimeout bounds the wait for a write's acknowledgement. NATS subtlety: a write
// that reached a stream's leader as it lost its leadership (a cut, a heal's
// election) is answered by nobody, and the partition's writes stop until the run
// gives it up: the partition harness saw it cost 5 s (the old timeout) right after a
// heal while NATS took writes again (issue 21). Acks take milliseconds; one slower
// than this under load costs a run's restart, not a wrong result.
const ackTimeout = 2 * time.Second

// apiTimeout bounds a JetStream API request of the projector and its supervisor (a
// stream's info, a consumer's creation, a key's read): they take milliseconds, and one
// sent during an election is never answered.
const apiTimeout = 500 * time.Millisecond

// oneLeaderLinger is how long a run's start listens for a second server answering as
// the bucket's leader: a route's hop, with room.
const oneLeaderLinger = 100 * time.Millisecond

// Ready is closed once the projector has recovered and is consuming.
func (p *Projector) Ready() <-chan struct{} { return p.ready }

// Applied returns the stream sequence of the last event folded and written.
func (p *Projector) Applied() uint64 { return p.applied.Load() }

// Run folds the log until ctx is done (or, with StopAtEnd, until caught up). It returns
// nil on a clean stop.
func (p *Projector) Run(ctx context.Context) (err error) {
	p.metrics.runStarted()
	kv, err := p.js.KeyValue(ctx, p.cfg.Bucket)
	if err != nil {
		return fmt.Errorf("projection bucket %s: %w", p.cfg.Bucket, err)
	}
	kvs, err := p.js.Stream(ctx, events.KVStream(p.cfg.Bucket))
	if err != nil {
		return err
	}
	reads := p.cfg.Reads
	if reads == nil {
		if reads, err = leaderReads(p.nc, kvs); err != nil {
			return err
		}
		if reads != nil {
			defer reads.Close()
		}
	}
	snaps, err := leaderread.NewSnapshots(p.nc)
	if err != nil {
		return err
	}
	defer snaps.Close()
	p.load = &loader{kv: kv, stream: kvs, reads: reads, bucket: p.cfg.Bucket, parallel: 32,
		snaps: snaps, floor: p.seen.Load, anchor: events.KVSubject(p.cfg.Bucket, events.CheckpointKey(p.part))}
	evs, err := p.js.Stream(ctx, events.StreamName)
	if err != nil {
		return fmt.Errorf("event stream: %w", err)
	}
	p.layout = events.LayoutOf(evs.CachedInfo().Config)
	if p.cfg.Partition < 0 || p.cfg.Partition >= p.layout.N() {
		return fmt.Errorf("partition %d of a deployment of %d", p.cfg.Partition, p.layout.N())
	}
	fenced, rev, err := p.fence(ctx)
	if err != nil {
		return err
	}
	if kvs.CachedInfo().Config.Replicas > 1 {
		// NATS subtlety: a node back from a network cut may still answer as the bucket's
		// leader, from its old copy, and a run that starts loads every key it folds:
		// none is loaded while a server without the fence answers as the leader.
		if err := events.OneLeader(ctx, p.nc, kvs.CachedInfo().Config.Name, rev, oneLeaderLinger); err != nil {
			return fmt.Errorf("%w (%w)", ErrStaleRead, err)
		}
	}
	p.serving.Store(false)
	start, err := p.recoverState(ctx, fenced, rev)
	if err != nil {
		return err
	}
	p.serving.Store(p.recover == nil)
	if err := p.startRecording(ctx, start); err != nil {
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
		if ctx.Err() != nil || p.cfg.StopAtEnd {
			return err
		}
		// tail.go: no consumer now (the meta group without a leader, most likely);
		// read the log by direct gets for a while rather than wait.
		p.log.Warn("no consumer: the run reads its partition's log by direct gets", "partition", p.part, "for", tailFor, "err", err)
		cons = nil
	}
	p.delivered = 0
	// Other partitions ask how far this one has committed (cross.go).
	sub, err := p.serveApplied()
	if err != nil {
		return err
	}
	defer sub.Unsubscribe()
	defer func() {
		if cons == nil {
			return
		}
		// The consumer is this run's own: remove it rather than wait for the server to.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_ = evs.DeleteConsumer(dctx, p.consumerName)
	}()
	msgs := make(chan jetstream.Msg, 4*p.cfg.MaxBatch)
	p.more = func() bool { return len(msgs) > 0 }
	p.flight, p.tail = nil, nil
	defer func() {
		if err == nil {
			p.stopCleanly(ctx)
		}
	}()
	broken := make(chan error, 1)
	var tailEnd <-chan time.Time
	if cons == nil {
		tctx, tcancel := context.WithCancel(ctx)
		defer tcancel()
		go p.tailLog(tctx, evs.CachedInfo().Config.Name, start, msgs, broken)
		t := time.NewTimer(tailFor)
		defer t.Stop()
		tailEnd = t.C
	} else {
		cc, err := p.consume(ctx, cons, msgs, broken)
		if err != nil {
			return err
		}
		defer cc.Stop()
	}
	close(p.ready)
	p.log.Info("projector running", "bucket", p.cfg.Bucket, "partition", p.part, "from_seq", start, "direct_gets", cons == nil)

	batch := make([]jetstream.Msg, 0, p.cfg.MaxBatch)
	stall := &stallWatch{}
	stall.delivered()
	tick := time.NewTicker(stallCheck)
	defer tick.Stop()
	for {
		batch = batch[:0]
		select {
		case <-ctx.Done():
			return nil
		case <-tailEnd:
			p.log.Info("the run read its log by direct gets for its time: it stops, and the next creates a consumer", "partition", p.part)
			return nil
		case err := <-broken:
			return fmt.Errorf("event consumer: %w", err)
		case <-tick.C:
			if len(msgs) > 0 {
				continue // deliveries wait: not stalled
			}
			if err := p.checkStall(ctx, stall, evs); err != nil {
				return err
			}
			continue
		case m := <-msgs:
			batch = append(batch, m)
			stall.delivered()
		}
		batch, err = p.fill(ctx, msgs, broken, batch)
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return nil
		}
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

// consume starts delivering cons's messages to msgs until the returned context is
// stopped; a consumer lost (deleted, gone with its node, silent) is reported on broken.
func (p *Projector) consume(ctx context.Context, cons jetstream.Consumer, msgs chan jetstream.Msg, broken chan error) (jetstream.ConsumeContext, error) {
	cc, err := cons.Consume(func(m jetstream.Msg) {
		select {
		case msgs <- m:
		case <-ctx.Done():
		}
	}, jetstream.PullMaxMessages(2*p.cfg.MaxBatch),
		// Short pulls with frequent heartbeats: a consumer whose server went away is
		// noticed within seconds (ErrNoHeartbeat), not after the default 30s pull.
		jetstream.PullExpiry(5*time.Second), jetstream.PullHeartbeat(time.Second),
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
			// A consumer that is gone (its server died, a cluster lost it) delivers nothing
			// more: stop, and let the next run start a new one from the intent record.
			if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrNoHeartbeat) {
				select {
				case broken <- err:
				default:
				}
			}
		}))
	if err != nil {
		return nil, fmt.Errorf("consume: %w", err)
	}
	return cc, nil
}

// stopCleanly lands the chunk in flight, so that its requests get their answers from
// this run rather than from the next holder's recovery, and then writes an intent
// record that says nothing is pending, so that the next run goes on after the last
// event rather than fold the last chunks again. Neither is needed for correctness.
func (p *Projector) stopCleanly(ctx context.Context) {
	lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if err := p.land(lctx); err != nil {
		p.log.Warn("the chunk in flight did not land at the stop", "err", err)
		return
	}
	applied := p.Applied()
	if applied == 0 || p.ckptRev == 0 {
		return
	}
	data, err := events.Marshal(&events.Checkpoint{First: applied + 1, Last: applied})
	if err == nil {
		var f jetstream.PubAckFuture
		if f, err = p.sendIntent(data); err == nil {
			err = p.waitCheckpoint(lctx, f, data)
		}
	}
	if err != nil {
		p.log.Debug("no closing intent record", "err", err)
	}
}

// fill adds to the batch what is already waiting, and while recovering waits for the
// rest of the recorded batch, which must be folded as one. A consumer that breaks
// meanwhile ends the wait (an error): the rest would never come, and the lease, kept
// apart from the fold, would keep every other instance from taking over.
func (p *Projector) fill(ctx context.Context, msgs chan jetstream.Msg, broken <-chan error, batch []jetstream.Msg) ([]jetstream.Msg, error) {
	for len(batch) < p.cfg.MaxBatch || p.recovering(batch) {
		if p.recovering(batch) {
			select {
			case m := <-msgs:
				batch = append(batch, m)
				continue
			case err := <-broken:
				return batch, fmt.Errorf("event consumer, while recovering: %w", err)
			case <-ctx.Done():
				return batch, nil
			}
		}
		select {
		case m := <-msgs:
			batch = append(batch, m)
		default:
			return batch, nil
		}
	}
	return batch, nil
}

// recovering reports whether batch stops short of the recorded batch's end.
func (p *Projector) recovering(batch []jetstream.Msg) bool {
	if p.recover == nil || len(batch) == 0 {
		return false
	}
	md, err := batch[len(batch)-1].Metadata()
	return err == nil && md.Sequence.Stream < p.recover.Last
}

// Committed returns a key's record as this projector has it committed, when its view
// knows the key and may answer (not while a recovered batch is folded again).
func (p *Projector) Committed(key string) (rec any, known bool) {
	if !p.serving.Load() {
		return nil, false
	}
	return p.view.Committed(key)
}

// Stats returns how many batches and events the projector has folded.
func (p *Projector) Stats() (batches, events uint64) { return p.batches.Load(), p.events.Load() }
