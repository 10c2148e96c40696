package api

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
)

// TestARepeatedRequestReadsItsEventAndDecisionFromCopiesWhileLeaderReadsAreRefused:
// while every server refuses leader reads (the meta group without a leader: 503, as
// nats-server answers), a repeated request's first event and the decision recorded on
// it are read from copies of the log, and come out as the leader reads them: each
// event's bytes, and each decision (rejected, accepted with no record, rejected with
// its record written after a later event, accepted after the last record). Without
// copies, the 503 is the answer.
func TestARepeatedRequestReadsItsEventAndDecisionFromCopiesWhileLeaderReadsAreRefused(t *testing.T) {
	_, nc, _ := embeddedStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	js, _ := jetstream.New(nc)
	evs, err := js.Stream(ctx, events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	layout := events.LayoutOf(evs.CachedInfo().Config)
	uid := events.NewID()
	attrs := layout.AttrSubject(uid)
	publish := func(subject string, data []byte) uint64 {
		t.Helper()
		ack, err := js.Publish(ctx, subject, data)
		if err != nil {
			t.Fatal(err)
		}
		return ack.Sequence
	}
	record := func(seq uint64, code events.Code) {
		t.Helper()
		data, err := events.Marshal(&events.Decision{Seq: seq, Code: code})
		if err != nil {
			t.Fatal(err)
		}
		publish(layout.DecisionSubject(uid), data)
	}
	e1 := publish(attrs, []byte("e1"))
	e2 := publish(attrs, []byte("e2"))
	record(e1, events.CodeAttrExists)
	e3 := publish(attrs, []byte("e3"))
	e4 := publish(attrs, []byte("e4"))
	record(e3, events.CodeNoAttr) // folded after e4 was appended
	e5 := publish(attrs, []byte("e5"))
	publish(attrs, []byte("after"))

	lr, err := leaderread.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	defer lr.Close()
	copies, err := leaderread.NewSnapshots(nc)
	if err != nil {
		t.Fatal(err)
	}
	defer copies.Close()
	lastSeq := func(ctx context.Context) (uint64, error) {
		info, err := evs.Info(ctx)
		if err != nil {
			return 0, err
		}
		return info.State.LastSeq, nil
	}
	unavailable := &jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}
	leader := &logReads{layout: layout, lastSeq: lastSeq,
		leader: func(ctx context.Context, req leaderread.Request) (*jetstream.RawStreamMsg, error) {
			return lr.Get(ctx, events.StreamName, req)
		}}
	refused := &logReads{layout: layout, lastSeq: lastSeq, copies: copies,
		leader: func(context.Context, leaderread.Request) (*jetstream.RawStreamMsg, error) { return nil, unavailable }}

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
