package leaderread

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// metaLeaderless is nats-server 2.15's answer to a message read while the meta group
// has no leader (jsMsgGetRequest: NewJSClusterNotAvailError), from every server.
const metaLeaderless = `{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}`

// TestAReadEveryServerRefusesAsUnavailableIsAnsweredFromACopyHoldingABarrier: while
// the meta group has no leader, every server refuses message reads (503) though the
// stream takes writes and serves direct gets. A Reader with the stream's read index
// answers such a read from a copy holding a barrier written after the read began: the
// key's latest value (written just before), a key never written as not found, and,
// when the barrier cannot be written, the 503 it had. Without the read index it gives
// the 503.
func TestAReadEveryServerRefusesAsUnavailableIsAnsweredFromACopyHoldingABarrier(t *testing.T) {
	js, snaps := snapshotEnv(t, true)
	nc := js.Conn()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The servers' message reads, all refused as with no meta leader.
	if _, err := nc.Subscribe("refused.MSG.GET.S", func(m *nats.Msg) { _ = m.Respond([]byte(metaLeaderless)) }); err != nil {
		t.Fatal(err)
	}
	lr := mustLeaderReads(t, nc)
	lr.msgGet = "refused.MSG.GET."
	for _, v := range []string{"v1", "v2"} {
		if _, err := js.Publish(ctx, "s.k", []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := lr.Get(ctx, "S", Request{LastBySubj: "s.k"}); !RefusedUnavailable(err) {
		t.Fatalf("without a read index the read gave %v, want the servers' 503", err)
	}
	var barriers atomic.Int64
	failBarrier := atomic.Bool{}
	b := NewBarriers(func(ctx context.Context) (uint64, error) {
		if failBarrier.Load() {
			return 0, errors.New("no stream leader")
		}
		barriers.Add(1)
		ack, err := js.Publish(ctx, "s.barrier", nil)
		if err != nil {
			return 0, err
		}
		return ack.Sequence, nil
	})
	lr.ReadIndexWhenUnavailable("S", "s.barrier", b, snaps)
	m, err := lr.Get(ctx, "S", Request{LastBySubj: "s.k"})
	if err != nil {
		t.Fatalf("with a read index the read gave %v, want the key's last value", err)
	}
	if string(m.Data) != "v2" || m.Subject != "s.k" {
		t.Fatalf("read %s %q, want s.k \"v2\"", m.Subject, m.Data)
	}
	if barriers.Load() != 1 {
		t.Fatalf("%d barriers written for one read, want 1", barriers.Load())
	}
	if _, err := lr.Get(ctx, "S", Request{LastBySubj: "s.never"}); !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Fatalf("a key never written read %v, want ErrMsgNotFound", err)
	}
	// A read by sequence has no read index: the 503 stands.
	if _, err := lr.Get(ctx, "S", Request{Seq: 1}); !RefusedUnavailable(err) {
		t.Fatalf("a read by sequence gave %v, want the servers' 503", err)
	}
	failBarrier.Store(true)
	if _, err := lr.Get(ctx, "S", Request{LastBySubj: "s.k"}); !RefusedUnavailable(err) {
		t.Fatalf("with no barrier the read gave %v, want the servers' 503", err)
	}
}
