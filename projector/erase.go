package projector

import (
	"context"
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
