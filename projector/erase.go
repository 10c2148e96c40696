package projector

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
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

// deletedUsers returns the users a chunk deletes (accepted user.deleted).
func deletedUsers(items []item, decisions []events.Decision) []string {
	var uids []string
	for i, it := range items {
		if it.ev != nil && it.ev.Type == events.UserDeleted && decisions[i].Code == "" {
			uids = append(uids, it.ev.UserID)
		}
	}
	return uids
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
	for _, uid := range f.erased {
		if p.cfg.DataKeys != nil {
			if err := p.cfg.DataKeys.Destroy(ctx, uid); err != nil {
				return fmt.Errorf("destroy the data key of deleted user %s: %w", uid, err)
			}
		}
		// Without data keys (no key file) every event of theirs is in clear.
		if err := p.eraseClearEvents(ctx, uid); err != nil {
			return fmt.Errorf("erase the events of deleted user %s: %w", uid, err)
		}
	}
	for _, ks := range f.before { // the usernames the chunk deleted, as they were
		if !strings.HasPrefix(ks.Key, "n.") || ks.Data == nil {
			continue
		}
		if r, err := events.DecodeRecord(ks.Key, ks.Data); err != nil || !slices.Contains(f.erased, r.(*events.UsernameRecord).UserID) {
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
	return p.waitCheckpoint(ctx, ck, data)
}

// eraseClearEvents removes from the log the events of a deleted user that hold
// personal data in clear (written before version 3, or before the deployment had data
// keys), after writing what an audit needs of them (events.ErasureRecord) on the
// user's erased subject. Run again (a recovered deletion), it finds none left.
//
// NATS subtlety: the event stream denies message deletes (an audit log's protection,
// which cannot be lifted once set) but allows purges; a purge of a subject up to a
// sequence removes every message on it below that sequence. A user's clear events
// come before their sealed ones (written before the upgrade), so each of the user's
// event subjects is purged up to the last clear event: the sealed events it may take
// with it are listed in the record too. Recorded decisions are on another subject and
// stay.
func (p *Projector) eraseClearEvents(ctx context.Context, uid string) error {
	log := &Log{js: p.js, bucket: p.cfg.Bucket}
	var all []events.ErasedEvent
	var until uint64 // one past the last event with personal data in clear
	err := log.read(ctx, []string{p.layout.UserSubjects(uid)}, false, func(seq uint64, subject string, data []byte) bool {
		if !events.IsEventSubject(subject) {
			return true
		}
		ev, err := events.Decode(data)
		if err != nil {
			return true
		}
		if ev.Type == events.UserDeleted || ev.PII != nil || ev.APII != nil {
			// This deletion stays, and so does what comes after it; and once the user's
			// events are sealed they stay sealed (the upgrade came before): the scan
			// reads the clear prefix of their history, not all of it.
			return false
		}
		all = append(all, events.Erased(seq, ev))
		if events.ClearPersonal(ev) {
			until = seq + 1
		}
		return true
	})
	if err != nil || until == 0 {
		return err
	}
	rec := events.ErasureRecord{UserID: uid}
	for _, e := range all {
		if e.Seq < until {
			rec.Events = append(rec.Events, e)
		}
	}
	data, err := events.Marshal(&rec)
	if err != nil {
		return err
	}
	// The id keeps a retry within the de-duplication window from writing it twice.
	if _, err := p.js.Publish(ctx, p.layout.ErasedSubject(uid), data,
		jetstream.WithMsgID("erased-"+uid+"-"+strconv.FormatUint(until, 10))); err != nil {
		return err
	}
	evs, err := p.js.Stream(ctx, events.StreamName)
	if err != nil {
		return err
	}
	for _, subject := range []string{p.layout.UserSubject(uid), p.layout.AttrSubject(uid), p.layout.SessionSubject(uid, "*")} {
		if err := evs.Purge(ctx, jetstream.WithPurgeSubject(subject), jetstream.WithPurgeSequence(until)); err != nil {
			return err
		}
	}
	p.log.Info("erased the events of a deleted user written with personal data in clear", "user", uid, "events", len(rec.Events))
	return nil
}

// erasures makes a replay of the whole log decide as the projector did where a
// deleted user's erased data would be needed: their events, whose personal data is
// sealed under a destroyed key, and the claims of a username while a user whose
// username is erased existed (that user may have held it). Such an event takes the
// decision the projector recorded (every rejection from since on is recorded; every
// other event was accepted) instead of being decided again: the replay needs the
// erased data for nothing but those decisions.
//
// The events of earlier versions that a deletion removed from the log (ErasureRecord)
// are the same case: a replay folds the log without them, and takes the recorded
// decision for every event about or acted by one of their users whom it does not
// know (their creation was removed), and for every claim of a username while the log
// holds such users.
type erasures struct {
	log          *Log
	since        uint64
	unnamed      map[string]bool        // users whose username is erased, while they exist
	recorded     map[uint64]events.Code // the recorded rejections, read once needed
	removedSeqs  map[uint64]bool        // events removed from the log by erasures
	removedUsers map[string]bool        // their users
}

// readRemoved reads the erasure records: which events were removed, of which users.
func (er *erasures) readRemoved(ctx context.Context) error {
	er.removedSeqs, er.removedUsers = map[uint64]bool{}, map[string]bool{}
	filters := []string{events.EventsPrefix + ".*.erased", events.EventsPrefix + ".*.*.erased"}
	return er.log.read(ctx, filters, false, func(_ uint64, subject string, data []byte) bool {
		var r events.ErasureRecord
		if events.IsErasedSubject(subject) && events.Unmarshal(data, &r) == nil {
			er.removedUsers[r.UserID] = true
			for _, e := range r.Events {
				er.removedSeqs[e.Seq] = true
			}
		}
		return true
	})
}

// unknownRemoved reports whether uid is a user whose events were removed and whom st
// does not know.
func (er *erasures) unknownRemoved(st State, uid string) bool {
	return uid != "" && er.removedUsers[uid] && st.User(uid) == nil
}

// fold folds one message of the log, as Log.fold, with the decision recorded where
// the erased data would be needed.
func (er *erasures) fold(ctx context.Context, st State, lay events.Layout, seq uint64, subject string, data []byte) (events.Entry, error) {
	ev, err := er.log.decode(ctx, data)
	if err != nil && !errors.Is(err, errUnreadable) {
		return events.Entry{}, err
	}
	var forced *events.Code
	needsErased := ev != nil && (ev.Erased || ev.Type == events.UserCreated && (len(er.unnamed) > 0 || len(er.removedUsers) > 0) ||
		er.unknownRemoved(st, ev.UserID) || er.unknownRemoved(st, ev.Actor))
	if needsErased && er.since != 0 && seq >= er.since {
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
		if events.IsDecisionSubject(subject) {
			keepDecision(out, data, 0)
		}
		return true
	})
	return out, err
}
