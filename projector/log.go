package projector

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// Log folds the event log in memory: for audits (a user's history, a point-in-time
// read) and for rebuilding and verifying the projection. It never writes.
type Log struct {
	js     jetstream.JetStream
	opener Opener
}

// NewLog returns a reader of the event log; opener opens sealed Inherit values (nil
// rejects them, as the projector would).
func NewLog(js jetstream.JetStream, opener Opener) *Log { return &Log{js: js, opener: opener} }

// read calls fn with every message on the filters (all: none) in log order, up to the
// log's end when the read began; fn returns false to stop. whole asks for the log from
// its first event: a log cut by retention is then ErrTruncated.
func (l *Log) read(ctx context.Context, filters []string, whole bool, fn func(seq uint64, subject string, data []byte) bool) error {
	st, err := l.js.Stream(ctx, events.StreamName)
	if err != nil {
		return fmt.Errorf("event stream: %w", err)
	}
	var opts []jetstream.StreamInfoOpt
	if len(filters) > 0 {
		opts = append(opts, jetstream.WithSubjectFilter(filters[0]))
	}
	info, err := st.Info(ctx, opts...)
	if err != nil {
		return err
	}
	if whole && info.State.FirstSeq > 1 {
		return fmt.Errorf("%w (it starts at sequence %d)", ErrTruncated, info.State.FirstSeq)
	}
	end := info.State.LastSeq
	if info.State.Msgs == 0 || len(filters) > 0 && len(info.State.Subjects) == 0 {
		return nil // nothing at all, or nothing on the first (main) filter
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
		if !fn(md.Sequence.Stream, m.Subject(), m.Data()) || md.NumPending == 0 || md.Sequence.Stream >= end {
			return nil
		}
	}
}

// fold decodes and folds one message into st, as the projector would.
func (l *Log) fold(st State, seq uint64, subject string, data []byte) events.Entry {
	e := events.Entry{Seq: seq, Subject: subject}
	ev, err := events.Decode(data)
	if err != nil || events.Subject(ev) != subject {
		e.Decision = events.Decision{Seq: seq, Code: events.CodeInvalidInput}
		return e
	}
	e.Event = ev
	e.Decision = Fold(st, seq, ev, l.opener, nil)
	return e
}

// ErrTruncated is returned by FoldAll when the log no longer starts at its first event:
// retention (--history-max-age, --history-max-bytes) removed the oldest, and a fold
// would miss their effects.
var ErrTruncated = errors.New("the log no longer holds its oldest events (history retention): it cannot rebuild the projection")

// FoldAll folds the whole log into m, in order, calling fn (if not nil) with every
// entry; it is what a rebuild and a verification start from.
func (l *Log) FoldAll(ctx context.Context, m *Memory, fn func(events.Entry)) error {
	st := m.State()
	return l.read(ctx, nil, true, func(seq uint64, subject string, data []byte) bool {
		e := l.fold(st, seq, subject, data)
		if fn != nil {
			fn(e)
		}
		return true
	})
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

// FoldUser folds what decides one user's events, in log order, and calls fn with each
// of the user's events (under events.UserSubjects) and the projection right after it,
// until fn returns false or an event's time is after until (0: no limit). It returns the state reached: the user's
// projection as of the last event folded.
//
// A user's events depend on the user's own earlier events and, when someone else acted
// (a super-user), on that actor's user record and session. So the log is read twice:
// once for the actors, then for the user's events together with the actors' user and
// session lifecycle events. (Folding only these, a user.created refused because another
// user had the username would be found accepted: such an id never existed anyway.)
func (l *Log) FoldUser(ctx context.Context, uid string, until int64, fn func(events.Entry, events.View) bool) (events.View, error) {
	m := NewMemory()
	own := events.UserSubjects(uid)
	actors := map[string]bool{}
	err := l.read(ctx, []string{own}, false, func(seq uint64, subject string, data []byte) bool {
		if ev, err := events.Decode(data); err == nil && ev.Actor != "" && ev.Actor != uid {
			actors[events.EventsPrefix+"."+ev.Actor+".user"] = true
			actors[events.EventsPrefix+"."+ev.Actor+".session."+ev.ActorSession] = true
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	filters := []string{own}
	for f := range actors {
		filters = append(filters, f)
	}
	prefix := strings.TrimSuffix(own, ">")
	st := m.State()
	err = l.read(ctx, filters, false, func(seq uint64, subject string, data []byte) bool {
		mine := strings.HasPrefix(subject, prefix)
		if until != 0 && mine {
			if ev, err := events.Decode(data); err == nil && ev.Time > until {
				return false
			}
		}
		e := l.fold(st, seq, subject, data)
		if mine && fn != nil {
			return fn(e, st)
		}
		return true
	})
	return m.State(), err
}
