package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// attrView is one attribute as a get answers it.
func attrView(keys *sealed.Keyring, uid, sid, name string, a *events.AttrRecord, decrypt bool) (map[string]any, error) {
	out := map[string]any{"found": true, "name": name, "creation_time": formatTime(a.Created),
		"last_modified": formatTime(a.Modified), "expiration_time": NeverExpires, "is_encrypted": a.Encrypted}
	if a.ExpiresAt != 0 {
		out["expiration_time"] = formatTime(a.ExpiresAt)
	}
	switch {
	case a.Unopened:
		out["value_unavailable"] = true // plain, but sealed in the log and no key to open it
	case !a.Encrypted:
		out["value"] = json.RawMessage(a.Value)
	case !decrypt:
		out["value"] = sealedText(a.Value)
	default:
		if keys == nil {
			return nil, errors.New("an encrypted value but no encryption key configured")
		}
		plain, err := keys.Open(a.Value, sealed.AAD(uid, sid, name))
		if err != nil {
			return nil, fmt.Errorf("open %q: %w", name, err)
		}
		out["value"] = json.RawMessage(plain)
	}
	return out, nil
}

func (s *Service) readAttrs(ctx context.Context, t *target, verb string, req *Request) (map[string]any, error) {
	names, many, err := req.names(s.cfg.Limits)
	if err != nil {
		return nil, err
	}
	recs, err := s.getAttrs(ctx, events.AttrPrefix(t.uid, t.sid), names, s.maxReply())
	if err != nil {
		return nil, err
	}
	decrypt := req.Decrypt == nil || *req.Decrypt
	answer := func(name string) (any, error) {
		a := recs[name]
		if verb == VerbExists {
			return a != nil, nil
		}
		if a == nil {
			return map[string]any{"found": false}, nil
		}
		return attrView(s.cfg.Keyring, t.uid, t.sid, name, a, decrypt)
	}
	if !many {
		v, err := answer(names[0])
		if err != nil {
			return nil, err
		}
		if verb == VerbExists {
			return map[string]any{"result": v}, nil
		}
		return v.(map[string]any), nil
	}
	result := make(map[string]any, len(names))
	for _, n := range names {
		if result[n], err = answer(n); err != nil {
			return nil, err
		}
	}
	return map[string]any{"result": result}, nil
}

// getAttrs reads the named attributes under prefix, keeping only the live ones. Once
// the values read pass maxBytes (0: no bound) it stops and refuses with E008002: the
// reply would be more than any transport carries.
func (s *Service) getAttrs(ctx context.Context, prefix string, names []string, maxBytes int) (map[string]*events.AttrRecord, error) {
	now := time.Now().UnixNano()
	out := make(map[string]*events.AttrRecord, len(names))
	if len(names) == 1 {
		// One name: read it here (often from this instance's own projector, at once),
		// without a goroutine.
		r, err := s.read(ctx, prefix+events.EncodeName(names[0]))
		if a, ok := r.(*events.AttrRecord); ok && a.Live(now) {
			if maxBytes > 0 && len(a.Value)+len(names[0])+200 > maxBytes {
				return nil, events.Errorf(events.CodeInvalidInput, "the reply would pass %d bytes: ask for fewer names", maxBytes)
			}
			out[names[0]] = a
		}
		return out, err
	}
	if floor := readFloor(ctx); floor > 0 {
		// Through the read index: every name in one request.
		keys := make([]string, len(names))
		for i, n := range names {
			keys[i] = prefix + events.EncodeName(n)
		}
		recs, ok, err := s.readIndexedKeys(ctx, keys, floor)
		if err != nil {
			return nil, err
		}
		if ok {
			size := 0
			for i, n := range names {
				if a, ok := recs[keys[i]].(*events.AttrRecord); ok && a.Live(now) {
					out[n] = a
					size += len(a.Value) + len(n) + 200
				}
			}
			if maxBytes > 0 && size > maxBytes {
				return nil, events.Errorf(events.CodeInvalidInput, "the reply would pass %d bytes: ask for fewer names", maxBytes)
			}
			return out, nil
		}
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	var size atomic.Int64
	errs := make([]error, len(names))
	sem := make(chan struct{}, 16)
	for i, n := range names {
		if maxBytes > 0 && size.Load() > int64(maxBytes) {
			break
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r, err := s.read(ctx, prefix+events.EncodeName(n))
			if a, ok := r.(*events.AttrRecord); ok && a.Live(now) {
				size.Add(int64(len(a.Value) + len(n) + 200))
				mu.Lock()
				out[n] = a
				mu.Unlock()
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	if maxBytes > 0 && size.Load() > int64(maxBytes) {
		return nil, events.Errorf(events.CodeInvalidInput, "the reply would pass %d bytes: ask for fewer names", maxBytes)
	}
	return out, errors.Join(errs...)
}

// listNames lists the live attribute names under prefix, unsorted. It reads the keys'
// last messages headers only (names and expiry, never the values) through a
// short-lived pull consumer, so its cost grows with the number of keys, which the
// per-owner caps bound, and not with their values.
func (s *Service) listNames(ctx context.Context, prefix string) ([]string, error) {
	now := time.Now().UnixNano()
	subject := events.KVSubject(s.cfg.Bucket, prefix)
	if floor := readFloor(ctx); floor > 0 {
		// A read on a replicated bucket: the keys' last messages from a copy holding
		// its barrier (readindex.go), when one answer holds them all.
		msgs, ok, err := s.scanIndexed(ctx, subject+">", floor)
		if err != nil {
			return nil, err
		}
		if ok {
			l := newNameList(prefix, subject, now)
			for subj, m := range msgs {
				if err := l.add(subj, m.Header); err != nil {
					return nil, err
				}
			}
			return s.withLegacy(ctx, prefix, l.names, l.legacy)
		}
	}
	cons, err := s.kvStream.CreateConsumer(ctx, jetstream.ConsumerConfig{
		FilterSubject: subject + ">", DeliverPolicy: jetstream.DeliverLastPerSubjectPolicy,
		AckPolicy: jetstream.AckNonePolicy, HeadersOnly: true, MemoryStorage: true,
		InactiveThreshold: 30 * time.Second, // gone soon even if the delete below is lost
	})
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", prefix, err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_ = s.kvStream.DeleteConsumer(dctx, cons.CachedInfo().Name)
	}()
	pending := cons.CachedInfo().NumPending
	l := newNameList(prefix, subject, now)
	for pending > 0 {
		batch, err := cons.Fetch(int(min(pending, 1000)), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return nil, err
		}
		got := 0
		for m := range batch.Messages() {
			got++
			md, err := m.Metadata()
			if err != nil {
				return nil, err
			}
			pending = md.NumPending
			if err := l.add(m.Subject(), m.Headers()); err != nil {
				return nil, err
			}
		}
		if err := batch.Error(); err != nil {
			return nil, err
		}
		if got == 0 {
			break
		}
	}
	return s.withLegacy(ctx, prefix, l.names, l.legacy)
}

// nameList collects a listing's live names from its keys' last messages (their
// subjects and headers: the values are not needed).
type nameList struct {
	prefix, subject string // the attribute prefix, and its subject
	now             int64
	names           []string
	legacy          []string // records written before their expiry was in a header
}

// newNameList starts a listing (its names an empty list, never nil: a listing of none
// answers []).
func newNameList(prefix, subject string, now int64) *nameList {
	return &nameList{prefix: prefix, subject: subject, now: now, names: []string{}}
}

// add takes one key's last message: a marker (deleted, or expired by the server) is
// no name, a record with its expiry in a header is one while it lives, and one without
// is left for withLegacy to read.
func (l *nameList) add(subj string, h nats.Header) error {
	if events.IsMarker(h) {
		return nil
	}
	name, err := events.AttrNameFromKey(l.prefix, strings.TrimPrefix(subj, l.subject[:len(l.subject)-len(l.prefix)]))
	if err != nil {
		return err
	}
	exp, known := events.RecordExpiry(h)
	switch {
	case !known:
		l.legacy = append(l.legacy, name)
	case exp == 0 || exp > l.now:
		l.names = append(l.names, name)
	}
	return nil
}

// withLegacy adds to names those of legacy (records written before their expiry was in
// a header) that are live.
func (s *Service) withLegacy(ctx context.Context, prefix string, names, legacy []string) ([]string, error) {
	if len(legacy) > 0 {
		recs, err := s.getAttrs(ctx, prefix, legacy, 0)
		if err != nil {
			return nil, err
		}
		for n := range recs {
			names = append(names, n)
		}
	}
	return names, nil
}

// names answers a names request: every live name, sorted byte-wise, or a page of them
// (limit and after, a name) with next when more follow. An unpaged listing whose reply
// would pass the reply limit is refused with E008002, and asks for paging.
func (s *Service) names(ctx context.Context, t *target, req *Request) (map[string]any, error) {
	if req.Limit != nil && *req.Limit < 1 {
		return nil, events.Errorf(events.CodeInvalidInput, "limit must be 1 or more")
	}
	all, err := s.listNames(ctx, events.AttrPrefix(t.uid, t.sid))
	if err != nil {
		return nil, err
	}
	sort.Strings(all)
	page := all
	if req.AfterName != "" {
		i, _ := slices.BinarySearch(page, req.AfterName)
		if i < len(page) && page[i] == req.AfterName {
			i++
		}
		page = page[i:]
	}
	more := false
	if req.Limit != nil && int64(len(page)) > *req.Limit {
		page, more = page[:*req.Limit], true
	}
	size := 0
	for _, n := range page {
		size += len(n) + 3
	}
	if max := s.maxReply(); size > max {
		return nil, events.Errorf(events.CodeInvalidInput, "%d names take %d bytes, over the reply limit of %d: page with limit and after", len(page), size, max)
	}
	out := map[string]any{"result": page}
	if more {
		out["next"] = page[len(page)-1]
	}
	return out, nil
}
