package events

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/deploy/embedded/embeddedtest"
)

// TestOneLeaderSeesAServerAnsweringFromAnOldCopy: the message a projector just wrote
// is read back from every server that answers as the stream's leader. The leader has
// it; a leader back from a network cut answers "no message" (or another one), and
// that is ErrTwoLeaders. The leader alone, or a member's 503 beside it, is no error.
func TestOneLeaderSeesAServerAnsweringFromAnOldCopy(t *testing.T) {
	// A server without JetStream: the test's responders play the stream's servers.
	_, nc := embeddedtest.Start(t, embedded.Options{NoJetStream: true})
	answer := func(body string, delay time.Duration) *nats.Subscription {
		sub, err := nc.Subscribe("$JS.API.STREAM.MSG.GET.S", func(m *nats.Msg) {
			time.Sleep(delay)
			_ = m.Respond([]byte(body))
		})
		if err != nil {
			t.Fatal(err)
		}
		return sub
	}
	const (
		has      = `{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"s.a","seq":42,"data":"","time":"2026-12-05T00:00:00Z"}}`
		another  = `{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"s.a","seq":41,"data":"","time":"2026-12-05T00:00:00Z"}}`
		hasNot   = `{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","error":{"code":404,"err_code":10037,"description":"no message found"}}`
		noLeader = `{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}`
	)
	ctx := context.Background()
	leader := answer(has, 0)
	if err := OneLeader(ctx, nc, "S", 42, 100*time.Millisecond); err != nil {
		t.Fatalf("the leader alone: %v", err)
	}
	member := answer(noLeader, 0)
	if err := OneLeader(ctx, nc, "S", 42, 100*time.Millisecond); err != nil {
		t.Fatalf("the leader and a member without a leader: %v", err)
	}
	_ = member.Unsubscribe()
	for _, old := range []string{hasNot, another} {
		stale := answer(old, 20*time.Millisecond) // after the leader's answer
		err := OneLeader(ctx, nc, "S", 42, 100*time.Millisecond)
		if !errors.Is(err, ErrTwoLeaders) {
			t.Fatalf("a second server answering %s: %v, want ErrTwoLeaders", old, err)
		}
		t.Log(err)
		_ = stale.Unsubscribe()
	}
	_ = leader.Unsubscribe()
}
