package projector

import (
	"context"
	"errors"
	"strings"

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

// destroyDataKeys destroys the data key of every user whose deletion has landed: what
// their events hold sealed is erased from then on. A failure is logged; the instance
// that appended the deletion destroys the key too.
func (p *Projector) destroyDataKeys(ctx context.Context, items []item, decisions []events.Decision) {
	if p.cfg.DataKeys == nil {
		return
	}
	for i, it := range items {
		if it.ev == nil || it.ev.Type != events.UserDeleted || decisions[i].Code != "" {
			continue
		}
		if err := p.cfg.DataKeys.Destroy(ctx, it.ev.UserID); err != nil {
			p.log.Warn("data key of a deleted user not destroyed", "user", it.ev.UserID, "err", err)
		}
	}
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
