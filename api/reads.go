package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
	"github.com/nats-io/nats.go/jetstream"
)

// attrView is one attribute as a get answers it.
func attrView(keys *sealed.Keyring, uid, sid, name string, a *events.AttrRecord, decrypt bool) (map[string]any, error) {
	out := map[string]any{"found": true, "name": name, "creation_time": formatTime(a.Created),
		"last_modified": formatTime(a.Modified), "expiration_time": NeverExpires, "is_encrypted": a.Encrypted}
	if a.ExpiresAt != 0 {
		out["expiration_time"] = formatTime(a.ExpiresAt)
	}
	switch {
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
	recs, err := s.getAttrs(ctx, t, names)
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

// getAttrs reads the named attributes, keeping only the live ones.
func (s *Service) getAttrs(ctx context.Context, t *target, names []string) (map[string]*events.AttrRecord, error) {
	now := time.Now().UnixNano()
	out := make(map[string]*events.AttrRecord, len(names))
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make([]error, len(names))
	sem := make(chan struct{}, 16)
	for i, n := range names {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r, err := s.read(ctx, events.AttrKey(t.uid, t.sid, n))
			if a, ok := r.(*events.AttrRecord); ok && a.Live(now) {
				mu.Lock()
				out[n] = a
				mu.Unlock()
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	return out, errors.Join(errs...)
}

// names lists the live attribute names of the target, sorted byte-wise.
func (s *Service) names(ctx context.Context, t *target) ([]string, error) {
	prefix := events.AttrPrefix(t.uid, t.sid)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := s.kv.WatchFiltered(wctx, []string{prefix + ">"}, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, err
	}
	defer w.Stop()
	now := time.Now().UnixNano()
	names := []string{}
	seen := map[string]bool{} // a key may be listed twice while it is being written
	for e := range w.Updates() {
		if e == nil {
			break
		}
		var a events.AttrRecord
		if err := events.Unmarshal(e.Value(), &a); err != nil || !a.Live(now) {
			continue
		}
		n, err := events.AttrNameFromKey(prefix, e.Key())
		if err != nil {
			return nil, err
		}
		if !seen[n] {
			seen[n] = true
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names, nil
}
