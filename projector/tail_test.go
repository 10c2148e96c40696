package projector_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
	"github.com/attrd/attrd/projector"
)

// noMetaLeader is what a clustered server answers a consumer's creation while the meta
// group has no leader.
var noMetaLeader = &jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}

// TestARunThatCannotCreateItsConsumerFoldsTheLogByDirectGets: while no consumer can be
// created (the meta group without a leader), a run reads its partition's log with
// direct gets: the events stored before it started and those published while it runs,
// in order, each once, with the same decisions and records as a consumer's run; it
// creates no consumer; and a run after it, with consumers back, goes on from where it
// stopped.
func TestARunThatCannotCreateItsConsumerFoldsTheLogByDirectGets(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	evs := scenario(g)
	half := len(evs) / 2
	en.publish(t, evs[:half]...)
	var tries int
	var got []events.Decision
	hooks := projector.Hooks{CreateConsumer: func() error { tries++; return noMetaLeader }}
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket, Hooks: hooks,
		OnDecision: func(d events.Decision) { got = append(got, d) }})
	// Published while the run tails the log, one at a time: each rings the bell.
	var last uint64
	for _, ev := range evs[half:] {
		last = en.publish(t, ev)
	}
	waitApplied(t, p, last)
	st, err := en.js.Stream(context.Background(), events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(st.CachedInfo().Config.Subjects); n == 0 {
		t.Fatal("no event stream")
	}
	for c := range st.ListConsumers(context.Background()).Info() {
		t.Fatalf("the run created consumer %s", c.Name)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if tries == 0 {
		t.Fatal("the run never tried to create its consumer")
	}
	wantDecisions, wantRecords := reference(evs, 1)
	if len(got) != len(wantDecisions) {
		t.Fatalf("%d decisions, want %d (each event once)", len(got), len(wantDecisions))
	}
	for i := range got {
		if got[i].EventID != wantDecisions[i].EventID || got[i].Code != wantDecisions[i].Code {
			t.Fatalf("decision %d: %+v, want %+v", i, got[i], wantDecisions[i])
		}
	}
	sameRecords(t, bucketRecords(t, en.js, en.store.Bucket), wantRecords)

	// Consumers are back: the next run goes on from where the tail stopped.
	uid := evs[0].UserID
	more := g.attr(events.AttrCreated, uid, "", "after-the-tail")
	last = en.publish(t, more)
	var after []events.Decision
	p, stop = en.run(t, projector.Config{Bucket: en.store.Bucket,
		OnDecision: func(d events.Decision) { after = append(after, d) }})
	waitApplied(t, p, last)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if len(after) != 1 || after[0].EventID != more.ID || after[0].Code != "" {
		t.Fatalf("the run after the tail decided %+v, want only the new event, accepted", after)
	}
	if _, ok := bucketRecords(t, en.js, en.store.Bucket)[events.AttrKey(uid, "", "after-the-tail")]; !ok {
		t.Fatal("the attribute created after the tail is not in the bucket")
	}
}

// TestATailOnAStreamWithoutDirectGetsEndsTheRun: an event stream that serves no direct
// gets (an older attrd's, during a rolling upgrade) cannot be tailed: a run that cannot
// create its consumer then fails, and the next tries again, rather than fold nothing.
func TestATailOnAStreamWithoutDirectGetsEndsTheRun(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	en.publish(t, g.user("ann"))
	st, err := en.js.Stream(context.Background(), events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	cfg.AllowDirect = false
	if _, err := en.js.UpdateStream(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	hooks := projector.Hooks{CreateConsumer: func() error { return noMetaLeader }}
	_, done, _ := en.start(t, projector.Config{Bucket: en.store.Bucket, Hooks: hooks})
	select {
	case err := <-done:
		if !errors.Is(err, leaderread.ErrNoDirect) {
			t.Fatalf("the run ended with %v, want ErrNoDirect", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the run went on without a consumer or direct gets")
	}
}
