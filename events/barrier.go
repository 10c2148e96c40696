package events

import (
	"context"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Barrier returns a write of the heartbeat key subject (data in it): the read index's
// barrier (events/leaderread Barriers) and an instance's proof that it reaches a
// quorum. The write returns its acknowledged sequence.
func Barrier(js jetstream.JetStream, subject string, data []byte) func(ctx context.Context) (uint64, error) {
	return func(ctx context.Context) (uint64, error) {
		// Nats-TTL: the key of an instance that stopped goes away on its own.
		ack, err := js.PublishMsg(ctx, &nats.Msg{Subject: subject, Data: data}, jetstream.WithMsgTTL(HeartbeatTTL))
		if err != nil {
			return 0, err
		}
		return ack.Sequence, nil
	}
}
