package projector_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
	"github.com/attrd/attrd/projector"
)

// directGets turns the bucket stream's direct gets on or off.
func directGets(t *testing.T, en *env, on bool) {
	t.Helper()
	ctx := context.Background()
	st, err := en.js.Stream(ctx, events.KVStream(en.store.Bucket))
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	cfg.AllowDirect = on
	if _, err := en.js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
}

// msgGetSubject is where the bucket's stream answers message reads.
func msgGetSubject(en *env) string {
	return "$JS.API.STREAM.MSG.GET." + events.KVStream(en.store.Bucket)
}

// TestAProjectorStopsRatherThanFoldOnAKeyTwoLeadersAnswerDifferently: on a bucket that
// serves no direct gets (an older attrd turned them off), keys are read from the
// stream's leader; after a leader election of the bucket's stream, an old leader back
// from a network cut may answer key reads from its old copy. Here a second "leader" answers every read with a message
// the real one does not have: the projector's load sees two different answers, and
// the run stops (ErrTwoLeaders) rather than fold an event on either; nothing of it is
// written. (That the loads take the leader's answer over a member's 503, which the
// server in this process always beats, is TestAReadTakesTheLeadersAnswerOverAMembersUnavailable
// in events/leaderread.)
func TestAProjectorStopsRatherThanFoldOnAKeyTwoLeadersAnswerDifferently(t *testing.T) {
	en := mustEnv(t)
	directGets(t, en, false)
	reads, err := leaderread.New(en.nc)
	if err != nil {
		t.Fatal(err)
	}
	defer reads.Close()
	g := newGen()
	alice := g.user("alice")
	login := g.login(alice.UserID)
	last := en.publish(t, alice, login, g.attr(events.AttrSet, alice.UserID, "", "a"))
	p, done, _ := en.start(t, projector.Config{Bucket: en.store.Bucket, Reads: reads})
	waitApplied(t, p, last)

	subject := events.KVSubject(en.store.Bucket, events.AttrKey(alice.UserID, "", "b"))
	old, err := en.nc.Subscribe(msgGetSubject(en), func(m *nats.Msg) {
		_ = m.Respond(fmt.Appendf(nil, `{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":%q,"seq":1,"data":"aGk=","time":"2026-12-05T00:00:00Z"}}`, subject))
	})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Unsubscribe()
	stream := events.KVStream(en.store.Bucket)
	if err := en.nc.Publish("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED."+stream, []byte(`{"type":"io.nats.jetstream.advisory.v1.stream_leader_elected"}`)); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Second); !reads.Suspected(stream); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the election advisory was not seen")
		}
	}
	en.publish(t, g.attr(events.AttrSet, alice.UserID, "", "b")) // a key never read: loaded now
	if err := within(t, done); !errors.Is(err, events.ErrTwoLeaders) {
		t.Fatalf("the run ended with %v, want two leaders seen", err)
	}
	if _, err := en.kv.Get(context.Background(), events.AttrKey(alice.UserID, "", "b")); err == nil {
		t.Fatal("the event folded on a read two leaders answered differently was written")
	}
}

// TestARecoveryFoldsOnTheBucketWhereTheRecordedStateIsOlder: an intent record whose
// state before the batch was read from a server that was behind (here: an attribute as
// it was before a delete and a create the bucket holds) is not trusted by the recovery:
// KV has moved past the revision the state was read at, to a record of an event before
// the batch, so no write of the batch reached the key, and the batch is folded on KV's
// state. The set it recovers keeps the creation time of the attribute that lives, as a
// replay does; folded on the recorded state, it kept the older one (issue 17's
// divergence).
func TestARecoveryFoldsOnTheBucketWhereTheRecordedStateIsOlder(t *testing.T) {
	t.Run("with the revision recorded", func(t *testing.T) { recoverFromAnOlderState(t, true) })
	// An intent record of an attrd before KeyState.Rev (released format) is read as it
	// was: its states are the truth, as they always were.
	t.Run("without, as an older attrd wrote it", func(t *testing.T) { recoverFromAnOlderState(t, false) })
}

// recoverFromAnOlderState recovers a batch from an intent record whose state before it
// is older than the bucket's, with or without the revision it was read at.
func recoverFromAnOlderState(t *testing.T, withRev bool) {
	en := mustEnv(t)
	ctx := context.Background()
	g := newGen()
	alice := g.user("alice")
	login := g.login(alice.UserID)
	uid := alice.UserID
	key := events.AttrKey(uid, "", "a")
	last := en.publish(t, alice, login, g.attr(events.AttrSet, uid, "", "a"))
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket})
	waitApplied(t, p, last)
	first, err := en.kv.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	recreate := g.attr(events.AttrSet, uid, "", "a")
	last = en.publish(t, g.attr(events.AttrDeleted, uid, "", "a"), recreate)
	waitApplied(t, p, last)
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	// The batch to recover: one more set, and a record of it whose state before it is
	// the attribute as it was first created (a stale read), at its revision then.
	set := g.attr(events.AttrSet, uid, "", "a")
	seq := en.publish(t, set)
	old, err := events.DecodeRecord(key, first.Value())
	if err != nil {
		t.Fatal(err)
	}
	stale := *old.(*events.AttrRecord)
	stale.Value = nil
	data, err := events.Marshal(&stale)
	if err != nil {
		t.Fatal(err)
	}
	ck := &events.Checkpoint{First: seq, Last: seq,
		Decisions: []events.Decision{{Seq: seq, EventID: set.ID, UserID: uid, Fingerprint: set.Fingerprint}},
		Before:    []events.KeyState{{Key: key, Data: data}}}
	if withRev {
		ck.Before[0].Rev = first.Revision()
	}
	ckData, err := events.Marshal(ck)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := en.kv.Put(ctx, events.CheckpointKey("0"), ckData); err != nil {
		t.Fatal(err)
	}

	p, stop = en.run(t, projector.Config{Bucket: en.store.Bucket})
	waitApplied(t, p, seq)
	defer stop()
	e, err := en.kv.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	got, err := events.DecodeRecord(key, e.Value())
	if err != nil {
		t.Fatal(err)
	}
	a := got.(*events.AttrRecord)
	if !withRev {
		if a.Created != stale.Created {
			t.Fatalf("a record without revisions: the recovered set's attribute was created at %d, want the recorded state's %d", a.Created, stale.Created)
		}
		return
	}
	if a.Created != recreate.Time {
		t.Fatalf("the recovered set's attribute was created at %d, want %d, when it was created again (the recorded state's creation: %d)",
			a.Created, recreate.Time, stale.Created)
	}
	if a.Seq != seq {
		t.Fatalf("the attribute was written for the event at %d, want the recovered set's %d", a.Seq, seq)
	}
}

// TestARunWhoseConsumerDeliversNothingWhileTheLogGoesOnStops: a run's consumer on a
// node whose replica of the stream is stuck (back from a network cut, catching up)
// delivers nothing while its pull's heartbeats go on. Here the consumer is paused,
// which does the same: the run notices that the partition's log holds events it has
// not folded and stops (ErrConsumerStalled) within seconds, so that the next run
// consumes again.
func TestARunWhoseConsumerDeliversNothingWhileTheLogGoesOnStops(t *testing.T) {
	en := mustEnv(t)
	ctx := context.Background()
	g := newGen()
	alice := g.user("alice")
	last := en.publish(t, alice, g.login(alice.UserID))
	p, done, _ := en.start(t, projector.Config{Bucket: en.store.Bucket})
	waitApplied(t, p, last)
	st, err := en.js.Stream(ctx, events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	paused := 0
	for c := range st.ListConsumers(ctx).Info() {
		if _, err := en.js.PauseConsumer(ctx, events.StreamName, c.Name, time.Now().Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
		paused++
	}
	if paused == 0 {
		t.Fatal("the run has no consumer")
	}
	began := time.Now()
	en.publish(t, g.attr(events.AttrSet, alice.UserID, "", "a"))
	select {
	case err := <-done:
		if !errors.Is(err, projector.ErrConsumerStalled) {
			t.Fatalf("the run ended with %v, want ErrConsumerStalled", err)
		}
		t.Logf("stopped %s after the event", time.Since(began).Round(100*time.Millisecond))
	case <-time.After(15 * time.Second):
		t.Fatal("the run went on with a consumer that delivers nothing")
	}
}

// TestAnIntentRecordStoredButAnsweredAsAConflictIsTakenAsStored: right after a heal, a
// stream leader back from the cut answers an intent record's write "wrong last
// sequence" from its old copy before the real leader's acknowledgement; the record is
// stored. The run reads it back from the leader, finds it stored, and goes on instead
// of stopping.
func TestAnIntentRecordStoredButAnsweredAsAConflictIsTakenAsStored(t *testing.T) {
	en := mustEnv(t)
	var answered atomic.Bool
	cfg := projector.Config{Bucket: en.store.Bucket, Hooks: projector.Hooks{
		IntentAnswer: func(ack *jetstream.PubAck, err error) (*jetstream.PubAck, error) {
			if err == nil && answered.CompareAndSwap(false, true) {
				return nil, &jetstream.APIError{Code: 400, ErrorCode: jetstream.JSErrCodeStreamWrongLastSequence, Description: "wrong last sequence: 1"}
			}
			return ack, err
		}}}
	g := newGen()
	alice := g.user("alice")
	last := en.publish(t, alice, g.login(alice.UserID), g.attr(events.AttrSet, alice.UserID, "", "a"))
	p, done, _ := en.start(t, cfg)
	for deadline := time.Now().Add(10 * time.Second); p.Applied() < last; time.Sleep(10 * time.Millisecond) {
		select {
		case err := <-done:
			t.Fatalf("the run stopped: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("applied %d of %d", p.Applied(), last)
		}
	}
	if !answered.Load() {
		t.Fatal("no intent record was answered as a conflict")
	}
	if _, err := en.kv.Get(context.Background(), events.AttrKey(alice.UserID, "", "a")); err != nil {
		t.Fatalf("the attribute is not in the projection: %v", err)
	}
}
