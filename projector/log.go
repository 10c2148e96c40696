package projector

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// Log folds the event log in memory: for audits (a user's history, a point-in-time
// read) and for rebuilding and verifying the projection. It never writes.
type Log struct {
	js     jetstream.JetStream
	opener Opener
	bucket string
	// dataKeys open what is personal in events (version 3); nil: it stays sealed.
	dataKeys *events.DataKeys
}

// WithDataKeys makes the log open what is personal in events with the users' data
// keys; a deleted user's stays sealed (erased).
func (l *Log) WithDataKeys(dk *events.DataKeys) *Log {
	l.dataKeys = dk
	return l
}

// NewLog returns a reader of the event log; opener opens sealed Inherit values (nil:
// NoKey, the values stay sealed and every decision and state is as with the key).
func NewLog(js jetstream.JetStream, opener Opener) *Log {
	if opener == nil {
		opener = NoKey // decide as with the key; values it would open stay sealed
	}
	return &Log{js: js, opener: opener, bucket: events.DefaultBucket}
}

// Layout returns the event stream's partitioning.
func (l *Log) Layout(ctx context.Context) (events.Layout, error) {
	st, err := l.js.Stream(ctx, events.StreamName)
	if err != nil {
		return events.Layout{}, fmt.Errorf("event stream: %w", err)
	}
	return events.LayoutOf(st.CachedInfo().Config), nil
}

// read calls fn with every message on the filters (all: none) in log order, up to the
// log's end when the read began; fn returns false to stop. whole asks for the log from
// its first event: a log cut by retention is then ErrTruncated (a start past events
// that erasures removed, erased, is not a cut).
func (l *Log) read(ctx context.Context, filters []string, whole bool, fn func(seq uint64, subject string, data []byte) bool, erased ...map[uint64]bool) error {
	st, err := l.js.Stream(ctx, events.StreamName)
	if err != nil {
		return fmt.Errorf("event stream: %w", err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return err
	}
	if whole && info.State.FirstSeq > 1 {
		for seq := uint64(1); seq < info.State.FirstSeq; seq++ {
			if len(erased) == 0 || !erased[0][seq] {
				return fmt.Errorf("%w (it starts at sequence %d)", ErrTruncated, info.State.FirstSeq)
			}
		}
	}
	// Read up to the last message on the filters as the stream's leader has it, and no
	// shorter: the ordered consumer may be served by a replica that is behind, whose
	// "nothing pending" would end the read early (a history or a replay without the
	// latest events).
	end := info.State.LastSeq
	if len(filters) > 0 {
		end = 0
		for _, f := range filters {
			m, err := st.GetLastMsgForSubject(ctx, f)
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			end = max(end, m.Sequence)
		}
	}
	if info.State.Msgs == 0 || end == 0 {
		return nil // nothing at all, or nothing on the filters
	}
	// An ordered consumer: ephemeral, flow-controlled, recreated on a gap; the cheapest
	// way to read a stream from its start.
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: filters})
	if err != nil {
		return err
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(4096))
	if err != nil {
		return err
	}
	defer it.Stop()
	for {
		m, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			return fmt.Errorf("read the log: %w", err)
		}
		md, err := m.Metadata()
		if err != nil {
			return err
		}
		if !fn(md.Sequence.Stream, m.Subject(), m.Data()) || md.Sequence.Stream >= end {
			return nil
		}
	}
}

// fold decodes and folds one message into st, as the projector would; forced, if not
// nil, is the decision the projector recorded for it.
func (l *Log) fold(ctx context.Context, st State, lay events.Layout, seq uint64, subject string, data []byte, forced *events.Code) (events.Entry, error) {
	ev, err := l.decode(ctx, data)
	if err != nil && !errors.Is(err, errUnreadable) {
		return events.Entry{}, err
	}
	return l.foldEvent(st, lay, seq, subject, ev, forced), nil
}

// errUnreadable marks an event that cannot be decoded or opened: it is rejected.
var errUnreadable = errors.New("unreadable event")

// decode decodes a message of the log and opens what is personal in it, with the data
// keys there are; an event that cannot be read is errUnreadable (ev nil), and any other
// error is the data keys' (try again).
func (l *Log) decode(ctx context.Context, data []byte) (*events.Event, error) {
	ev, err := events.Decode(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errUnreadable, err)
	}
	switch {
	case l.dataKeys != nil:
		if err := l.dataKeys.Open(ctx, ev); err != nil {
			return nil, err // a data key that cannot be read, or unwrapped
		}
	case ev.PII != nil || ev.APII != nil:
		ev.Erased = true // no key file: what is personal stays sealed
	}
	return ev, nil
}

// foldEvent folds a decoded event (nil: unreadable, rejected) into st.
func (l *Log) foldEvent(st State, lay events.Layout, seq uint64, subject string, ev *events.Event, forced *events.Code) events.Entry {
	e := events.Entry{Seq: seq, Subject: subject}
	if ev == nil || lay.Subject(ev) != subject {
		e.Decision = events.Decision{Seq: seq, Code: events.CodeInvalidInput}
		return e
	}
	e.Event = ev
	e.Decision = Fold(st, seq, ev, l.opener, forced)
	return e
}

// keepDecision adds a recorded decision (a message on a decision subject) to into,
// keeping the first for each event's sequence (a recording retried may write one
// twice); with below set, only one of an event before that sequence.
func keepDecision(into map[uint64]events.Code, data []byte, below uint64) {
	var d events.Decision
	if events.Unmarshal(data, &d) != nil || below != 0 && d.Seq >= below {
		return
	}
	if _, seen := into[d.Seq]; !seen {
		into[d.Seq] = d.Code
	}
}

// ErrTruncated is returned by FoldAll when the log no longer starts at its first event:
// retention (--history-max-age, --history-max-bytes) removed the oldest, and a fold
// would miss their effects.
var ErrTruncated = errors.New("the log no longer holds its oldest events (history retention): it cannot rebuild the projection")

// FoldAll folds the whole log into m, in order, calling fn (if not nil) with every
// entry; it is what a rebuild and a verification start from. Decisions are made again
// (that is the point of a replay); the ones the projector recorded go to
// m.Recorded, for a verification to compare.
func (l *Log) FoldAll(ctx context.Context, m *Memory, fn func(events.Entry)) error {
	st := m.State()
	lay, err := l.Layout(ctx)
	if err != nil {
		return err
	}
	// Every partition of a deployment records decisions from the same sequence: 1 for
	// a partitioned one (they all start with it), the first projector's start for one
	// made before decisions were recorded (one partition).
	rec, err := l.recording(ctx, events.PartitionName(0))
	if err != nil {
		return err
	}
	m.since = rec.Since
	m.Recorded = map[uint64]events.Code{}
	er := &erasures{log: l, since: rec.Since, unnamed: map[string]bool{}}
	if err := er.readRemoved(ctx); err != nil {
		return err
	}
	var foldErr error
	err = l.read(ctx, nil, true, func(seq uint64, subject string, data []byte) bool {
		if events.IsErasedSubject(subject) {
			return true
		}
		if events.IsDecisionSubject(subject) {
			keepDecision(m.Recorded, data, 0)
			return true
		}
		e, err := er.fold(ctx, st, lay, seq, subject, data)
		if err != nil {
			foldErr = err
			return false
		}
		if fn != nil {
			fn(e)
		}
		return true
	}, er.removedSeqs)
	return errors.Join(err, foldErr)
}

// recording reads from which sequence a partition's projector records decisions
// (Since 0: it records none, an older attrd folded everything).
func (l *Log) recording(ctx context.Context, partition string) (events.RecordingRecord, error) {
	var r events.RecordingRecord
	m, err := events.LeaderLast(ctx, l.js.Conn(), events.KVStream(l.bucket), events.KVSubject(l.bucket, events.RecordingKey(partition)))
	if errors.Is(err, jetstream.ErrMsgNotFound) || err == nil && events.IsMarker(m.Header) {
		return r, nil
	}
	if err != nil {
		return r, fmt.Errorf("projection bucket %s: %w", l.bucket, err)
	}
	return r, events.Unmarshal(m.Data, &r)
}

// Last returns the log's last sequence and its number of events.
func (l *Log) Last(ctx context.Context) (last, count uint64, err error) {
	st, err := l.js.Stream(ctx, events.StreamName)
	if err != nil {
		return 0, 0, err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return 0, 0, err
	}
	return info.State.LastSeq, info.State.Msgs, nil
}

// FoldUser folds one user's history in log order and calls fn with each of the user's
// events (under events.UserSubjects), its decision, and the user's projection right
// after it, until fn returns false. With at (hasAt), it stops after the last of the
// user's events, in log order, whose time is at or before at: the state it returns is
// then the user's projection as of that point of the log. It returns the state
// reached.
//
// The decision shown is the one the projector made: from the sequence the projector
// started recording on (RecordingRecord), a rejected event has its decision recorded
// on the user's decision subject and every other event was accepted, and the fold
// applies each event as decided. Events before that sequence are decided again: they
// depend on the user's own earlier events and, when someone else acted (a
// super-user), on that actor's user record and session, so the actors' lifecycle
// events are folded too. (For those older events, an actor made valid by a chain of
// other users' events may be found invalid.)
func (l *Log) FoldUser(ctx context.Context, uid string, at int64, hasAt bool, fn func(events.Entry, events.View) bool) (events.View, error) {
	m := NewMemory()
	lay, err := l.Layout(ctx)
	if err != nil {
		return nil, err
	}
	rec, err := l.recording(ctx, events.PartitionName(lay.Partition(uid)))
	if err != nil {
		return nil, err
	}
	own := lay.UserSubjects(uid)
	actors := map[string]bool{}
	recorded := map[uint64]events.Code{}
	var stop uint64 // with at: the last own event at or before it
	var erased []events.ErasedEvent
	err = l.read(ctx, []string{own}, false, func(seq uint64, subject string, data []byte) bool {
		if events.IsDecisionSubject(subject) {
			keepDecision(recorded, data, 0)
			return true
		}
		if events.IsErasedSubject(subject) {
			var r events.ErasureRecord
			if events.Unmarshal(data, &r) == nil {
				for _, e := range r.Events {
					erased = append(erased, e)
					if (!hasAt || e.Time <= at) && e.Seq > stop {
						stop = e.Seq
					}
				}
			}
			return true
		}
		ev, err := events.Decode(data)
		if err != nil {
			return true
		}
		if !hasAt || ev.Time <= at {
			stop = seq
		}
		if (rec.Since == 0 || seq < rec.Since) && ev.Actor != "" && ev.Actor != uid {
			actors[lay.UserSubject(ev.Actor)] = true
			actors[lay.SessionSubject(ev.Actor, ev.ActorSession)] = true
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	if hasAt && stop == 0 {
		return m.State(), nil // nothing of the user's at or before at
	}
	filters := []string{own}
	for f := range actors {
		filters = append(filters, f)
	}
	prefix := strings.TrimSuffix(own, ">")
	st := m.State()
	accepted := events.Code("")
	var foldErr error
	// The user's events removed by a deletion (events.ErasureRecord) are shown at their
	// place, as what stays of them: their metadata. They change no state.
	slices.SortFunc(erased, func(a, b events.ErasedEvent) int { return cmp.Compare(a.Seq, b.Seq) })
	halted := false
	showErased := func(before uint64) {
		for len(erased) > 0 && erased[0].Seq < before && !halted {
			e := erased[0]
			erased = erased[1:]
			if hasAt && e.Seq > stop || fn == nil {
				continue
			}
			d := events.Decision{Seq: e.Seq, EventID: e.ID, UserID: uid}
			if c, ok := recorded[e.Seq]; ok {
				d.Code = c
			}
			halted = !fn(events.Entry{Seq: e.Seq, Subject: prefix + "erased", Event: e.Event(uid), Decision: d}, st)
		}
	}
	err = l.read(ctx, filters, false, func(seq uint64, subject string, data []byte) bool {
		if hasAt && seq > stop {
			return false
		}
		if !events.IsEventSubject(subject) {
			return true
		}
		if showErased(seq); halted {
			return false
		}
		var forced *events.Code
		if rec.Since != 0 && seq >= rec.Since {
			forced = &accepted
			if c, ok := recorded[seq]; ok {
				forced = &c
			}
		}
		e, err := l.fold(ctx, st, lay, seq, subject, data, forced)
		if err != nil {
			foldErr = err
			return false
		}
		if strings.HasPrefix(subject, prefix) && fn != nil {
			return fn(e, st)
		}
		return true
	})
	if err == nil && foldErr == nil {
		showErased(^uint64(0))
	}
	return m.State(), errors.Join(err, foldErr)
}
