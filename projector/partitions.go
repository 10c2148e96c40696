package projector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
)

// Partitions runs, on one attrd instance, the projectors of the partitions this
// instance folds, and shares the partitions with the other instances.
//
// Every instance announces itself with a presence key (i.<instance>, renewed every
// TTL/3, expiring after the lease TTL) and watches the others'. Of the instances
// present, oldest first, partition p is assigned to the (p mod k)-th: k instances hold
// N/k partitions each, give or take one, and an instance joining moves only the
// partitions it takes (partition 0 stays with the oldest). An instance claims the leases of the
// partitions assigned to it and releases those that are not, between batches, so a
// new instance gets its share within a poll or two of its presence (a clean
// handover, not a lease running out), and the partitions of an instance that stops
// cleanly move at once. When an instance dies, its presence and its leases expire
// after the TTL and the others take its partitions over. A partition whose lease
// stays free for two TTLs is claimed by whoever sees it, assigned or not, so that
// diverging views of who is present never leave a partition unfolded.
type Partitions struct {
	cfg    PartitionsConfig
	js     jetstream.JetStream
	kv     jetstream.KeyValue
	kvs    jetstream.Stream
	layout events.Layout
	log    *slog.Logger
	// reads reads keys from the bucket's leader for every partition's runs and leases
	// here, knowing of the elections seen since Run started (events/leaderread).
	reads *leaderread.Reader
	// unsettled is what this instance's presence record says (announce).
	unsettled atomic.Bool
	// renewed is the sequence of this instance's last presence renewal acknowledged,
	// and snaps reads presence keys from a copy holding it (presence.go).
	renewed     atomic.Uint64
	renewedWhen atomic.Int64 // Unix ns
	snaps       *leaderread.Snapshots

	mu      sync.Mutex
	present []string // instances present, sorted: the settled ones (all while none is)
	// everyone is every instance present, settled or not, sorted.
	everyone []string
	running  map[int]*Projector    // the partitions this instance folds, once ready
	leases   map[int]*Lease        // their leases
	failed   map[int]error         // a partition's last run's error, until it runs again
	freeAt   map[int]time.Time     // when a partition's lease was first seen free
	changed  chan struct{}         // closed and replaced whenever present changes
	started  map[int]chan struct{} // closed once a partition has run ready here or is held elsewhere
	// failedC is closed at the first failed run of a partition not started yet.
	failedC chan struct{}
}

// PartitionsConfig configures Partitions.
type PartitionsConfig struct {
	// Projector is every partition's projector configuration (Partition is set per
	// partition).
	Projector Config
	// Instance names this instance in presence keys, leases and logs.
	Instance string
	// LeaseTTL is how long a lease and a presence outlive their last renewal.
	LeaseTTL time.Duration
	// Settle is how long this instance renews and reads back its presence without a
	// failure before partitions are assigned to it (default: LeaseTTL).
	Settle time.Duration
	// Dial opens a connection for one partition's projector, so that partitions do not
	// queue behind each other in one socket (nil: they share the supervisor's).
	Dial func(name string) (*nats.Conn, error)
	// Poll is how often a free lease is tried (default 200ms).
	Poll time.Duration
	// Logger; nil uses slog.Default().
	Logger *slog.Logger
}

// NewPartitions returns the supervisor of this instance's partitions, on nc; the
// event stream's metadata gives the number of partitions.
func NewPartitions(ctx context.Context, nc *nats.Conn, cfg PartitionsConfig) (*Partitions, error) {
	if cfg.Projector.Bucket == "" {
		cfg.Projector.Bucket = events.DefaultBucket
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 200 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	// Short API timeouts: a request during an election waits out its timeout (see New).
	js, err := jetstream.New(nc, jetstream.WithDefaultTimeout(apiTimeout))
	if err != nil {
		return nil, err
	}
	evs, err := js.Stream(ctx, events.StreamName)
	if err != nil {
		return nil, fmt.Errorf("event stream: %w", err)
	}
	kv, err := js.KeyValue(ctx, cfg.Projector.Bucket)
	if err != nil {
		return nil, err
	}
	kvs, err := js.Stream(ctx, events.KVStream(cfg.Projector.Bucket))
	if err != nil {
		return nil, err
	}
	s := &Partitions{cfg: cfg, js: js, kv: kv, kvs: kvs, layout: events.LayoutOf(evs.CachedInfo().Config), log: cfg.Logger,
		running: map[int]*Projector{}, leases: map[int]*Lease{}, failed: map[int]error{}, freeAt: map[int]time.Time{}, changed: make(chan struct{}),
		started: map[int]chan struct{}{}, failedC: make(chan struct{})}
	for p := range s.layout.N() {
		s.started[p] = make(chan struct{})
	}
	s.unsettled.Store(true) // as its presence record says until it has settled
	return s, nil
}

// Layout returns the deployment's partitioning.
func (s *Partitions) Layout() events.Layout { return s.layout }

// Running returns the projectors this instance runs now, by partition.
func (s *Partitions) Running() map[int]*Projector {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.running)
}

// Started returns nil once every partition has run ready on this instance or is held
// by another; the error of a partition whose first run here failed before that; or
// ctx's error.
func (s *Partitions) Started(ctx context.Context) error {
	for p := range s.layout.N() {
		select {
		case <-s.started[p]:
		case <-s.failedC:
			s.mu.Lock()
			defer s.mu.Unlock()
			for q, err := range s.failed {
				return fmt.Errorf("partition %d: %w", q, err)
			}
			return errors.New("a partition failed")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Run announces this instance and folds the partitions assigned to it until ctx ends;
// then it stops them between batches and gives their leases up.
func (s *Partitions) Run(ctx context.Context) error {
	reads, err := leaderReads(s.js.Conn(), s.kvs)
	if err != nil {
		return err
	}
	if reads != nil {
		defer reads.Close()
	}
	if s.snaps, err = leaderread.NewSnapshots(s.js.Conn()); err != nil {
		return err
	}
	defer s.snaps.Close()
	if reads != nil {
		// While the meta group has no leader every server refuses leader reads: the
		// bucket's are then read through its read index, with this instance's barrier
		// key (presence renewals, lease checks and the runs' reads of other partitions'
		// keys go on through a cut of the meta leader's node).
		hb := events.KVSubject(s.cfg.Projector.Bucket, events.HeartbeatKey(events.NewID()))
		reads.ReadIndexWhenUnavailable(s.kvs.CachedInfo().Config.Name, hb, leaderread.NewBarriers(events.Barrier(s.js, hb, nil)), s.snaps)
		s.reads = reads // before the goroutines below, which read it
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watcher, err := s.kv.Watch(wctx, "i.>")
	if err != nil {
		return fmt.Errorf("watch instances: %w", err)
	}
	defer watcher.Stop()
	go s.watchPresence(wctx, watcher)
	go s.announce(wctx)
	var wg sync.WaitGroup
	for p := range s.layout.N() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.partition(wctx, p)
		}()
	}
	<-ctx.Done()
	cancel()
	wg.Wait()
	// Gone at once, rather than when the presence key expires: the others take the
	// partitions now.
	dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer dcancel()
	_ = s.kv.Purge(dctx, events.PresenceKey(s.cfg.Instance))
	return nil
}

// announce writes this instance's presence key every TTL/3 (with a TTL, so that it
// goes when the instance dies), and reads it back from the bucket's leader. The record
// says Unsettled until renewals and reads have both succeeded for settleFor, at the
// start and after failures that lasted a lease TTL: a node back from a network cut
// takes renewals (they reach the leader through the healed routes) seconds before it
// answers reads (its groups catch up, or elect again), and a partition handed to its
// instance then would stop there (issue 21).
func (s *Partitions) announce(ctx context.Context) {
	key := events.PresenceKey(s.cfg.Instance)
	subject := events.KVSubject(s.cfg.Projector.Bucket, key)
	rec := events.PresenceRecord{Instance: s.cfg.Instance, Joined: time.Now().UnixNano(), Unsettled: true}
	var steadySince, failingSince time.Time
	t := time.NewTicker(s.cfg.LeaseTTL / 3)
	defer t.Stop()
	for {
		data, err := events.Marshal(&rec)
		if err != nil {
			panic(err) // a plain struct
		}
		rctx, cancel := context.WithTimeout(ctx, s.cfg.LeaseTTL/3)
		// Nats-TTL: the server removes the key of an instance that stops renewing it.
		ack, err := s.js.PublishMsg(rctx, &nats.Msg{Subject: subject, Data: data}, jetstream.WithMsgTTL(s.cfg.LeaseTTL))
		if err == nil {
			// Read back as the bucket's leader has it (a replica behind shows an
			// older revision while nothing is wrong).
			var m *jetstream.RawStreamMsg
			if m, err = lastOf(rctx, s.reads, s.kvs, subject); err == nil && m.Sequence < ack.Sequence {
				err = fmt.Errorf("read back revision %d, wrote %d", m.Sequence, ack.Sequence)
			}
			if err == nil {
				s.renewedAt(ack.Sequence)
			}
		}
		cancel()
		switch {
		case err != nil && ctx.Err() == nil:
			s.log.Warn("presence not renewed", "err", err)
			if failingSince.IsZero() {
				failingSince = time.Now()
			}
			// Failures for a lease TTL (the key has expired meanwhile: the others saw
			// this instance gone) unsettle it; a slow renewal under load does not, and
			// its partitions stay.
			if time.Since(failingSince) >= s.cfg.LeaseTTL {
				steadySince = time.Time{}
			}
		case err == nil:
			if !failingSince.IsZero() && time.Since(failingSince) >= s.cfg.LeaseTTL && s.reads != nil {
				// Back from a cut: the elections of the others' side were announced
				// where this connection could not hear them, and a leader of this node
				// may still answer from its old copy. Loads here are verified.
				s.reads.SuspectAll()
			}
			failingSince = time.Time{}
			if steadySince.IsZero() {
				steadySince = time.Now()
			}
		}
		rec.Unsettled = steadySince.IsZero() || time.Since(steadySince) < s.settleFor()
		s.unsettled.Store(rec.Unsettled)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// settleFor is how long an instance renews and reads its presence without a failure
// before partitions are assigned to it.
func (s *Partitions) settleFor() time.Duration {
	if s.cfg.Settle > 0 {
		return s.cfg.Settle
	}
	return s.cfg.LeaseTTL
}

// assigned reports whether partition p is this instance's and whether it is another's
// (neither while no instance is known yet), and a channel closed when that may have
// changed.
func (s *Partitions) assigned(p int) (mine, others bool, changed <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.present) == 0 {
		return false, false, s.changed
	}
	mine = assignee(s.present, p) == s.cfg.Instance
	return mine, !mine, s.changed
}

// partition folds partition p whenever this instance may hold it, until ctx ends. A
// run that fails is started again after a pause that doubles up to a quarter of a
// second, or at once when a stream elects a leader: a start that fails costs little
// (a few requests), and during an election every moment of pause is a moment more
// without writes once a leader is there.
func (s *Partitions) partition(ctx context.Context, p int) {
	const minPause, maxPause = 50 * time.Millisecond, 250 * time.Millisecond
	pause := minPause
	for ctx.Err() == nil {
		mine, _, _ := s.assigned(p)
		held, err := s.claim(ctx, p, mine)
		if err != nil || !held {
			select {
			case <-ctx.Done():
			case <-time.After(s.cfg.Poll):
			}
			continue
		}
		err = s.fold(ctx, p)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			pause = minPause
			continue // handed over: it may come back
		}
		s.mu.Lock()
		s.failed[p] = err
		select {
		case <-s.started[p]:
		default:
			// A stale server's answer (a node back from a cut) passes within seconds:
			// the start waits for the next run rather than fail.
			if !errors.Is(err, ErrStaleRead) {
				closeOnce(s.failedC)
			}
		}
		s.mu.Unlock()
		s.log.Error("projector stopped; starting it again", "partition", p, "err", err, "pause", pause)
		select {
		case <-time.After(pause):
		case <-s.elected():
			// A stream has a new leader: what the run waited for may be there now.
		case <-ctx.Done():
			return
		}
		pause = min(2*pause, maxPause)
	}
}

// claim tries partition p's lease once: when p is assigned here, or when its lease has
// been free for two TTLs. It notes a partition another instance holds as started.
func (s *Partitions) claim(ctx context.Context, p int, mine bool) (bool, error) {
	rec, held, err := holderWithin(ctx, s.reads, s.kvs, s.cfg.Projector.Bucket, events.PartitionName(p), s.cfg.LeaseTTL)
	if err != nil {
		return false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if held && rec.Owner != s.cfg.Instance {
		delete(s.freeAt, p)
		closeOnce(s.started[p])
		return false, nil
	}
	if _, ok := s.freeAt[p]; !ok {
		s.freeAt[p] = time.Now()
	}
	if mine {
		return true, nil
	}
	if s.unsettled.Load() && len(s.present) > 0 && !slices.Contains(s.present, s.cfg.Instance) {
		// Another's partition is not taken by an instance that has not settled (just
		// started, or back from a network cut, where it saw leases free from its node's
		// old copies) while the list of those that have is not empty: one of them, or
		// this one once settled, takes it. Unless they are all gone, by a fresh
		// reading: then every instance left is unsettled (the bucket had no leader
		// for a while), and waiting for them to settle would only add a lease TTL to
		// the outage (issue 21).
		return s.orphaned(ctx, p), nil
	}
	if time.Since(s.freeAt[p]) > 2*s.cfg.LeaseTTL {
		s.log.Info("claiming a partition free for two lease TTLs", "partition", p)
		return true, nil
	}
	// The lease is free and the partition another's: if that instance is gone (its
	// presence key expired, as the bucket's leader says, whatever this instance's watch
	// has seen: the watch may be cut off with a node), take it now rather than after
	// two TTLs.
	owner := s.owner(p)
	if owner == "" {
		return false, nil
	}
	s.mu.Unlock()
	gone, err := s.gone(ctx, owner)
	s.mu.Lock()
	if err == nil && gone {
		if next := s.successor(p, owner); next != "" && next != s.cfg.Instance {
			// Another instance gets the partition once the gone one leaves the list:
			// it claims it now, by this same reading. Taking it here would move it
			// twice, the second time (a hand-over) when this instance's watch sees the
			// instance gone, seconds into the outage (issue 21).
			return false, nil
		}
		s.log.Info("claiming a partition whose instance is gone", "partition", p, "instance", owner)
		return true, nil
	}
	return false, nil
}

// elected returns a channel closed at the next leader election of a stream, nil
// (never) without a leader reader (a bucket of one replica elects nobody).
func (s *Partitions) elected() <-chan struct{} {
	if s.reads == nil {
		return nil
	}
	return s.reads.Elected()
}

// successor returns the instance partition p goes to once instance gone has left the
// list ("" when none would be left); s.mu is held.
func (s *Partitions) successor(p int, gone string) string {
	return assignee(without(s.present, gone), p)
}

// without returns a copy of list without the instances of drop.
func without(list []string, drop ...string) []string {
	return slices.DeleteFunc(slices.Clone(list), func(i string) bool { return slices.Contains(drop, i) })
}

// owner returns the instance partition p is assigned to ("" while none is known);
// s.mu is held.
func (s *Partitions) owner(p int) string { return assignee(s.present, p) }

// assignee is the rule that assigns partitions: of the instances present, oldest
// first, partition p goes to the (p mod k)-th ("" when there are none).
func assignee(present []string, p int) string {
	if len(present) == 0 {
		return ""
	}
	return present[p%len(present)]
}

// gone reports whether an instance's presence key is expired or removed, read from the
// bucket's leader; one not renewed for the TTL (and a margin) is gone, even before the
// server marks it expired.
func (s *Partitions) gone(ctx context.Context, instance string) (bool, error) {
	m, err := lastOf(ctx, s.reads, s.kvs, events.KVSubject(s.cfg.Projector.Bucket, events.PresenceKey(instance)))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return lapsed(m, s.cfg.LeaseTTL), nil
}

func closeOnce(c chan struct{}) {
	select {
	case <-c:
	default:
		close(c)
	}
}

// fold takes partition p's lease and runs its projector under it until ctx ends, the
// lease is lost, the run fails, or the partition is assigned elsewhere (nil: handed
// over); then it gives the lease up so that the next holder starts at once.
func (s *Partitions) fold(ctx context.Context, p int) error {
	part := events.PartitionName(p)
	lease, err := NewLease(ctx, s.js, s.cfg.Projector.Bucket, part, s.cfg.Instance, s.cfg.LeaseTTL)
	if err != nil {
		return err
	}
	lease.reads = s.reads
	actx, acancel := context.WithTimeout(ctx, s.cfg.Poll)
	err = lease.Acquire(actx, s.cfg.Poll)
	acancel()
	if err != nil {
		if ctx.Err() != nil || errors.Is(err, context.DeadlineExceeded) {
			return nil // taken by another meanwhile
		}
		return err
	}
	s.mu.Lock()
	delete(s.freeAt, p)
	s.mu.Unlock()
	m := s.cfg.Projector.Metrics.of(p)
	m.leaseHeld(true)
	defer m.leaseHeld(false)
	lease.RenewFailed = m.renewFailure
	nc := s.js.Conn()
	if s.cfg.Dial != nil {
		if nc, err = s.cfg.Dial("attrd-projector-" + part); err != nil {
			s.release(ctx, lease)
			return err
		}
		defer nc.Close()
	}
	cfg := s.cfg.Projector
	cfg.Partition = p
	if cfg.Reads == nil {
		cfg.Reads = s.reads
	}
	prj, err := New(nc, cfg)
	if err != nil {
		s.release(ctx, lease)
		return err
	}
	lease.Progress = prj.Applied
	s.log.Info("this instance folds a partition", "instance", s.cfg.Instance, "partition", p)
	rctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	kept := make(chan error, 1)
	go func() {
		err := lease.Keep(rctx)
		kept <- err
		if err != nil {
			cancel(err) // lost: stop folding at once (the fence stops any write anyway)
		}
	}()
	done := make(chan error, 1)
	go func() { done <- prj.Run(rctx) }()
	finished, handed := false, false
	select {
	case <-prj.Ready():
		s.mu.Lock()
		s.running[p] = prj
		s.leases[p] = lease
		delete(s.failed, p)
		closeOnce(s.started[p])
		s.mu.Unlock()
		select {
		case err = <-done:
			finished = true
		case <-s.handedOver(rctx, p):
			handed = true
		}
	case err = <-done:
		finished = true
	}
	s.mu.Lock()
	delete(s.running, p)
	delete(s.leases, p)
	s.mu.Unlock()
	cancel(nil) // a run not finished stops between batches
	if !finished {
		err = <-done
	}
	if kerr := <-kept; kerr != nil && err == nil {
		err = kerr
	}
	s.release(ctx, lease)
	if handed && err == nil {
		s.log.Info("partition handed over", "instance", s.cfg.Instance, "partition", p)
	}
	return err
}

// handedOver returns a channel closed once partition p is assigned to another instance
// that is present, or never (ctx ends first). Present means present as the bucket's
// leader says (gone): this instance's watch may be behind, cut off with a node, and
// handing a partition to an instance that is gone would leave nobody folding it.
func (s *Partitions) handedOver(ctx context.Context, p int) <-chan struct{} {
	c := make(chan struct{})
	go func() {
		recheck := time.NewTicker(time.Second)
		defer recheck.Stop()
		for {
			_, others, changed := s.assigned(p)
			if others {
				s.mu.Lock()
				owner := s.owner(p)
				s.mu.Unlock()
				if gone, err := s.gone(ctx, owner); err == nil && !gone {
					close(c)
					return
				}
			}
			select {
			case <-changed:
			case <-recheck.C:
			case <-ctx.Done():
				return
			}
		}
	}()
	return c
}

// release gives a lease up.
func (s *Partitions) release(ctx context.Context, lease *Lease) {
	rel, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if err := lease.Release(rel); err != nil {
		s.log.Debug("lease not released", "err", err)
	}
}

// Read returns a record of the projection as a partition this instance folds has it
// committed, when that is certainly the latest: the key belongs to the partition (an
// attribute, user or session-index key of one of its users, or a session whose
// record names one of them), the view knows it, and this instance's lease on the
// partition is valid, so that no other instance can have folded anything after it.
// ok is false otherwise: read KV.
func (s *Partitions) Read(key string) (rec any, ok bool) {
	uid := events.OwnerOfKey(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	try := func(p int) (any, bool) {
		prj, lease := s.running[p], s.leases[p]
		if prj == nil || lease == nil || !lease.Valid() {
			return nil, false
		}
		return prj.Committed(key)
	}
	if uid != "" {
		return try(s.layout.Partition(uid))
	}
	if !strings.HasPrefix(key, "s.") {
		return nil, false // usernames, the projectors' own keys: any partition may write them
	}
	// A session: its record names its user; a view that has one of its own users'
	// sessions has it as it is. (An actor's session another partition read as it stood
	// at some event is not its own, and not taken.)
	for p := range s.running {
		r, known := try(p)
		if sr, isSession := r.(*events.SessionRecord); known && isSession && s.layout.Partition(sr.UserID) == p {
			return r, true
		}
	}
	return nil, false
}
