package projector

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// recs returns m's records by key.
func (m *Memory) recs() map[string]any {
	out := make(map[string]any, len(m.v.entries))
	for k, e := range m.v.entries {
		if e.rec != nil {
			out[k] = e.rec
		}
	}
	return out
}

// Write stores every live record of m into bucket, which must be empty, with the
// projector's TTLs, and an intent record saying that the log up to last is folded in:
// a projector started on the bucket goes on from last+1. progress, if not nil, is
// called with the records written so far.
func Write(ctx context.Context, js jetstream.JetStream, bucket string, m *Memory, last uint64, progress func(done, total int)) error {
	st, err := js.Stream(ctx, events.KVStream(bucket))
	if err != nil {
		return fmt.Errorf("bucket %s: %w", bucket, err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return err
	}
	if info.State.Msgs != 0 {
		return fmt.Errorf("bucket %s is not empty (%d messages): rebuild into a fresh one", bucket, info.State.Msgs)
	}
	recs := m.recs()
	for k, r := range recs {
		if isUnopened(r) {
			return fmt.Errorf("%s: %w", k, ErrNeedsKey)
		}
	}
	now := time.Now().UnixNano()
	futs := make([]jetstream.PubAckFuture, 0, 4096)
	flush := func() error {
		err := events.AwaitAcks(ctx, futs)
		futs = futs[:0]
		return err
	}
	done := 0
	for key, rec := range recs {
		ttl, live := TTL(key, rec, m.v.Session, now)
		if !live {
			continue
		}
		data, err := events.Marshal(rec)
		if err != nil {
			return err
		}
		opts := []jetstream.PublishOpt{jetstream.WithExpectLastSequencePerSubject(0)}
		if ttl > 0 {
			opts = append(opts, jetstream.WithMsgTTL(ttl))
		}
		// The same raw publish as the projector's: Nats-TTL on a KV subject.
		f, err := js.PublishMsgAsync(&nats.Msg{Subject: events.KVSubject(bucket, key), Data: data, Header: events.RecordHeaders(rec, ttl > 0)}, opts...)
		if err != nil {
			return err
		}
		futs = append(futs, f)
		done++
		if len(futs) == cap(futs) {
			if err := flush(); err != nil {
				return err
			}
			if progress != nil {
				progress(done, len(recs))
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	if m.since > 0 {
		// The rebuilt bucket reads the same log, with the same recorded decisions.
		rec, _ := events.Marshal(&events.RecordingRecord{Since: m.since})
		if _, err := js.PublishMsg(ctx, &nats.Msg{Subject: events.KVSubject(bucket, events.RecordingKey("0")), Data: rec}); err != nil {
			return err
		}
	}
	ck, _ := events.Marshal(&events.Checkpoint{First: last + 1, Last: last})
	if _, err := js.PublishMsg(ctx, &nats.Msg{Subject: events.KVSubject(bucket, events.CheckpointKey("0")), Data: ck}); err != nil {
		return err
	}
	if progress != nil {
		progress(done, len(recs))
	}
	return nil
}

// ErrNeedsKey refuses a rebuild without the key file of a log whose plain values an
// update sealed (it kept the attribute's setting): only the key turns them back into
// the plain values the projection holds.
var ErrNeedsKey = errors.New("a plain value is sealed in the log and only the key file opens it: give --encryption-key-file")

// Difference is one key on which a rebuilt projection and the live one disagree.
type Difference struct {
	Key    string
	Live   any // nil: missing from the live projection (or unreadable, see LiveErr)
	Replay any // nil: missing from the replay
	// LiveErr says why the live record could not be read (it is a difference too).
	LiveErr string
}

// String says what differs, one line of JSON per side: values plain when they are,
// sealed ones by their size, password hashes never.
func (d Difference) String() string {
	switch {
	case d.LiveErr != "":
		return fmt.Sprintf("%s: the live record is unreadable (%s); replay has %s", d.Key, d.LiveErr, recordJSON(d.Replay))
	case d.Live == nil:
		return fmt.Sprintf("%s: missing from the live projection; replay has %s", d.Key, recordJSON(d.Replay))
	case d.Replay == nil:
		return fmt.Sprintf("%s: in the live projection only: %s", d.Key, recordJSON(d.Live))
	}
	return fmt.Sprintf("%s:\n  live   %s\n  replay %s", d.Key, recordJSON(d.Live), recordJSON(d.Replay))
}

// recordJSON shows a record as JSON for a report.
func recordJSON(rec any) string {
	ts := func(ns int64) any {
		if ns == 0 {
			return nil
		}
		return time.Unix(0, ns).UTC().Format(time.RFC3339Nano)
	}
	var v any = rec
	switch r := rec.(type) {
	case *events.AttrRecord:
		m := map[string]any{"encrypted": r.Encrypted, "created": ts(r.Created), "modified": ts(r.Modified), "expires": ts(r.ExpiresAt), "seq": r.Seq}
		switch {
		case r.Unopened:
			m["value"] = "(sealed in the log; no key to open it)"
		case r.Encrypted || !json.Valid(r.Value):
			m["value"] = fmt.Sprintf("(%d sealed bytes)", len(r.Value))
		default:
			m["value"] = json.RawMessage(r.Value)
		}
		v = m
	case *events.UserRecord:
		c := *r
		c.PasswordHash = "(hash)"
		v = c
	case *events.SessionRecord:
		v = map[string]any{"user_id": r.UserID, "created": ts(r.Created), "expires": ts(r.ExpiresAt), "app": r.App, "seq": r.Seq}
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprintf("%+v", rec)
	}
	return string(b)
}

// Diff compares m with the live records of bucket, leaving out what expired by now
// (a replay may fold what the live projection has already let go) and the projector's
// own keys (intent records, decisions kept for retries). Every difference is listed,
// an unreadable live record included. unopened counts the plain values that could not
// be compared without the key (the rest of their records was).
func Diff(ctx context.Context, js jetstream.JetStream, bucket string, m *Memory) (diffs []Difference, unopened int, err error) {
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		return nil, 0, err
	}
	kvs, err := js.Stream(ctx, events.KVStream(bucket))
	if err != nil {
		return nil, 0, err
	}
	w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, 0, err
	}
	defer w.Stop()
	live := map[string]any{}
	unreadable := map[string]string{}
	for e := range w.Updates() {
		if e == nil {
			break
		}
		if !events.IsProjectionKey(e.Key()) {
			continue
		}
		rec, err := events.DecodeRecord(e.Key(), e.Value())
		if err != nil {
			unreadable[e.Key()] = err.Error()
			continue
		}
		live[e.Key()] = rec
	}
	now := time.Now().UnixNano()
	liveSession := func(sid string) *events.SessionRecord {
		r, _ := live[events.SessionKey(sid)].(*events.SessionRecord)
		return r
	}
	alive := func(key string, rec any, session func(string) *events.SessionRecord) bool {
		_, ok := TTL(key, rec, session, now)
		return ok && rec != nil
	}
	replay := m.recs()
	for key, r := range replay {
		if !alive(key, r, m.v.Session) {
			continue
		}
		if msg, bad := unreadable[key]; bad {
			diffs = append(diffs, Difference{Key: key, Replay: r, LiveErr: msg})
			continue
		}
		l := live[key]
		if l == nil || !alive(key, l, liveSession) {
			diffs = append(diffs, Difference{Key: key, Replay: r})
			continue
		}
		if isUnopened(r) {
			unopened++
		}
		if !sameRecord(l, r) {
			diffs = append(diffs, Difference{Key: key, Live: l, Replay: r})
		}
	}
	for key, l := range live {
		if _, ok := replay[key]; !ok && alive(key, l, liveSession) {
			if n, ok := l.(*events.UsernameRecord); ok {
				if u, _ := replay[events.UserKey(n.UserID)].(*events.UserRecord); u != nil && u.Unopened {
					unopened++
					continue // the replay cannot read whose username this is
				}
			}
			diffs = append(diffs, Difference{Key: key, Live: l})
		}
	}
	for key, msg := range unreadable {
		if _, ok := replay[key]; !ok {
			diffs = append(diffs, Difference{Key: key, LiveErr: msg})
		}
	}
	// The watch may be served by a replica that is behind (after a partition healed, a
	// node catching up): a difference stands only if the key as the stream's leader has
	// it differs too.
	kept := diffs[:0]
	for _, d := range diffs {
		last, err := events.LeaderLast(ctx, js.Conn(), kvs.CachedInfo().Config.Name, events.KVSubject(bucket, d.Key))
		var l any
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
		case err != nil:
			return nil, 0, err
		case events.IsMarker(last.Header):
		default:
			if l, err = events.DecodeRecord(d.Key, last.Data); err != nil {
				kept = append(kept, Difference{Key: d.Key, Replay: d.Replay, LiveErr: err.Error()})
				continue
			}
		}
		r := replay[d.Key]
		rAlive := r != nil && alive(d.Key, r, m.v.Session)
		lAlive := l != nil && alive(d.Key, l, liveSession)
		if rAlive == lAlive && (!rAlive || sameRecord(l, r)) {
			continue // the leader agrees with the replay
		}
		if !lAlive {
			l = nil
		}
		kept = append(kept, Difference{Key: d.Key, Live: l, Replay: d.Replay})
	}
	diffs = kept
	sort.Slice(diffs, func(i, j int) bool { return diffs[i].Key < diffs[j].Key })
	return diffs, unopened, nil
}

// isUnopened reports whether a replay's record holds something sealed in the log
// that the replay could not open (no key file, or a deleted user's data).
func isUnopened(rec any) bool {
	switch r := rec.(type) {
	case *events.AttrRecord:
		return r.Unopened
	case *events.UserRecord:
		return r.Unopened
	case *events.SessionRecord:
		return r.Unopened
	}
	return false
}

func sameRecord(a, b any) bool {
	// Without a key the replay knows all of a record but what is sealed in the log:
	// compare the rest.
	switch r := b.(type) {
	case *events.AttrRecord:
		if l, ok := a.(*events.AttrRecord); ok && r.Unopened {
			lc, rc := *l, *r
			lc.Value, rc.Value, rc.Unopened = nil, nil, false
			a, b = &lc, &rc
		}
	case *events.UserRecord:
		if l, ok := a.(*events.UserRecord); ok && r.Unopened {
			lc, rc := *l, *r
			lc.Username, lc.PasswordHash, rc.Username, rc.PasswordHash, rc.Unopened = "", "", "", "", false
			a, b = &lc, &rc
		}
	case *events.SessionRecord:
		if l, ok := a.(*events.SessionRecord); ok && r.Unopened {
			lc, rc := *l, *r
			lc.RemoteAddr, lc.UserAgent, rc.RemoteAddr, rc.UserAgent, rc.Unopened = "", "", "", "", false
			a, b = &lc, &rc
		}
	}
	x, err1 := events.Marshal(a)
	y, err2 := events.Marshal(b)
	return err1 == nil && err2 == nil && bytes.Equal(x, y)
}
