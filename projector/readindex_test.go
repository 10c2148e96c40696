package projector_test

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
	"github.com/attrd/attrd/projector"
)

// TestARunReadsNoKeyFromACopyBehindWhatItSawStored: a copy of the bucket that is
// behind (here: every key as it stood before an attribute was deleted, served as a
// replica that missed the delete would serve it) answers the run's direct gets. The
// run stops (ErrStaleRead) rather than fold on it, and records nothing; the next run,
// reading a current copy, folds the set that came after the delete as a creation, as a
// replay does. Folded on the copy, the set kept the deleted attribute's creation time:
// the run recorded that state in its intent record, its key write then failed, and the
// next run recovered the batch from the recorded state (issue 17's divergence).
func TestARunReadsNoKeyFromACopyBehindWhatItSawStored(t *testing.T) {
	en := mustEnv(t)
	ctx := context.Background()
	g := newGen()
	alice := g.user("alice")
	uid := alice.UserID
	key := events.AttrKey(uid, "", "a")
	last := en.publish(t, alice, g.login(uid), g.attr(events.AttrSet, uid, "", "a"))
	cfg := projector.Config{Bucket: en.store.Bucket}
	p, stop := en.run(t, cfg)
	waitApplied(t, p, last)
	old := copyOf(t, en)
	last = en.publish(t, g.attr(events.AttrDeleted, uid, "", "a"))
	waitApplied(t, p, last)
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	// Only the copy behind answers direct gets now (the intent record it shows as it
	// is: the run gets past its fence, and reads the rest from the copy).
	directGets(t, en, false)
	stopCopy := serveCopy(t, en, old)
	set := g.attr(events.AttrSet, uid, "", "a")
	seq := en.publish(t, set)
	_, done, _ := en.start(t, cfg)
	runErr := within(t, done)
	recorded := checkpoint(t, en).Last >= seq

	stopCopy()
	directGets(t, en, true)
	p, stop = en.run(t, cfg)
	waitApplied(t, p, seq)
	defer stop()
	e, err := en.kv.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := events.DecodeRecord(key, e.Value())
	if err != nil {
		t.Fatal(err)
	}
	if a := rec.(*events.AttrRecord); a.Created != set.Time {
		t.Errorf("the set after the delete made an attribute created at %d, want the set's time %d", a.Created, set.Time)
	}
	if !errors.Is(runErr, projector.ErrStaleRead) {
		t.Errorf("the run on a copy behind ended with %v, want ErrStaleRead", runErr)
	}
	if recorded {
		t.Errorf("the run on a copy behind recorded a batch with the set at %d", seq)
	}
}

// behindCopy is a bucket's keys as they stood at a moment: their last messages by
// subject, and the stream's last sequence then.
type behindCopy struct {
	msgs map[string]*jetstream.RawStreamMsg
	upTo uint64
}

// copyOf reads every key of the bucket as it stands now.
func copyOf(t *testing.T, en *env) behindCopy {
	t.Helper()
	ctx := context.Background()
	snaps, err := leaderread.NewSnapshots(en.nc)
	if err != nil {
		t.Fatal(err)
	}
	defer snaps.Close()
	stream := events.KVStream(en.store.Bucket)
	msgs, err := snaps.Last(ctx, stream, "", []string{events.KVSubject(en.store.Bucket, ">")}, 0)
	if err != nil {
		t.Fatal(err)
	}
	st, err := en.js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	return behindCopy{msgs: msgs, upTo: st.CachedInfo().State.LastSeq}
}

// serveCopy answers the bucket's direct gets (multi-last) from c, as a replica that
// is behind would, but for the intent records, read as they are now.
func serveCopy(t *testing.T, en *env, c behindCopy) (stop func()) {
	t.Helper()
	stream := events.KVStream(en.store.Bucket)
	sub, err := en.nc.Subscribe("$JS.API.DIRECT.GET."+stream, func(m *nats.Msg) {
		var req struct {
			MultiLast []string `json:"multi_last"`
		}
		if json.Unmarshal(m.Data, &req) != nil {
			return
		}
		for _, subj := range req.MultiLast {
			msg := c.msgs[subj]
			if strings.HasPrefix(subj, events.KVSubject(en.store.Bucket, events.CheckpointKey(""))) {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				st, err := en.js.Stream(ctx, stream)
				if err == nil {
					msg, _ = st.GetLastMsgForSubject(ctx, subj)
				}
				cancel()
			}
			if msg == nil {
				continue
			}
			h := nats.Header{}
			for k, v := range msg.Header {
				h[k] = v
			}
			h.Set(jetstream.SubjectHeader, msg.Subject)
			h.Set(jetstream.SequenceHeader, strconv.FormatUint(msg.Sequence, 10))
			h.Set(jetstream.TimeStampHeaer, msg.Time.Format(time.RFC3339Nano))
			_ = en.nc.PublishMsg(&nats.Msg{Subject: m.Reply, Header: h, Data: msg.Data})
		}
		eob := nats.Header{}
		eob.Set("Status", "204")
		eob.Set("Description", "EOB")
		eob.Set("Nats-UpTo-Sequence", strconv.FormatUint(c.upTo, 10))
		_ = en.nc.PublishMsg(&nats.Msg{Subject: m.Reply, Header: eob})
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return func() { _ = sub.Unsubscribe() }
}

// checkpoint reads partition 0's intent record.
func checkpoint(t *testing.T, en *env) *events.Checkpoint {
	t.Helper()
	ctx := context.Background()
	st, err := en.js.Stream(ctx, events.KVStream(en.store.Bucket))
	if err != nil {
		t.Fatal(err)
	}
	m, err := st.GetLastMsgForSubject(ctx, events.KVSubject(en.store.Bucket, events.CheckpointKey("0")))
	if err != nil {
		t.Fatal(err)
	}
	var ck events.Checkpoint
	if err := events.Unmarshal(m.Data, &ck); err != nil {
		t.Fatal(err)
	}
	return &ck
}
