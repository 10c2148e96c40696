package projector

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
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
// batch (before), which go into the intent record.
type view struct {
	untracked bool // an in-memory fold: no batches, nothing to record
	entries   map[string]*entry
	children  map[string]map[string]struct{} // attribute prefix -> keys with a record
	scanned   map[string]bool                // attribute prefixes loaded whole
	dirty     []string
	before    map[string][]byte // encoded pre-batch record of each dirty key; nil: absent
}

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
type Memory struct{ v *view }

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

// reset empties the cache (between batches only: it forgets nothing unwritten).
func (v *view) reset() {
	v.entries = map[string]*entry{}
	v.children = map[string]map[string]struct{}{}
	v.scanned = map[string]bool{}
	v.before = map[string][]byte{}
	v.dirty = nil
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

func (v *view) AttrKeys(prefix string) []string {
	keys := make([]string, 0, len(v.children[prefix]))
	for k := range v.children[prefix] {
		keys = append(keys, k)
	}
	return keys
}

func (v *view) Put(key string, rec any) { v.set(key, rec, true) }
func (v *view) Delete(key string)       { v.set(key, nil, true) }

// set changes a key; track marks it dirty (a fold's change) rather than loaded.
func (v *view) set(key string, rec any, track bool) {
	e := v.entries[key]
	if e == nil {
		e = &entry{}
		v.entries[key] = e
	}
	if track && !v.untracked {
		if _, seen := v.before[key]; !seen {
			v.dirty = append(v.dirty, key)
			v.before[key] = encodeBefore(e.rec)
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

// attrPrefixOf returns an attribute key's prefix: everything up to its last dot
// (encoded names contain no dots).
func attrPrefixOf(key string) (string, bool) {
	if !strings.HasPrefix(key, "a.") {
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
	bucket   string
	parallel int
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
	got := make([]*entry, len(missing))
	errs := make([]error, len(missing))
	sem := make(chan struct{}, max(l.parallel, 1))
	var wg sync.WaitGroup
	for i, k := range missing {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			got[i], errs[i] = l.read(ctx, k)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for i, k := range missing {
		v.entries[k] = &entry{rev: got[i].rev}
		v.set(k, got[i].rec, false)
	}
	return nil
}

// read returns a key's last message as an entry. It reads the raw stream message, not
// kv.Get, because it needs the revision of delete and expiry markers too: they advance
// the key's last subject sequence, which the next compare-and-set must name.
func (l *loader) read(ctx context.Context, key string) (*entry, error) {
	m, err := l.stream.GetLastMsgForSubject(ctx, events.KVSubject(l.bucket, key))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return &entry{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", key, err)
	}
	if isMarker(m.Header) {
		return &entry{rev: m.Sequence}, nil
	}
	rec, err := events.DecodeRecord(key, m.Data)
	if err != nil {
		return nil, err
	}
	return &entry{rev: m.Sequence, rec: rec}, nil
}

// isMarker reports whether a KV message is a delete, purge or server expiry marker.
func isMarker(h map[string][]string) bool {
	return len(h["KV-Operation"]) > 0 || len(h[jetstream.MarkerReasonHeader]) > 0
}

// scan lists the keys under an attribute prefix that hold a value.
func (l *loader) scan(ctx context.Context, prefix string) ([]string, error) {
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
