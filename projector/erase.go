package projector

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// Erasure: user.deleted. A super-user deletes another user: the user's sessions end,
// the user's and the sessions' attributes go, the user's record goes, and the username
// is free again. As in Zato, nobody deletes themselves, and deleting a user that does
// not exist is an invalid operation (E008001).
//
// The deletion reads every partition as user.created does (cross.go): it waits until
// each has committed every event before it. A claim of the username folded later
// (a user.created with a higher sequence, in another partition) then finds it free,
// and one with a lower sequence has been decided already: a username is taken at S
// exactly when the replay, which folds the log in order, finds it taken at S.

// decideUserDeleted decides a user's deletion.
func decideUserDeleted(st State, ev *events.Event) (events.Code, []func()) {
	if c := authorizeAdmin(st, ev); c != "" {
		return c, nil
	}
	if ev.UserID == ev.Actor {
		return events.CodeInvalidOperation, nil // nobody deletes themselves
	}
	u := st.User(ev.UserID)
	if u == nil {
		return events.CodeInvalidOperation, nil
	}
	return "", []func(){func() { eraseUser(st, ev.UserID, u.Username) }}
}

// eraseUser removes a user, their sessions and every attribute of both. The sessions'
// and attributes' keys are a bulk effect (Rewrite): folding the deletion again from
// any partial application removes what is left, so they need no room in the intent
// record however many there are.
func eraseUser(st State, uid, username string) {
	index := events.SessionIndexPrefix(uid)
	for _, k := range st.Keys(index) {
		sid := strings.TrimPrefix(k, index)
		for _, a := range st.AttrKeys(events.AttrPrefix(uid, sid)) {
			st.Rewrite(a, nil)
		}
		if st.Record(events.SessionKey(sid)) != nil {
			st.Rewrite(events.SessionKey(sid), nil)
		}
		st.Rewrite(k, nil)
	}
	for _, a := range st.AttrKeys(events.AttrPrefix(uid, "")) {
		st.Rewrite(a, nil)
	}
	st.Delete(events.UserKey(uid))
	if r := st.Username(username); r != nil && r.UserID == uid {
		st.Delete(events.UsernameKey(username))
	}
}

// loadErasures loads, for every user.deleted among items, what its fold removes
// beyond the keys Keys names: the attributes of every session of the user, the
// sessions, and the username (named by the user's record).
func (p *Projector) loadErasures(ctx context.Context, items []item) error {
	for _, it := range items {
		if it.ev == nil || it.ev.Type != events.UserDeleted {
			continue
		}
		uid := it.ev.UserID
		var keys, prefixes []string
		p.view.locked(func() {
			index := events.SessionIndexPrefix(uid)
			for _, k := range p.view.Keys(index) {
				sid := strings.TrimPrefix(k, index)
				keys = append(keys, events.SessionKey(sid))
				prefixes = append(prefixes, events.AttrPrefix(uid, sid))
			}
			if u := p.view.User(uid); u != nil {
				keys = append(keys, events.UsernameKey(u.Username))
			}
		})
		if err := p.load.load(ctx, p.view, keys, prefixes); err != nil {
			return err
		}
	}
	return nil
}

// openPersonal opens what is personal in ev with its persons' data keys; what
// belongs to a deleted user stays sealed (ev.Erased), and the fold decides without it.
func (p *Projector) openPersonal(ctx context.Context, ev *events.Event) error {
	if p.cfg.DataKeys == nil {
		return nil
	}
	return p.cfg.DataKeys.Open(ctx, ev)
}

// erases reports whether a chunk deletes a user.
func erases(items []item, decisions []events.Decision) bool {
	for i, it := range items {
		if it.ev != nil && it.ev.Type == events.UserDeleted && decisions[i].Code == "" {
			return true
		}
	}
	return false
}

// finishErasures completes the user deletions of a chunk whose writes have landed,
// before their decisions go out, so that "deleted" means erased:
//
//   - the users' data keys are destroyed: what their events hold sealed is erased;
//   - the subject of each username's key is purged: the delete marker written there
//     would keep the username in the bucket's stream, in its subject, and a purge of
//     the subject leaves no message at all (the key reads as absent, revision 0);
//   - the intent record, which holds the users' records as they were before (their
//     usernames and password hashes), is replaced by one that says nothing is pending
//     (a chunk that erases lands alone: no other record is on its way).
//
// A data key that cannot be destroyed now stops the run: the deletion, recovered, is
// finished by the next.
func (p *Projector) finishErasures(ctx context.Context, f *flight, last uint64) error {
	deleted := map[string]bool{}
	for i, it := range f.items {
		if it.ev != nil && it.ev.Type == events.UserDeleted && f.decisions[i].Code == "" {
			deleted[it.ev.UserID] = true
		}
	}
	if p.cfg.DataKeys != nil {
		for uid := range deleted {
			if err := p.cfg.DataKeys.Destroy(ctx, uid); err != nil {
				return fmt.Errorf("destroy the data key of deleted user %s: %w", uid, err)
			}
		}
	}
	for _, ks := range f.before { // the usernames the chunk deleted, as they were
		if !strings.HasPrefix(ks.Key, "n.") || ks.Data == nil {
			continue
		}
		if r, err := events.DecodeRecord(ks.Key, ks.Data); err != nil || !deleted[r.(*events.UsernameRecord).UserID] {
			continue
		}
		gone := false
		p.view.locked(func() { e := p.view.entries[ks.Key]; gone = e != nil && e.rec == nil })
		if !gone {
			continue // claimed again since, in this chunk
		}
		if err := p.load.stream.Purge(ctx, jetstream.WithPurgeSubject(events.KVSubject(p.cfg.Bucket, ks.Key))); err != nil {
			return fmt.Errorf("purge a deleted user's username key: %w", err)
		}
		p.view.locked(func() { p.view.entries[ks.Key].rev = 0 })
	}
	data, err := events.Marshal(&events.Checkpoint{First: last + 1, Last: last})
	if err != nil {
		return err
	}
	ck, err := p.sendIntent(data)
	if err != nil {
		return err
	}
	return p.waitCheckpoint(ctx, ck)
}

// erasures makes a replay of the whole log decide as the projector did where a
// deleted user's erased data would be needed: their events, whose personal data is
// sealed under a destroyed key, and the claims of a username while a user whose
// username is erased existed (that user may have held it). Such an event takes the
// decision the projector recorded (every rejection from since on is recorded; every
// other event was accepted) instead of being decided again: the replay needs the
// erased data for nothing but those decisions.
type erasures struct {
	log      *Log
	since    uint64
	unnamed  map[string]bool        // users whose username is erased, while they exist
	recorded map[uint64]events.Code // the recorded rejections, read once needed
}

// fold folds one message of the log, as Log.fold, with the decision recorded where
// the erased data would be needed.
func (er *erasures) fold(ctx context.Context, st State, lay events.Layout, seq uint64, subject string, data []byte) (events.Entry, error) {
	ev, err := er.log.decode(ctx, data)
	if err != nil && !errors.Is(err, errUnreadable) {
		return events.Entry{}, err
	}
	var forced *events.Code
	if ev != nil && (ev.Erased || ev.Type == events.UserCreated && len(er.unnamed) > 0) && er.since != 0 && seq >= er.since {
		if er.recorded == nil {
			if er.recorded, err = er.log.rejections(ctx); err != nil {
				return events.Entry{}, err
			}
		}
		c := er.recorded[seq]
		forced = &c
	}
	e := er.log.foldEvent(st, lay, seq, subject, ev, forced)
	if ev == nil || e.Decision.Code != "" {
		return e, nil
	}
	switch ev.Type {
	case events.UserCreated:
		if ev.Erased {
			er.unnamed[ev.UserID] = true
		}
	case events.UserDeleted:
		delete(er.unnamed, ev.UserID)
	}
	return e, nil
}

// rejections reads every decision the projectors recorded (rejections), by sequence.
func (l *Log) rejections(ctx context.Context) (map[uint64]events.Code, error) {
	out := map[uint64]events.Code{}
	filters := []string{events.EventsPrefix + ".*.decision", events.EventsPrefix + ".*.*.decision"}
	err := l.read(ctx, filters, false, func(_ uint64, subject string, data []byte) bool {
		var d events.Decision
		if events.IsDecisionSubject(subject) && events.Unmarshal(data, &d) == nil {
			if _, seen := out[d.Seq]; !seen {
				out[d.Seq] = d.Code
			}
		}
		return true
	})
	return out, err
}
