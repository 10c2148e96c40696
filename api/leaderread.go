package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// leaderReads sends the JetStream API requests that read a stream's message (a key's
// last value, an event by sequence) and takes the stream leader's answer.
//
// NATS subtlety: such a request ($JS.API.STREAM.MSG.GET) reaches every server of the
// cluster, and any member of the stream's Raft group that knows no leader answers it
// "503 JetStream system temporarily unavailable" at once, while only the leader
// answers with the message. A plain request takes the first answer. A node healed
// from a network cut is such a member for seconds (its group catches up with the
// leader, retrying), so every read through it failed although the leader, one route
// away, would have answered. Here a member's 503 only counts when no other answer
// comes within leaderGrace of it.
type leaderReads struct {
	nc      *nats.Conn
	answers *replies
}

// leaderGrace is how long a read waits for the leader's answer after a member said
// it knows no leader: a route's hop, with room.
const leaderGrace = 100 * time.Millisecond

// readTimeout bounds a read whose context has no deadline (jetstream's default).
const readTimeout = 5 * time.Second

func newLeaderReads(nc *nats.Conn) (*leaderReads, error) {
	answers, err := newReplies(nc, nil)
	if err != nil {
		return nil, err
	}
	return &leaderReads{nc: nc, answers: answers}, nil
}

func (lr *leaderReads) close() error { return lr.answers.close() }

// msgGet is the body of a message read: by sequence, the next on a subject from a
// sequence, or the last on a subject.
type msgGet struct {
	Seq        uint64 `json:"seq,omitempty"`
	NextBySubj string `json:"next_by_subj,omitempty"`
	LastBySubj string `json:"last_by_subj,omitempty"`
}

// get reads a message of stream as its leader has it; jetstream.ErrMsgNotFound when
// there is none.
func (lr *leaderReads) get(ctx context.Context, stream string, req msgGet) (*jetstream.RawStreamMsg, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, readTimeout)
		defer cancel()
	}
	ch, reply, forget := lr.answers.await(4) // the leader's, and members' 503s
	defer forget()
	if err := lr.nc.PublishRequest("$JS.API.STREAM.MSG.GET."+stream, reply, body); err != nil {
		return nil, err
	}
	var unavailable error
	var grace <-chan time.Time
	for {
		select {
		case m := <-ch:
			msg, err := decodeMsgGet(m)
			var apiErr *jetstream.APIError
			if errors.As(err, &apiErr) && apiErr.Code == 503 || errors.Is(err, nats.ErrNoResponders) {
				if unavailable == nil {
					unavailable, grace = err, time.After(leaderGrace)
				}
				continue
			}
			return msg, err
		case <-grace:
			return nil, unavailable
		case <-ctx.Done():
			if unavailable != nil {
				return nil, unavailable
			}
			return nil, ctx.Err()
		}
	}
}

// decodeMsgGet reads an answer to a message read.
func decodeMsgGet(m *nats.Msg) (*jetstream.RawStreamMsg, error) {
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

// lastValue reads a KV key's value as the bucket stream's leader has it: nil when
// the key has none (never written, deleted, purged or expired).
func (lr *leaderReads) lastValue(ctx context.Context, bucket, key string) ([]byte, error) {
	m, err := lr.get(ctx, events.KVStream(bucket), msgGet{LastBySubj: events.KVSubject(bucket, key)})
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	// A delete or purge leaves a marker with an operation header, an expiry or a
	// removal one with a reason (jetstream's kv.get reads them the same way).
	if m.Header.Get("KV-Operation") != "" || m.Header.Get(jetstream.MarkerReasonHeader) != "" {
		return nil, nil
	}
	return m.Data, nil
}
