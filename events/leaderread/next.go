package leaderread

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"

	"github.com/nats-io/nats.go/jetstream"
)

// Next reads up to batch messages of stream on subject (wildcards allowed) from
// sequence from on, in order, with one direct get, from whichever copy answers:
// a copy behind answers fewer (its log is a prefix of the stream's), never other ones.
// more says the answering copy holds further matching messages past those returned.
// It fails with ErrNoDirect when the stream does not allow direct gets, and with
// ctx's error when nobody answered before ctx ended.
//
// NATS subtlety: a replica stores a message only once its group committed it, so any
// copy's messages are the stream's, in the stream's order; what a copy may lack is
// the latest ones.
func (s *Snapshots) Next(ctx context.Context, stream, subject string, from uint64, batch int) (msgs []*jetstream.RawStreamMsg, more bool, err error) {
	body, err := json.Marshal(struct {
		Seq        uint64 `json:"seq"`
		NextBySubj string `json:"next_by_subj"`
		Batch      int    `json:"batch"`
		MaxBytes   int    `json:"max_bytes"`
	}{max(from, 1), subject, batch, int(s.nc.MaxPayload())})
	if err != nil {
		return nil, false, err
	}
	for {
		msgs, end, err := s.request(ctx, stream, body, batch+1)
		switch {
		case err == nil:
			np, _ := strconv.ParseUint(end.Get("Nats-Num-Pending"), 10, 64) // end nil: none
			return msgs, np > 0, nil
		case !errors.Is(err, errAgain):
			return nil, false, err
		case ctx.Err() != nil:
			return nil, false, ctx.Err()
		}
	}
}
