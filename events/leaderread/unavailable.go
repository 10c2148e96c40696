package leaderread

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// indexed is how the reads of one stream are answered when every server refuses them
// as unavailable: by the read index, a barrier write and a snapshot from a copy that
// holds it.
type indexed struct {
	barriers *Barriers
	snaps    *Snapshots
	anchor   string
}

// ReadIndexWhenUnavailable makes this Reader's last-by-subject reads of stream that
// come back "unavailable" (503) read from a copy that holds a barrier sent by b
// instead; anchor is the subject b writes. A read whose barrier fails (the stream's
// group has no leader) or that no copy holding it answers keeps its 503.
//
// NATS subtlety: a clustered server refuses every message read ($JS.API.STREAM.MSG.GET)
// with 503 while the meta group has no leader (nats-server's jsMsgGetRequest checks
// isLeaderless before it looks at the stream), though the stream's own group has a
// leader and takes writes: a cut of the node leading the meta group would otherwise
// stop every read for its election (4–9 s). A direct get and a write to the stream do
// not ask the meta group.
func (lr *Reader) ReadIndexWhenUnavailable(stream, anchor string, b *Barriers, snaps *Snapshots) {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	if lr.indexed == nil {
		lr.indexed = map[string]*indexed{}
	}
	lr.indexed[stream] = &indexed{barriers: b, snaps: snaps, anchor: anchor}
}

// indexedFor returns stream's read index, nil if it has none.
func (lr *Reader) indexedFor(stream string) *indexed {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	return lr.indexed[stream]
}

// RefusedUnavailable reports whether err is a server's "unavailable" answer (503), or
// nobody's: what every server answers a leader read while the meta group has no leader.
func RefusedUnavailable(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.Code == 503 || errors.Is(err, nats.ErrNoResponders)
}

// last reads subject's last message of stream from a copy holding a barrier sent now;
// refused is the leader read's answer, returned (with why) if this read fails too.
func (ix *indexed) last(ctx context.Context, stream, subject string, refused error) (*jetstream.RawStreamMsg, error) {
	floor, err := ix.barriers.Wait(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w (and no barrier: %v)", refused, err)
	}
	msgs, err := ix.snaps.Last(ctx, stream, ix.anchor, []string{subject}, floor)
	if err != nil {
		return nil, fmt.Errorf("%w (and no copy holding the barrier answered: %v)", refused, err)
	}
	m := msgs[subject]
	if m == nil {
		return nil, jetstream.ErrMsgNotFound
	}
	return m, nil
}
