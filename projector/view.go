package projector

import (
	"context"
	"errors"
	"fmt"
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

// entry is one key as the projector knows it.
type entry struct {
	rev uint64 // the key's last subject sequence in KV (0: nothing stored); the CAS base
	rec any    // decoded record; nil when absent
}

// view is the projection the fold works on: a write-through cache of the bucket, filled
// from KV on a miss. The projector is the bucket's only writer, so a cached entry is the
// truth about its key, except for revisions that the server's expiry markers advance
// (handled when a write conflicts).
//
// Within a batch it records which keys changed (dirty) and their state before the
// batch (before), which go into the intent record; keys only rewritten by a bulk
// effect (rewritten) are written but not recorded. undo keeps every touched entry as
// it was before the chunk, so that a chunk that cannot be committed is taken back.
type view struct {
	// mu guards entries and undo against Committed, which readers outside the
	// projector call: the projector takes it around every change of them.
	mu        sync.RWMutex
	untracked bool // an in-memory fold: no batches, nothing to record
	entries   map[string]*entry
	children  map[string]map[string]struct{} // attribute or index prefix -> keys with a record
	scanned   map[string]bool                // prefixes loaded whole
	dirty     []string
	before    map[string][]byte // encoded pre-batch record of each recorded dirty key; nil: absent
	rewritten map[string]bool   // dirty keys not recorded
	undo      map[string]*entry // entries as they were before the chunk (nil: no entry)
	// unverified are keys whose state a recovery took from an intent record while KV
	// had moved on (the recorded batch's own write): its revision is not the state's,
	// and the next intent record says so (KeyState.Rev 0).
	unverified map[string]bool
	// flying is the undo of the chunk in flight (its writes sent, not all
	// acknowledged): its keys' committed states, for Committed.
	flying map[string]*entry
}

// change is how set treats a key.
type change int

const (
	loaded    change = iota // read from KV: not a change
	changed                 // a fold's change: written, its prior state recorded
	rewritten               // a bulk effect's rewrite: written, not recorded
)

func newView() *view {
	v := &view{}
	v.reset()
	return v
}

// NewMemory returns an empty in-memory State: folding the log into it computes the
// projection (and every decision) without KV, for replays and point-in-time reads.
func NewMemory() *Memory {
	v := &view{untracked: true}
	v.reset()
	return &Memory{v: v}
}

// Memory is an in-memory projection.
type Memory struct {
	v *view
	// Recorded holds, after FoldAll, the decisions the projector recorded (rejections),
	// by sequence: a verification compares them with the replay's.
	Recorded map[uint64]events.Code
	since    uint64 // from which sequence the live projector records decisions
}

// RecordedSince is the sequence from which the live projector records decisions (0:
// none), as FoldAll found it.
func (m *Memory) RecordedSince() uint64 { return m.since }

// State returns the fold's view of m.
func (m *Memory) State() State { return m.v }

// Records returns the msgpack encoding of every present record, by key.
func (m *Memory) Records() map[string][]byte {
	out := map[string][]byte{}
	for k, rec := range m.recs() {
		b, err := events.Marshal(rec)
		if err != nil {
			panic(err) // records are plain structs
		}
		out[k] = b
	}
	return out
}

// Len returns how many keys hold a record.
func (m *Memory) Len() int {
	n := 0
	for _, e := range m.v.entries {
		if e.rec != nil {
			n++
		}
	}
	return n
}

// Committed returns a key's record as it is committed (written and acknowledged), and
// so exactly as KV has it: for a key the chunk being folded changes, its state before
// that chunk (nothing of it is sent yet). known is false when the view does not know
// the key (never loaded), or when a write of it is on its way (KV may have it already
// or not).
func (v *view) Committed(key string) (rec any, known bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if _, ok := v.flying[key]; ok {
		// A write of it is on its way: KV may hold either state, and a read here must
		// not answer older than a read of KV already did. Let KV answer.
		return nil, false
	}
	if old, ok := v.undo[key]; ok {
		if old == nil {
			return nil, true // created by the chunk in flight: absent until it commits
		}
		return old.rec, true
	}
	e := v.entries[key]
	if e == nil {
		return nil, false
	}
	return e.rec, true
}

// locked runs f holding the view's lock (the projector's changes).
func (v *view) locked(f func()) {
	v.mu.Lock()
	defer v.mu.Unlock()
	f()
}

// reset empties the cache (between batches only: it forgets nothing unwritten).
func (v *view) reset() {
	v.entries = map[string]*entry{}
	v.children = map[string]map[string]struct{}{}
	v.scanned = map[string]bool{}
	v.before = map[string][]byte{}
	v.rewritten = map[string]bool{}
	v.undo = map[string]*entry{}
	v.unverified = map[string]bool{}
	v.flying = nil
	v.dirty = nil
}

// sending marks the keys of the chunk whose writes are about to be sent as on their
// way (Committed leaves them to KV until the chunk lands); committed, once they are
// sent, clears the chunk's bookkeeping for the next.
func (v *view) sending() {
	v.flying = v.undo
	v.undo = map[string]*entry{}
}

// landed forgets the states before the chunk in flight: its writes are stored.
func (v *view) landed() { v.flying = nil }

// committed forgets the chunk's bookkeeping (its writes sent, or it was taken back).
func (v *view) committed() {
	v.dirty = v.dirty[:0]
	clear(v.before)
	clear(v.rewritten)
	clear(v.undo)
	clear(v.unverified)
}

// rollback takes back every change since the last commit (nothing of it was written).
func (v *view) rollback() {
	for key, old := range v.undo {
		var rec any
		if old != nil {
			rec = old.rec
		}
		v.set(key, rec, loaded)
		if old == nil {
			delete(v.entries, key)
		} else {
			v.entries[key].rev = old.rev
		}
	}
	v.committed()
}

func (v *view) get(key string) any {
	if e := v.entries[key]; e != nil {
		return e.rec
	}
	return nil
}

func (v *view) User(uid string) *events.UserRecord {
	r, _ := v.get(events.UserKey(uid)).(*events.UserRecord)
	return r
}

func (v *view) Username(name string) *events.UsernameRecord {
	r, _ := v.get(events.UsernameKey(name)).(*events.UsernameRecord)
	return r
}

func (v *view) Session(sid string) *events.SessionRecord {
	r, _ := v.get(events.SessionKey(sid)).(*events.SessionRecord)
	return r
}

func (v *view) Attr(key string) *events.AttrRecord {
	r, _ := v.get(key).(*events.AttrRecord)
	return r
}

func (v *view) Record(key string) any { return v.get(key) }

func (v *view) Keys(prefix string) []string { return v.AttrKeys(prefix) }

func (v *view) AttrKeys(prefix string) []string {
	keys := make([]string, 0, len(v.children[prefix]))
	for k := range v.children[prefix] {
		keys = append(keys, k)
	}
	return keys
}

func (v *view) Put(key string, rec any)     { v.set(key, rec, changed) }
func (v *view) Delete(key string)           { v.set(key, nil, changed) }
func (v *view) Rewrite(key string, rec any) { v.set(key, rec, rewritten) }

// set changes a key: loaded from KV, or a fold's change or rewrite (then dirty).
func (v *view) set(key string, rec any, how change) {
	e := v.entries[key]
	if how != loaded && !v.untracked {
		if _, kept := v.undo[key]; !kept {
			var old *entry
			if e != nil {
				c := *e
				old = &c
			}
			v.undo[key] = old
		}
	}
	if e == nil {
		e = &entry{}
		v.entries[key] = e
	}
	if how != loaded && !v.untracked {
		_, recorded := v.before[key]
		switch {
		case recorded:
		case how == changed:
			if !v.rewritten[key] {
				v.dirty = append(v.dirty, key)
			}
			// Recorded from its first real change: a rewrite before it left the record
			// as it was (or deleted it, which folding again does too).
			delete(v.rewritten, key)
			v.before[key] = encodeBefore(e.rec)
		case !v.rewritten[key]:
			v.dirty = append(v.dirty, key)
			v.rewritten[key] = true
		}
	}
	e.rec = rec
	if p, ok := attrPrefixOf(key); ok {
		if rec == nil {
			delete(v.children[p], key)
		} else {
			if v.children[p] == nil {
				v.children[p] = map[string]struct{}{}
			}
			v.children[p][key] = struct{}{}
		}
	}
}

// encodeBefore encodes a pre-batch state for the intent record. Attribute values are
// left out: an item that changes a value carries the new one in its event, and a
// session renewal rewrites values unchanged, so recovery never needs an old value it
// cannot read from KV.
func encodeBefore(rec any) []byte {
	if rec == nil {
		return nil
	}
	if a, ok := rec.(*events.AttrRecord); ok {
		c := *a
		c.Value = nil
		rec = &c
	}
	b, err := events.Marshal(rec)
	if err != nil {
		panic(fmt.Sprintf("encode record: %v", err)) // records are plain structs
	}
	return b
}

// attrPrefixOf returns an attribute or session-index key's prefix: everything up to its
// last dot (encoded names and session ids contain no dots).
func attrPrefixOf(key string) (string, bool) {
	if !strings.HasPrefix(key, "a.") && !strings.HasPrefix(key, "x.") {
		return "", false
	}
	i := strings.LastIndexByte(key, '.')
	return key[:i+1], true
}

// sessionOfAttrKey returns the session id of a session attribute key.
func sessionOfAttrKey(key string) (string, bool) {
	parts := strings.SplitN(key, ".", 5) // a, uid, s, sid, name
	if len(parts) == 5 && parts[2] == "s" {
		return parts[3], true
	}
	return "", false
}

// loader reads keys of the bucket for the view.
type loader struct {
	kv       jetstream.KeyValue
	stream   jetstream.Stream
	reads    *leaderread.Reader
	bucket   string
	parallel int
	// snaps reads this partition's keys from a copy of the bucket that holds floor()
	// (the last sequence this run saw stored), asking with anchor (the partition's
	// intent record, at or below it) so that every answer names its copy's extent;
	// nil, or noDirect once the bucket's configuration showed direct gets off (an
	// older attrd turned them off): read as the leader has them (reads) instead.
	snaps    *leaderread.Snapshots
	floor    func() uint64
	anchor   string
	noDirect atomic.Bool
}

// snapTimeout bounds a read of keys from a copy holding the floor: a healthy replica
// catches up within milliseconds; one that stays behind is cut off, and its run is
// better stopped (its lease is going) than kept waiting.
const snapTimeout = 2 * time.Second

// snapshot reads the last messages of keys (by key) from a copy of the bucket that
// holds everything this run saw stored; ok is false when the bucket serves no direct
// gets, and the caller reads another way.
func (l *loader) snapshot(ctx context.Context, keys []string) (map[string]*jetstream.RawStreamMsg, bool, error) {
	if l.snaps == nil || l.noDirect.Load() {
		return nil, false, nil
	}
	subjects := make([]string, len(keys))
	for i, k := range keys {
		subjects[i] = events.KVSubject(l.bucket, k)
	}
	// The bound is per request of a few hundred keys, not for a whole load.
	sctx, cancel := context.WithTimeout(ctx, snapTimeout*time.Duration(1+len(keys)/256))
	defer cancel()
	// NATS subtlety: any replica answers a direct get, from its own copy: a follower
	// catching up, or a leader cut off by a partition and back, would answer old. The
	// floor makes such an answer wait (or fail) instead of being folded on (issue 17).
	got, err := l.snaps.Last(sctx, l.stream.CachedInfo().Config.Name, l.anchor, subjects, l.floor())
	if errors.Is(err, leaderread.ErrNoDirect) {
		l.noDirect.Store(true) // an older attrd turned them off: read from the leader
		return nil, false, nil
	}
	if err != nil {
		if errors.Is(err, leaderread.ErrBehind) {
			err = fmt.Errorf("%w: %w", ErrStaleRead, err)
		}
		return nil, true, fmt.Errorf("read %d keys: %w", len(keys), err)
	}
	byKey := make(map[string]*jetstream.RawStreamMsg, len(got))
	prefix := len(events.KVSubject(l.bucket, ""))
	for subj, m := range got {
		byKey[subj[prefix:]] = m
	}
	return byKey, true, nil
}

// load fills the view with every key and prefix not yet in it. Keys are read in
// parallel; an entry already in the view is never overwritten (it may be unwritten).
func (l *loader) load(ctx context.Context, v *view, keys, prefixes []string) error {
	for _, p := range prefixes {
		if v.scanned[p] {
			continue
		}
		ks, err := l.scan(ctx, p)
		if err != nil {
			return err
		}
		keys = append(keys, ks...)
		v.scanned[p] = true
	}
	var missing []string
	seen := map[string]bool{}
	for _, k := range keys {
		if v.entries[k] == nil && !seen[k] {
			seen[k] = true
			missing = append(missing, k)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	got, err := l.readAll(ctx, missing)
	if err != nil {
		return err
	}
	v.locked(func() {
		for i, k := range missing {
			v.entries[k] = &entry{rev: got[i].rev}
			v.set(k, got[i].rec, loaded)
		}
	})
	return nil
}

// readAll returns the entries of keys, in their order: one snapshot request per few
// hundred keys, or, where the bucket serves no direct gets, a read per key (in
// parallel) as its leader has it.
func (l *loader) readAll(ctx context.Context, keys []string) ([]*entry, error) {
	got := make([]*entry, len(keys))
	msgs, ok, err := l.snapshot(ctx, keys)
	if err != nil {
		return nil, err
	}
	if ok {
		for i, k := range keys {
			if got[i], err = entryOf(k, msgs[k], nil); err != nil {
				return nil, err
			}
		}
		return got, nil
	}
	errs := make([]error, len(keys))
	sem := make(chan struct{}, max(l.parallel, 1))
	var wg sync.WaitGroup
	for i, k := range keys {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			got[i], errs[i] = l.readOther(ctx, k)
		}()
	}
	wg.Wait()
	return got, errors.Join(errs...)
}

// read returns a key of this partition as an entry (readAll of one key).
func (l *loader) read(ctx context.Context, key string) (*entry, error) {
	got, err := l.readAll(ctx, []string{key})
	if err != nil {
		return nil, err
	}
	return got[0], nil
}

// readOther returns a key as the bucket's leader has it, as an entry: for keys another
// partition writes (whose writes this run's floor does not cover), and buckets that
// serve no direct gets.
func (l *loader) readOther(ctx context.Context, key string) (*entry, error) {
	m, err := l.leaderLast(ctx, key)
	return entryOf(key, m, err)
}

// leaderLast reads a key's last message as the bucket's leader has it (lastOf): for a
// key whose compare-and-set the leader just refused, whose refusing message a copy
// holding only this run's floor may not hold yet.
func (l *loader) leaderLast(ctx context.Context, key string) (*jetstream.RawStreamMsg, error) {
	return lastOf(ctx, l.reads, l.stream, events.KVSubject(l.bucket, key))
}

// entryOf makes an entry of a key's last message (m nil or err ErrMsgNotFound: none).
// The loader reads raw stream messages, not kv.Get, because it needs the revision of
// delete and expiry markers too: they advance the key's last subject sequence, which
// the next compare-and-set must name.
func entryOf(key string, m *jetstream.RawStreamMsg, err error) (*entry, error) {
	if errors.Is(err, jetstream.ErrMsgNotFound) || err == nil && m == nil {
		return &entry{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", key, err)
	}
	if events.IsMarker(m.Header) {
		return &entry{rev: m.Sequence}, nil
	}
	rec, err := events.DecodeRecord(key, m.Data)
	if err != nil {
		return nil, err
	}
	return &entry{rev: m.Sequence, rec: rec}, nil
}

// leaderReads returns a leader reader on nc for the bucket's stream kvs, or nil for a
// bucket of one replica: one server answers it, no other can answer from an old copy,
// and its reads need none of the reader's listening (it cost the import 8%).
func leaderReads(nc *nats.Conn, kvs jetstream.Stream) (*leaderread.Reader, error) {
	if kvs.CachedInfo().Config.Replicas <= 1 {
		return nil, nil
	}
	return leaderread.New(nc)
}

// lastOf reads the last message on subject of stream st. With reads (a replicated
// stream), it is the leader's answer, and a second server answering from an old copy
// fails the read rather than be taken.
//
// NATS subtlety: a plain read ($JS.API.STREAM.MSG.GET) takes the first answer: a member
// of the stream's group that knows no leader answers 503 at once (a node healed from
// a cut, catching up), and a leader back from a cut answers from its old copy until it
// hears of the new one. A fold on such a copy would decide on an old state; its
// intent record would carry that state as the truth to recover from (issue 17).
func lastOf(ctx context.Context, reads *leaderread.Reader, st jetstream.Stream, subject string) (*jetstream.RawStreamMsg, error) {
	if reads == nil {
		return st.GetLastMsgForSubject(ctx, subject)
	}
	if _, ok := ctx.Deadline(); !ok {
		// Like the projector's other API requests: one sent during an election is
		// answered by nobody.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, apiTimeout)
		defer cancel()
	}
	return reads.Get(ctx, st.CachedInfo().Config.Name, leaderread.Request{LastBySubj: subject})
}

// scan lists the keys under an attribute prefix that hold a value: from a copy holding
// the floor, or, where the bucket serves no direct gets or the prefix has more keys than
// one answer holds, through a consumer of the bucket.
func (l *loader) scan(ctx context.Context, prefix string) ([]string, error) {
	msgs, ok, err := l.snapshot(ctx, []string{prefix + ">"})
	switch {
	case err == nil && ok:
		var keys []string
		for k, m := range msgs {
			if !events.IsMarker(m.Header) {
				keys = append(keys, k)
			}
		}
		slices.Sort(keys)
		return keys, nil
	case err != nil && !errors.Is(err, leaderread.ErrTooMany):
		return nil, err
	}
	lister, err := l.kv.ListKeysFiltered(ctx, prefix+">")
	if err != nil {
		return nil, fmt.Errorf("scan %s: %w", prefix, err)
	}
	var keys []string
	for k := range lister.Keys() {
		keys = append(keys, k)
	}
	return keys, nil
}
