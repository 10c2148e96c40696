package projector

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// Decisions that read another partition.
//
// A partition's projector folds its own users' events, in log order, against a view
// that only it writes. Two kinds of decision also read what other partitions fold:
// an event whose actor is a user of another partition (a super-user acting on someone
// else: its actor's session and user record), user.created (whether its username
// is taken: any partition may have claimed it) and user.deleted (which frees one). Replay folds the whole log into one
// state, so for every such event it reads the other user's state as it stood right
// before the event's sequence S. The live projector reads exactly that:
//
//  1. it commits everything it folded before the event (the event starts a chunk), so
//     that no partition ever waits on one that waits on it;
//  2. it waits until each partition it reads has committed all its events before S
//     (its projector says how far it has committed; the stream says whether that
//     partition has any event between there and S);
//  3. it reads the records as of S: a record last written by an event before S is the
//     record at S (nothing of that partition before S is uncommitted, and anything
//     after S would have a later sequence); otherwise (written after S, deleted, or
//     expired away) it folds that user's lifecycle events before S from the log, each
//     as its partition decided it.
//
// A username record written before S means taken, and none means free: a claim after
// S would wait for this event, and so would a deletion that frees the username
// (user.deleted, erase.go), which waits for every partition too.

// appliedSubject is where a partition's projector answers how far it has committed
// (the internal account only).
func appliedSubject(bucket, partition string) string {
	return "attrd.projector." + bucket + "." + partition + ".applied"
}

// serveApplied answers requests for this projector's committed sequence.
func (p *Projector) serveApplied() (*nats.Subscription, error) {
	return p.nc.Subscribe(appliedSubject(p.cfg.Bucket, p.part), func(m *nats.Msg) {
		_ = m.Respond([]byte(strconv.FormatUint(p.Applied(), 10)))
	})
}

// crossReads returns the partitions other than this one whose state ev's decision
// reads, and whether it reads a username (every partition).
func (p *Projector) crossReads(ev *events.Event) (actor bool, username bool) {
	if p.layout.N() == 1 || ev == nil {
		return false, false
	}
	actor = ev.Actor != "" && p.layout.Partition(ev.Actor) != p.cfg.Partition
	// A claim of a username reads it; a deletion frees one (erase.go): both wait for
	// every partition.
	username = ev.Type == events.UserCreated && ev.User != nil || ev.Type == events.UserDeleted
	return actor, username
}

// crossRead puts into the view what ev (at sequence seq) reads of other partitions, as
// it stood right before seq.
func (p *Projector) crossRead(ctx context.Context, seq uint64, ev *events.Event) error {
	actor, username := p.crossReads(ev)
	if username {
		for q := range p.layout.N() {
			if err := p.waitCommitted(ctx, q, seq); err != nil {
				return err
			}
		}
	}
	if username && ev.Type == events.UserCreated {
		key := events.UsernameKey(ev.User.Username)
		e, err := p.load.readOther(ctx, key)
		if err != nil {
			return err
		}
		if r, ok := e.rec.(*events.UsernameRecord); ok && r.Seq >= seq {
			return fmt.Errorf("username %q claimed at sequence %d, after the claim at %d being folded", ev.User.Username, r.Seq, seq)
		}
		p.view.locked(func() {
			p.view.entries[key] = &entry{rev: e.rev}
			p.view.set(key, e.rec, loaded)
		})
	}
	if actor {
		if !username {
			if err := p.waitCommitted(ctx, p.layout.Partition(ev.Actor), seq); err != nil {
				return err
			}
		}
		if err := p.actorAt(ctx, ev.Actor, ev.ActorSession, seq); err != nil {
			return fmt.Errorf("the actor of the event at %d: %w", seq, err)
		}
	}
	return nil
}

// actorAt puts an actor's user record and session into the view as they stood right
// before seq.
func (p *Projector) actorAt(ctx context.Context, uid, sid string, seq uint64) error {
	uk, sk := events.UserKey(uid), events.SessionKey(sid)
	ue, err := p.load.readOther(ctx, uk)
	if err != nil {
		return err
	}
	se, err := p.load.readOther(ctx, sk)
	if err != nil {
		return err
	}
	u, _ := ue.rec.(*events.UserRecord)
	s, _ := se.rec.(*events.SessionRecord)
	urec, srec := ue.rec, se.rec
	if u == nil || u.Seq >= seq || s == nil || s.Seq >= seq {
		// Written after seq, deleted, or expired away: fold the actor's lifecycle from
		// the log.
		m, err := p.lifecycle(ctx, uid, sid, seq)
		if err != nil {
			return err
		}
		urec, srec = m.get(uk), m.get(sk)
	}
	p.view.locked(func() {
		p.view.entries[uk] = &entry{rev: ue.rev}
		p.view.set(uk, urec, loaded)
		p.view.entries[sk] = &entry{rev: se.rev}
		p.view.set(sk, srec, loaded)
	})
	return nil
}

// lifecycle folds, in memory, a user's own lifecycle events and one session's events
// before seq, each as its partition decided it (rejections are recorded on the user's
// decision subject, by now for every event before seq; every other event was
// accepted).
func (p *Projector) lifecycle(ctx context.Context, uid, sid string, seq uint64) (*view, error) {
	rejected := map[uint64]events.Code{}
	type msg struct {
		seq     uint64
		subject string
		data    []byte
	}
	var msgs []msg
	log := &Log{js: p.js, opener: p.cfg.Opener, bucket: p.cfg.Bucket}
	filters := []string{p.layout.UserSubject(uid), p.layout.SessionSubject(uid, sid), p.layout.DecisionSubject(uid)}
	err := log.read(ctx, filters, false, func(at uint64, subject string, data []byte) bool {
		if events.IsDecisionSubject(subject) {
			keepDecision(rejected, data, seq)
		} else if at < seq {
			msgs = append(msgs, msg{at, subject, data})
		}
		return true
	})
	if err != nil {
		return nil, fmt.Errorf("read the log of user %s: %w", uid, err)
	}
	st := NewMemory()
	accepted := events.Code("")
	for _, m := range msgs {
		ev, err := events.Decode(m.data)
		if err != nil || p.layout.Subject(ev) != m.subject {
			continue
		}
		forced := &accepted
		if c, ok := rejected[m.seq]; ok {
			forced = &c
		}
		Fold(st.State(), m.seq, ev, p.cfg.Opener, forced)
	}
	return st.v, nil
}

// waitCommitted returns once partition q has committed every one of its events
// before seq: its projector says how far it has committed, and the stream whether q
// has an event between there and seq. It asks again, more slowly, while q folds.
func (p *Projector) waitCommitted(ctx context.Context, q int, seq uint64) error {
	if q == p.cfg.Partition {
		return nil // this projector has committed everything before its chunk
	}
	evs, err := p.js.Stream(ctx, events.StreamName)
	if err != nil {
		return err
	}
	filter := p.layout.PartitionSubjects(q)
	for pause := time.Millisecond; ; pause = min(2*pause, 100*time.Millisecond) {
		applied, err := p.askApplied(ctx, q)
		if err == nil {
			if applied+1 >= seq {
				return nil
			}
			m, err := evs.GetMsg(ctx, applied+1, jetstream.WithGetMsgSubject(filter))
			if errors.Is(err, jetstream.ErrMsgNotFound) || err == nil && m.Sequence >= seq {
				return nil // nothing of q between its committed end and seq
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(pause):
		}
	}
}

// askApplied asks partition q's projector how far it has committed.
func (p *Projector) askApplied(ctx context.Context, q int) (uint64, error) {
	return AskApplied(ctx, p.nc, p.cfg.Bucket, q)
}

// AskApplied asks the projector folding partition q of bucket how far it has
// committed (within a second; nats.ErrNoResponders when no projector folds it).
func AskApplied(ctx context.Context, nc *nats.Conn, bucket string, q int) (uint64, error) {
	rctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	m, err := nc.RequestWithContext(rctx, appliedSubject(bucket, events.PartitionName(q)), nil)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(string(m.Data), 10, 64)
}
