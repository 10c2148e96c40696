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

// logFixture is an event stream on an embedded server, a user of it, and a
// logReads whose leader reads every server refuses (503) and that reads copies.
type logFixture struct {
	ctx    context.Context
	nc     *nats.Conn
	js     jetstream.JetStream
	evs    jetstream.Stream
	layout events.Layout
	uid    string
	attrs  string // the user's attribute events' subject
	// refused reads as while the meta group has no leader.
	refused *logReads
}

func newLogFixture(t *testing.T) *logFixture {
	t.Helper()
	_, nc, _ := embeddedStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	js, _ := jetstream.New(nc)
	evs, err := js.Stream(ctx, events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	copies, err := leaderread.NewSnapshots(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = copies.Close() })
	f := &logFixture{ctx: ctx, nc: nc, js: js, evs: evs, layout: events.LayoutOf(evs.CachedInfo().Config), uid: events.NewID()}
	f.attrs = f.layout.AttrSubject(f.uid)
	f.refused = &logReads{layout: f.layout, copies: copies, lastSeq: f.lastSeq,
		leader: func(context.Context, leaderread.Request) (*jetstream.RawStreamMsg, error) {
			return nil, &jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}
		}}
	return f
}

// lastSeq is the event stream's last sequence.
func (f *logFixture) lastSeq(ctx context.Context) (uint64, error) {
	info, err := f.evs.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.State.LastSeq, nil
}

// publish appends data on subject and returns its sequence.
func (f *logFixture) publish(t *testing.T, subject string, data []byte) uint64 {
	t.Helper()
	ack, err := f.js.Publish(f.ctx, subject, data)
	if err != nil {
		t.Fatal(err)
	}
	return ack.Sequence
}

// record appends the projector's record of a decision on the user's event at seq.
func (f *logFixture) record(t *testing.T, seq uint64, code events.Code) {
	t.Helper()
	data, err := events.Marshal(&events.Decision{Seq: seq, Code: code})
	if err != nil {
		t.Fatal(err)
	}
	f.publish(t, f.layout.DecisionSubject(f.uid), data)
}

// TestARepeatedRequestReadsItsEventAndDecisionFromCopiesWhileLeaderReadsAreRefused:
// while every server refuses leader reads (the meta group without a leader: 503, as
// nats-server answers), a repeated request's first event and the decision recorded on
// it are read from copies of the log, and come out as the leader reads them: each
// event's bytes, and each decision (rejected, accepted with no record, rejected with
// its record written after a later event, accepted after the last record). Without
// copies, the 503 is the answer.
func TestARepeatedRequestReadsItsEventAndDecisionFromCopiesWhileLeaderReadsAreRefused(t *testing.T) {
	f := newLogFixture(t)
	ctx, uid, attrs, refused := f.ctx, f.uid, f.attrs, f.refused
	e1 := f.publish(t, attrs, []byte("e1"))
	e2 := f.publish(t, attrs, []byte("e2"))
	f.record(t, e1, events.CodeAttrExists)
	e3 := f.publish(t, attrs, []byte("e3"))
	e4 := f.publish(t, attrs, []byte("e4"))
	f.record(t, e3, events.CodeNoAttr) // folded after e4 was appended
	e5 := f.publish(t, attrs, []byte("e5"))
	f.publish(t, attrs, []byte("after"))

	lr, err := leaderread.New(f.nc)
	if err != nil {
		t.Fatal(err)
	}
	defer lr.Close()
	leader := &logReads{layout: f.layout, lastSeq: f.lastSeq,
		leader: func(ctx context.Context, req leaderread.Request) (*jetstream.RawStreamMsg, error) {
			return lr.Get(ctx, events.StreamName, req)
		}}

	want := map[uint64]events.Code{e1: events.CodeAttrExists, e2: "", e3: events.CodeNoAttr, e4: "", e5: ""}
	for seq, code := range want {
		lm, err := leader.eventAt(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		cm, err := refused.eventAt(ctx, seq)
		if err != nil {
			t.Fatalf("event %d from copies: %v", seq, err)
		}
		if string(cm.Data) != string(lm.Data) || cm.Subject != lm.Subject {
			t.Fatalf("event %d: from copies %q on %s, from the leader %q on %s", seq, cm.Data, cm.Subject, lm.Data, lm.Subject)
		}
		fromLeader, err := leader.rejection(ctx, uid, seq, attrs)
		if err != nil {
			t.Fatal(err)
		}
		fromCopies, err := refused.rejection(ctx, uid, seq, attrs)
		if err != nil {
			t.Fatalf("decision on %d from copies: %v", seq, err)
		}
		if fromLeader != code || fromCopies != code {
			t.Fatalf("decision on %d: %q from the leader, %q from copies, want %q", seq, fromLeader, fromCopies, code)
		}
	}
	refused.copies = nil
	if _, err := refused.eventAt(ctx, e1); !leaderread.RefusedUnavailable(err) {
		t.Fatalf("without copies: %v, want the leader's 503", err)
	}
	if _, err := refused.rejection(ctx, uid, e1, attrs); !leaderread.RefusedUnavailable(err) {
		t.Fatalf("without copies: %v, want the leader's 503", err)
	}
}

// TestARepeatedRequestsDecisionIsNotReadFromACopyBehindTheStreamsLeader: the only
// copy answering direct gets is behind (it holds the event, not the decision the
// projector recorded on it after): the decision read from copies is refused rather
// than read as "accepted"; from a current copy it is the recorded rejection.
func TestARepeatedRequestsDecisionIsNotReadFromACopyBehindTheStreamsLeader(t *testing.T) {
	f := newLogFixture(t)
	ctx, nc, js, uid, attrs, refused := f.ctx, f.nc, f.js, f.uid, f.attrs, f.refused
	e1 := f.publish(t, attrs, []byte("e1"))
	f.record(t, e1, events.CodeAttrExists)

	// Only the copy behind answers direct gets: it holds the event, not the record.
	cfg := f.evs.CachedInfo().Config
	cfg.AllowDirect = false
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	behind, err := nc.Subscribe("$JS.API.DIRECT.GET."+events.StreamName, func(m *nats.Msg) {
		var req struct {
			MultiLast []string `json:"multi_last"`
		}
		if json.Unmarshal(m.Data, &req) != nil || len(req.MultiLast) == 0 {
			// A next-by-subject read of the decisions: none in this copy.
			_ = nc.PublishMsg(&nats.Msg{Subject: m.Reply, Header: nats.Header{"Status": []string{"404"}}})
			return
		}
		for _, subj := range req.MultiLast {
			if subj == attrs {
				h := nats.Header{}
				h.Set(jetstream.SubjectHeader, attrs)
				h.Set(jetstream.SequenceHeader, strconv.FormatUint(e1, 10))
				_ = nc.PublishMsg(&nats.Msg{Subject: m.Reply, Header: h, Data: []byte("e1")})
			}
		}
		eob := nats.Header{}
		eob.Set("Status", "204")
		eob.Set(upToSequence, strconv.FormatUint(e1, 10))
		_ = nc.PublishMsg(&nats.Msg{Subject: m.Reply, Header: eob})
	})
	if err != nil {
		t.Fatal(err)
	}
	if code, err := refused.rejection(ctx, uid, e1, attrs); err == nil {
		t.Fatalf("the decision read from a copy behind: %q, want a refusal", code)
	}

	_ = behind.Unsubscribe()
	cfg.AllowDirect = true
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if code, err := refused.rejection(ctx, uid, e1, attrs); err != nil || code != events.CodeAttrExists {
		t.Fatalf("the decision read from a current copy: %q, %v; want %s", code, err, events.CodeAttrExists)
	}
}
