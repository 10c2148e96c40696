package api

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
)

// logReads reads what a repeated request needs of the event stream: its first event,
// by sequence, and the decision the projector recorded on it. Both are read from the
// stream's leader; while the meta group has no leader every clustered server refuses
// such reads (503, nats-server's jsMsgGetRequest checks isLeaderless first), though
// the stream has a leader and takes writes, and a client retrying a write after an
// outage then got E008004 until the meta group had elected (4–9 s) while new writes
// went through (issue 21). They are then read from copies instead, with direct gets,
// which no meta group answers:
//
//   - The first event is known to be in the log (the stream's dedupe named its
//     sequence), and a copy that holds a sequence holds what the leader holds there (a
//     replica stores a message only once its group committed it): any copy that has
//     it answers.
//   - The decisions are read from a copy that holds every message the leader had once
//     the partition's lease said the event folded (its last sequence, read from the
//     stream's leader), where "no decision" can be told apart from "behind".
type logReads struct {
	// leader reads a message of the event stream as its leader has it.
	leader func(ctx context.Context, req leaderread.Request) (*jetstream.RawStreamMsg, error)
	// copies reads from copies (nil: none, on a bucket of one replica).
	copies *leaderread.Snapshots
	// lastSeq returns the event stream's last sequence, as its leader has it.
	lastSeq func(ctx context.Context) (uint64, error)
	layout  events.Layout
}

// copyBehindPause is how long a read waits before it asks the copies again, when the
// one that answered was behind.
const copyBehindPause = 20 * time.Millisecond

// waitBehind waits copyBehindPause before the copies are asked again, or returns
// ctx's error.
func waitBehind(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(copyBehindPause):
		return nil
	}
}

// copyReadFor bounds a reading from copies: one that does not come within it leaves
// the request to the client's retry (E008004), as the leader's refusal did.
const copyReadFor = 2 * time.Second

// eventAt returns the event stream's message at seq, which is known to be there.
func (r *logReads) eventAt(ctx context.Context, seq uint64) (*jetstream.RawStreamMsg, error) {
	m, err := r.leader(ctx, leaderread.Request{Seq: seq})
	if err == nil || r.copies == nil || !leaderread.RefusedUnavailable(err) {
		return m, err
	}
	ctx, cancel := context.WithTimeout(ctx, copyReadFor)
	defer cancel()
	for {
		msgs, _, cerr := r.copies.Next(ctx, events.StreamName, events.EventsPrefix+".>", seq, 1)
		switch {
		case cerr != nil:
			return nil, fmt.Errorf("%w (and from a copy: %v)", err, cerr)
		case len(msgs) > 0 && msgs[0].Sequence == seq:
			return msgs[0], nil
		case len(msgs) > 0:
			// A copy holding a later message holds every earlier one: seq was removed.
			return nil, jetstream.ErrMsgNotFound
		}
		// The copy that answered is behind seq: another, or the same later, will not be.
		if werr := waitBehind(ctx); werr != nil {
			return nil, fmt.Errorf("%w (and no copy holding it answered: %v)", err, werr)
		}
	}
}

// rejection finds the projector's recorded decision on the event at seq of user uid,
// on subject anchor (the event's own): its code, or "" (accepted) when there is none.
// The projector records rejections on the user's decision subject in the order it
// folds, before it reports the event folded, so the record of seq, if any, is the
// first one at or after seq whose event is not earlier than seq (records of earlier
// events may come after seq: their batch was folded after seq was appended). Called
// once the partition's lease says seq is folded.
func (r *logReads) rejection(ctx context.Context, uid string, seq uint64, anchor string) (events.Code, error) {
	subject := r.layout.DecisionSubject(uid)
	for from := seq; ; {
		m, err := r.leader(ctx, leaderread.Request{Seq: from, NextBySubj: subject})
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return "", nil
		}
		if err != nil {
			if r.copies != nil && leaderread.RefusedUnavailable(err) {
				code, cerr := r.rejectionFromCopies(ctx, subject, seq, anchor)
				if cerr == nil {
					return code, nil
				}
				err = fmt.Errorf("%w (and from copies: %v)", err, cerr)
			}
			return "", fmt.Errorf("read the decisions of user %s: %w", uid, err)
		}
		if code, ok := decisionOn(m, seq); ok {
			return code, nil
		}
		from = m.Sequence + 1
	}
}

// rejectionFromCopies is rejection's reading from copies of the stream: the last
// record on subject from a copy that holds the stream's last sequence as its leader
// has it now (past every record of an event already folded), then, when that record
// is of a later event, the records from seq on, from any copy, until one of an event
// at or after seq (which exists: a copy without it is behind, and asked again).
func (r *logReads) rejectionFromCopies(ctx context.Context, subject string, seq uint64, anchor string) (events.Code, error) {
	ctx, cancel := context.WithTimeout(ctx, copyReadFor)
	defer cancel()
	floor, err := r.lastSeq(ctx)
	if err != nil {
		return "", fmt.Errorf("the stream's last sequence: %w", err)
	}
	last, err := r.copies.Last(ctx, events.StreamName, anchor, []string{subject}, floor)
	if err != nil {
		return "", err
	}
	m := last[subject]
	if m == nil {
		return "", nil
	}
	if d, ok := decisionIn(m); ok && d.Seq <= seq {
		// The last record is of an event at or before seq: records follow the fold's
		// order, so seq has this one or none.
		if d.Seq == seq {
			return d.Code, nil
		}
		return "", nil
	}
	for from := seq; ; {
		msgs, _, err := r.copies.Next(ctx, events.StreamName, subject, from, 64)
		if err != nil {
			return "", err
		}
		for _, m := range msgs {
			if code, ok := decisionOn(m, seq); ok {
				return code, nil
			}
			from = m.Sequence + 1
		}
		if len(msgs) == 0 {
			// Behind the record read above: ask again.
			if err := waitBehind(ctx); err != nil {
				return "", fmt.Errorf("no copy holding the decisions answered: %w", err)
			}
		}
	}
}

// decisionIn reads a recorded decision; ok is false for a record it cannot read
// (skipped, as the replay skips it).
func decisionIn(m *jetstream.RawStreamMsg) (events.Decision, bool) {
	var d events.Decision
	return d, events.Unmarshal(m.Data, &d) == nil
}

// decisionOn says what record m, read at or after seq on a decision subject, decides
// about the event at seq: ok when it is of an event at or after seq, and then the code
// it records for seq ("" when it is of a later event: seq has no record).
func decisionOn(m *jetstream.RawStreamMsg, seq uint64) (code events.Code, ok bool) {
	d, read := decisionIn(m)
	if !read || d.Seq < seq {
		return "", false
	}
	if d.Seq == seq {
		return d.Code, true
	}
	return "", true
}
