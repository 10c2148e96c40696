package events

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// DecodeMsgGet reads an answer to a message read ($JS.API.STREAM.MSG.GET):
// jetstream.ErrMsgNotFound when there is no such message, nats.ErrNoResponders for a
// no-responders status.
func DecodeMsgGet(m *nats.Msg) (*jetstream.RawStreamMsg, error) {
	if len(m.Data) == 0 && m.Header.Get("Status") == "503" {
		return nil, nats.ErrNoResponders
	}
	var resp struct {
		Error   *jetstream.APIError `json:"error"`
		Message *struct {
			Subject  string    `json:"subject"`
			Sequence uint64    `json:"seq"`
			Header   []byte    `json:"hdrs"`
			Data     []byte    `json:"data"`
			Time     time.Time `json:"time"`
		} `json:"message"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return nil, fmt.Errorf("unreadable answer to a message read: %w", err)
	}
	if resp.Error != nil {
		if resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound {
			return nil, jetstream.ErrMsgNotFound
		}
		return nil, resp.Error
	}
	if resp.Message == nil {
		return nil, jetstream.ErrInvalidJetStreamResponse
	}
	msg := &jetstream.RawStreamMsg{Subject: resp.Message.Subject, Sequence: resp.Message.Sequence,
		Data: resp.Message.Data, Time: resp.Message.Time}
	if len(resp.Message.Header) > 0 {
		h, err := nats.DecodeHeadersMsg(resp.Message.Header)
		if err != nil {
			return nil, err
		}
		msg.Header = h
	}
	return msg, nil
}

// IsMarker reports whether a KV message's headers make it a marker rather than a value:
// a delete or purge (KV-Operation), or the server's expiry or removal marker (a reason).
func IsMarker(h nats.Header) bool {
	return h.Get("KV-Operation") != "" || h.Get(jetstream.MarkerReasonHeader) != ""
}

// LeaderLast reads the last message on subject of stream with a message read
// ($JS.API.STREAM.MSG.GET), which the stream's leader answers, not a replica that is
// behind: what jetstream's GetLastMsgForSubject does for a stream without direct gets
// (the projection bucket has them: the projector's reads check each answer's copy,
// events/leaderread). It takes the first answer; for reads where a leader back from a
// network cut, answering a moment from its old copy, would matter, use leaderread.
// jetstream.ErrMsgNotFound when the subject has none.
func LeaderLast(ctx context.Context, nc *nats.Conn, stream, subject string) (*jetstream.RawStreamMsg, error) {
	body, err := json.Marshal(struct {
		LastBySubj string `json:"last_by_subj"`
	}{subject})
	if err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	m, err := nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+stream, body)
	if err != nil {
		return nil, err
	}
	return DecodeMsgGet(m)
}

// ErrTwoLeaders says two servers answered as a stream's leader, one of them from a
// copy that is behind: a leader cut off by a network partition, back before it heard
// of the new one. It is gone within seconds.
var ErrTwoLeaders = errors.New("two servers answer as the stream's leader, one from an old copy (a node back from a network cut)")

// OneLeader asks every server that answers as stream's leader for its message seq,
// which the caller knows is stored (it was acknowledged), and listens for linger: an
// answer without it, or with another message, is ErrTwoLeaders.
//
// NATS subtlety: a message read reaches every server, and each that believes it leads
// the stream answers it; a leader cut off by a partition believes so until it hears
// of the new leader, after the heal (nats-server steps a leader down only after 10 s
// without a quorum), and answers from its old copy. Only a listen for more than the
// first answer shows it; linger bounds that listen, so a slower second answer escapes.
func OneLeader(ctx context.Context, nc *nats.Conn, stream string, seq uint64, linger time.Duration) error {
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return err
	}
	defer sub.Unsubscribe()
	body, err := json.Marshal(struct {
		Seq uint64 `json:"seq"`
	}{seq})
	if err != nil {
		return err
	}
	if err := nc.PublishRequest("$JS.API.STREAM.MSG.GET."+stream, inbox, body); err != nil {
		return err
	}
	lctx, cancel := context.WithTimeout(ctx, linger)
	defer cancel()
	for {
		m, err := sub.NextMsgWithContext(lctx)
		if err != nil {
			return ctx.Err() // nil: listened for linger, and no answer was from behind
		}
		msg, err := DecodeMsgGet(m)
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
			return fmt.Errorf("%w: %s has no message %d", ErrTwoLeaders, stream, seq)
		case err == nil && msg.Sequence != seq:
			return fmt.Errorf("%w: %s answered message %d for %d", ErrTwoLeaders, stream, msg.Sequence, seq)
		}
	}
}
