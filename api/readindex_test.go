package api

import (
	"context"
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
)

// TestAReadIndexedIsNotAnsweredFromACopyBehindItsBarrier: a copy of the bucket that
// missed a write (here: an attribute's first value, served as a replica behind would
// serve it) answers the read's direct gets. The read, whose barrier was written after
// the second value was acknowledged, is refused (E008004) rather than answered with
// the first; once a current copy answers, it reads the second.
func TestAReadIndexedIsNotAnsweredFromACopyBehindItsBarrier(t *testing.T) {
	_, nc, kv := embeddedStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	js, _ := jetstream.New(nc)
	bucket := events.DefaultStoreConfig().Bucket
	stream := events.KVStream(bucket)
	uid := events.NewID()
	key := events.AttrKey(uid, "", "a")
	data := func(v string) []byte {
		d, err := events.Marshal(&events.AttrRecord{Value: []byte(v), Created: 1, Modified: 1, Seq: 1})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	if _, err := kv.Put(ctx, key, data(`"first"`)); err != nil {
		t.Fatal(err)
	}
	snaps, err := leaderread.NewSnapshots(nc)
	if err != nil {
		t.Fatal(err)
	}
	defer snaps.Close()
	old, err := snaps.Last(ctx, stream, "", []string{events.KVSubject(bucket, key)}, 0)
	if err != nil {
		t.Fatal(err)
	}
	ack, err := kv.Put(ctx, key, data(`"second"`))
	if err != nil {
		t.Fatal(err)
	}

	kvStream, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	s := &Service{leader: mustReader(t, nc), snaps: snaps, kvStream: kvStream, inbox: "test",
		heartbeatSubject: events.KVSubject(bucket, events.HeartbeatKey("test"))}
	s.cfg.Bucket = bucket
	s.barriers = leaderread.NewBarriers(s.sendBarrier(js, s.heartbeatSubject))
	s.quorum.Store(time.Now().Add(time.Hour).UnixNano()) // the heartbeat's age is not what this test is about

	// Only the copy behind answers direct gets.
	cfg := kvStream.CachedInfo().Config
	cfg.AllowDirect = false
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	behind, err := nc.Subscribe("$JS.API.DIRECT.GET."+stream, func(m *nats.Msg) {
		var req struct {
			MultiLast []string `json:"multi_last"`
		}
		if json.Unmarshal(m.Data, &req) != nil {
			return
		}
		for _, subj := range req.MultiLast {
			if msg := old[subj]; msg != nil {
				h := nats.Header{}
				h.Set(jetstream.SubjectHeader, msg.Subject)
				h.Set(jetstream.SequenceHeader, strconv.FormatUint(msg.Sequence, 10))
				_ = nc.PublishMsg(&nats.Msg{Subject: m.Reply, Header: h, Data: msg.Data})
			}
		}
		eob := nats.Header{}
		eob.Set("Status", "204")
		eob.Set(upToSequence, strconv.FormatUint(ack-1, 10))
		_ = nc.PublishMsg(&nats.Msg{Subject: m.Reply, Header: eob})
	})
	if err != nil {
		t.Fatal(err)
	}
	read := func() (string, error) {
		t.Helper()
		rctx, err := s.reading(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if readFloor(rctx) <= ack {
			t.Fatalf("the read's barrier is at %d, not past the write acknowledged at %d before it", readFloor(rctx), ack)
		}
		rec, err := s.read(rctx, key)
		if err != nil {
			return "", err
		}
		a, _ := rec.(*events.AttrRecord)
		if a == nil {
			return "", nil
		}
		return string(a.Value), nil
	}
	if v, err := read(); !isOutcomeUnknown(err) {
		t.Fatalf("a read answered by a copy behind its barrier gave %q, %v; want E008004", v, err)
	}

	// A copy that never answers (its server wedged) is no better: E008004, not an
	// internal error.
	_ = behind.Unsubscribe()
	silent, err := nc.Subscribe("$JS.API.DIRECT.GET."+stream, func(*nats.Msg) {})
	if err != nil {
		t.Fatal(err)
	}
	if v, err := read(); !isOutcomeUnknown(err) {
		t.Fatalf("a read nobody answered gave %q, %v; want E008004", v, err)
	}
	_ = silent.Unsubscribe()
	cfg.AllowDirect = true
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if v, err := read(); err != nil || v != `"second"` {
		t.Fatalf("a read from a current copy gave %q, %v; want the second value", v, err)
	}
	// A listing reads the keys' last messages the same way.
	rctx, err := s.reading(ctx)
	if err != nil {
		t.Fatal(err)
	}
	names, err := s.listNames(rctx, events.AttrPrefix(uid, ""))
	if err != nil || len(names) != 1 || names[0] != "a" {
		t.Fatalf("the listing read %v, %v; want [a]", names, err)
	}
}

// upToSequence names, on a multi-last answer's end, the last sequence of the copy.
const upToSequence = "Nats-UpTo-Sequence"
