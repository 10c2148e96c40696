package projector

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"
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
		f, err := js.PublishMsgAsync(&nats.Msg{Subject: events.KVSubject(bucket, key), Data: data, Header: events.RecordHeaders(rec)}, opts...)
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

// Difference is one key on which a rebuilt projection and the live one disagree.
type Difference struct {
	Key    string
	Live   any // nil: missing from the live projection
	Replay any // nil: missing from the replay
}

// String says what differs, for a report.
func (d Difference) String() string {
	switch {
	case d.Live == nil:
		return fmt.Sprintf("%s: missing from the live projection; replay has %+v", d.Key, d.Replay)
	case d.Replay == nil:
		return fmt.Sprintf("%s: in the live projection only: %+v", d.Key, d.Live)
	}
	return fmt.Sprintf("%s: live %+v, replay %+v", d.Key, d.Live, d.Replay)
}

// Diff compares m with the live records of bucket, leaving out what expired by now
// (a replay may fold what the live projection has already let go) and the projector's
// own keys (intent records, decisions kept for retries).
func Diff(ctx context.Context, js jetstream.JetStream, bucket string, m *Memory) ([]Difference, error) {
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		return nil, err
	}
	w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, err
	}
	defer w.Stop()
	live := map[string]any{}
	for e := range w.Updates() {
		if e == nil {
			break
		}
		if !projected(e.Key()) {
			continue
		}
		rec, err := events.DecodeRecord(e.Key(), e.Value())
		if err != nil {
			return nil, err
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
	var diffs []Difference
	for key, r := range replay {
		if !alive(key, r, m.v.Session) {
			continue
		}
		l := live[key]
		if l == nil || !alive(key, l, liveSession) {
			diffs = append(diffs, Difference{Key: key, Replay: r})
			continue
		}
		if !sameRecord(l, r) {
			diffs = append(diffs, Difference{Key: key, Live: l, Replay: r})
		}
	}
	for key, l := range live {
		if _, ok := replay[key]; !ok && alive(key, l, liveSession) {
			diffs = append(diffs, Difference{Key: key, Live: l})
		}
	}
	sort.Slice(diffs, func(i, j int) bool { return diffs[i].Key < diffs[j].Key })
	return diffs, nil
}

// projected reports whether a key is part of the projection proper.
func projected(key string) bool {
	return !strings.HasPrefix(key, "p.") && !strings.HasPrefix(key, "d.") && !strings.HasPrefix(key, "r.")
}

func sameRecord(a, b any) bool {
	x, err1 := events.Marshal(a)
	y, err2 := events.Marshal(b)
	return err1 == nil && err2 == nil && bytes.Equal(x, y)
}
