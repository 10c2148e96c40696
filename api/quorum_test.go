package api

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/deploy/embedded/embeddedtest"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
)

// TestReadsWaitAfterTheQuorumComesBack: after the heartbeats failed for longer than
// quorumBound (a network cut of this instance's node), the first acknowledged one
// does not let reads through at once: the old leader of a stream, on the node back
// from the cut, may answer them from its old copy until it hears of the new leader.
// Reads are answered again quorumSettle after it. A first heartbeat at start is no
// return: reads go at once.
func TestReadsWaitAfterTheQuorumComesBack(t *testing.T) {
	_, nc, _ := embeddedStore(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := &Service{leader: mustReader(t, nc), inbox: "test"}
	subject := events.KVSubject(events.DefaultStoreConfig().Bucket, "h.test")

	if err := s.heartbeat(ctx, js, subject); err != nil {
		t.Fatal(err)
	}
	if _, err := s.reading(ctx); err != nil {
		t.Fatalf("a read after the first heartbeat at start: %v", err)
	}

	// The heartbeats stop being acknowledged for longer than quorumBound...
	s.quorum.Store(time.Now().Add(-2 * quorumBound).UnixNano())
	if _, err := s.reading(ctx); !isOutcomeUnknown(err) {
		t.Fatalf("a read without a recent heartbeat: %v, want E008004", err)
	}
	// ...and come back.
	back := time.Now()
	if err := s.heartbeat(ctx, js, subject); err != nil {
		t.Fatal(err)
	}
	if _, err := s.reading(ctx); !isOutcomeUnknown(err) {
		t.Fatalf("a read right after the quorum came back: %v, want E008004", err)
	}
	for time.Since(back) < quorumSettle+time.Second {
		if err := s.heartbeat(ctx, js, subject); err != nil {
			t.Fatal(err)
		}
		if _, err := s.reading(ctx); err == nil {
			if took := time.Since(back); took < quorumSettle {
				t.Fatalf("reads answered %s after the quorum came back, want %s", took, quorumSettle)
			}
			return
		}
		time.Sleep(quorumEvery)
	}
	t.Fatalf("reads still refused %s after the quorum came back", time.Since(back))
}

func isOutcomeUnknown(err error) bool {
	var e *events.Error
	return errors.As(err, &e) && e.Code == events.CodeOutcomeUnknown
}

// TestAReadIsRefusedOnceTwoServersAnsweredItDifferently: a stream leader cut off by a
// partition and back answers a read from its old copy, first; the new leader answers
// too, with a later message. The read took the first answer, but the second shows two
// leaders, and reads are refused until twoLeadersHold has passed. One answer alone
// (or two that agree) refuses nothing.
func TestAReadIsRefusedOnceTwoServersAnsweredItDifferently(t *testing.T) {
	_, nc := embeddedtest.Start(t, embedded.Options{NoJetStream: true})
	respond := func(seq int, delay time.Duration) *nats.Subscription {
		sub, err := nc.Subscribe("$JS.API.STREAM.MSG.GET.S", func(m *nats.Msg) {
			time.Sleep(delay)
			_ = m.Respond(fmt.Appendf(nil, `{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"s.a","seq":%d,"data":"aGk=","time":"2026-12-05T00:00:00Z"}}`, seq))
		})
		if err != nil {
			t.Fatal(err)
		}
		return sub
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s := &Service{leader: mustReader(t, nc)}
	s.quorum.Store(time.Now().Add(time.Hour).UnixNano()) // the heartbeat is not what this test is about

	// One leader, and a second server that agrees: nothing refused.
	current := respond(9, 0)
	agreeing := respond(9, 5*time.Millisecond)
	if _, err := s.leader.Get(ctx, "S", leaderread.Request{LastBySubj: "s.a"}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(leaderread.TwoLeadersLinger + leaderread.TwoLeadersLinger/4)
	if _, err := s.reading(ctx); err != nil {
		t.Fatalf("refused after two answers that agree: %v", err)
	}
	_ = agreeing.Unsubscribe()

	// The old leader answers first, from its old copy (7); the current one, 9, after.
	_ = current.Unsubscribe()
	old := respond(7, 0)
	current = respond(9, 10*time.Millisecond)
	m, err := s.leader.Get(ctx, "S", leaderread.Request{LastBySubj: "s.a"})
	if err != nil || m.Sequence != 7 {
		t.Fatalf("got %v %v: the old leader's answer came first", m, err)
	}
	deadline := time.Now().Add(leaderread.TwoLeadersLinger * 3)
	for s.leader.TwoLeadersSince() > twoLeadersHold && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if _, err = s.reading(ctx); !isOutcomeUnknown(err) {
		t.Fatalf("a read after two different answers: %v, want E008004", err)
	}
	_ = old.Unsubscribe()
	_ = current.Unsubscribe()
}

func mustReader(t *testing.T, nc *nats.Conn) *leaderread.Reader {
	t.Helper()
	lr, err := leaderread.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lr.Close() })
	return lr
}
