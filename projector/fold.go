package projector

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// State is the projection as the fold reads and changes it. Getters return nil for an
// absent key; liveness (expiry) is the fold's business, decided at the event's time.
type State interface {
	events.View
	Username(name string) *events.UsernameRecord
	// Record returns any key's record (nil: absent).
	Record(key string) any
	// Keys lists the keys under an attribute or session-index prefix that hold a record.
	Keys(prefix string) []string
	Put(key string, rec any)
	Delete(key string)
	// Rewrite writes a key again (rec nil: deletes it) as part of a bulk effect that
	// folding the event again reaches from any partial application: a renewal
	// rewriting its session's attributes unchanged, a logout deleting them. Its prior
	// state need not be recorded for recovery, so such effects have no size limit.
	Rewrite(key string, rec any)
}

// Opener opens sealed values; the fold needs it for Inherit items that turn out plain.
type Opener interface {
	Open(v, aad []byte) ([]byte, error)
}

// ErrNoKey is what NoKey answers.
var ErrNoKey = errors.New("no key file: the value stays sealed")

// NoKey is the opener of a reader without the key file (history, replay): an Inherit
// item that turns out plain is kept sealed and marked Unopened, and is decided as with
// the key, so that decisions and states do not depend on who reads them. The projector
// itself never uses it: without keys it refuses such items.
var NoKey Opener = noKey{}

type noKey struct{}

func (noKey) Open(v, aad []byte) ([]byte, error) { return nil, ErrNoKey }

// Fold decides ev (stream sequence seq) against st and, if it is accepted, applies it.
// The decision is a pure function of st and ev (the event's own time, never the clock),
// so folding the log again reproduces every decision. A rejected event changes nothing.
//
// When forced is not nil the decision is not made again: it is *forced (a decision
// recorded before a crash), and an accepted event's effects are applied.
func Fold(st State, seq uint64, ev *events.Event, open Opener, forced *events.Code) (d events.Decision) {
	d = events.Decision{Seq: seq, EventID: ev.ID, UserID: ev.UserID, ExpiresAt: ev.ExpiresAt, Fingerprint: ev.Fingerprint}
	var plan []func()
	d.Code, plan = safeDecide(st, seq, ev, open)
	if forced != nil {
		if *forced == "" && d.Code != "" {
			// Recorded as accepted, but the state the decision was made against is not
			// wholly here (a key expired by TTL during the outage): apply what can be.
			plan = effectsAnyway(st, seq, ev, open)
		}
		d.Code = *forced
	}
	if d.Code == "" {
		for _, f := range plan {
			f()
		}
	}
	return d
}

// safeDecide is decide, with a panic (a bug that a crafted event reaches) turned into
// a rejection: the fold goes on, and a replay makes the same decision.
func safeDecide(st State, seq uint64, ev *events.Event, open Opener) (code events.Code, plan []func()) {
	defer func() {
		if p := recover(); p != nil {
			slog.Error("event rejected: the fold panicked on it", "seq", seq, "event", ev.ID, "panic", fmt.Sprint(p))
			code, plan = events.CodeInvalidInput, nil
		}
	}()
	return decide(st, seq, ev, open)
}

// liveUnder counts the records under prefix live at t, stopping at limit.
func liveUnder(st State, prefix string, t int64, limit int) int {
	n := 0
	for _, k := range st.Keys(prefix) {
		live := false
		switch r := st.Record(k).(type) {
		case *events.AttrRecord:
			live = r.Live(t)
		case *events.SessionRefRecord:
			live = r != nil && r.ExpiresAt > t
		}
		if live {
			if n++; n >= limit {
				break
			}
		}
	}
	return n
}

// overCap reports whether adding adds records under prefix would pass cap (0: none).
func overCap(st State, prefix string, t int64, cap, adds int) bool {
	if cap <= 0 || adds == 0 {
		return false
	}
	if len(st.Keys(prefix))+adds <= cap {
		return false // no need to check which are live
	}
	return liveUnder(st, prefix, t, cap)+adds > cap
}

// decide checks ev and returns its code and, when accepted, the mutations to apply.
func decide(st State, seq uint64, ev *events.Event, open Opener) (events.Code, []func()) {
	t := ev.Time
	switch ev.Type {
	case events.UserCreated:
		if ev.User == nil || ev.UserID == "" || ev.User.Username == "" {
			return events.CodeInvalidInput, nil
		}
		if c := authorizeAdmin(st, ev); c != "" {
			return c, nil
		}
		if st.Username(ev.User.Username) != nil || st.User(ev.UserID) != nil {
			return events.CodeUsernameExists, nil
		}
		u := newUser(ev, seq)
		return "", []func(){func() {
			st.Put(events.UserKey(ev.UserID), u)
			st.Put(events.UsernameKey(u.Username), &events.UsernameRecord{UserID: u.UserID, Seq: seq})
		}}

	case events.UserDeleted:
		return decideUserDeleted(st, ev)

	case events.UserRehashed:
		// The user themselves, at a login (or attrd): the new hash replaces the old.
		if ev.Actor != "" && ev.Actor != ev.UserID {
			return events.CodeNotAllowed, nil
		}
		u := st.User(ev.UserID)
		if u == nil || ev.User == nil || ev.User.PasswordHash == "" && !ev.Erased {
			return events.CodeNotAllowed, nil
		}
		return "", []func(){rehash(st, ev, u, seq)}

	case events.UserApproved:
		if c := authorizeAdmin(st, ev); c != "" {
			return c, nil
		}
		u := st.User(ev.UserID)
		if u == nil {
			return events.CodeNotAllowed, nil
		}
		nu := *u
		nu.Approved, nu.Seq = true, seq
		return "", []func(){func() { st.Put(events.UserKey(ev.UserID), &nu) }}

	case events.SessionCreated:
		u := st.User(ev.UserID)
		if u == nil || !u.Approved || ev.SessionID == "" || ev.ExpiresAt <= t {
			return events.CodeNotAllowed, nil
		}
		if st.Session(ev.SessionID) != nil {
			return events.CodeInvalidInput, nil
		}
		if overCap(st, events.SessionIndexPrefix(ev.UserID), t, ev.Cap, 1) {
			return events.CodeInvalidInput, nil // too many live sessions
		}
		s := &events.SessionRecord{UserID: ev.UserID, Created: t, ExpiresAt: ev.ExpiresAt, App: ev.App,
			RemoteAddr: ev.RemoteAddr, UserAgent: ev.UserAgent, Seq: seq, Unopened: ev.Erased}
		return "", []func(){func() {
			st.Put(events.SessionKey(ev.SessionID), s)
			st.Put(events.SessionIndexKey(ev.UserID, ev.SessionID), &events.SessionRefRecord{ExpiresAt: s.ExpiresAt, Seq: seq})
		}}

	case events.SessionRenewed:
		s := st.Session(ev.SessionID)
		if !s.Live(t) || s.UserID != ev.UserID || ev.ExpiresAt <= t {
			return events.CodeNoSession, nil
		}
		ns := *s
		ns.ExpiresAt, ns.Seq = ev.ExpiresAt, seq
		return "", []func(){func() {
			st.Put(events.SessionKey(ev.SessionID), &ns)
			st.Put(events.SessionIndexKey(ev.UserID, ev.SessionID), &events.SessionRefRecord{ExpiresAt: ns.ExpiresAt, Seq: seq})
			// The session's attributes are written again so that their TTL, capped at the
			// session's end, follows the new end. Their records do not change.
			for _, k := range st.AttrKeys(events.AttrPrefix(ev.UserID, ev.SessionID)) {
				if a := st.Attr(k); a != nil {
					st.Rewrite(k, a)
				}
			}
		}}

	case events.SessionEnded:
		s := st.Session(ev.SessionID)
		if s == nil || s.UserID != ev.UserID {
			return "", nil // logging out an unknown session is ok and changes nothing
		}
		return "", []func(){func() { endSession(st, ev.UserID, ev.SessionID) }}

	case events.LoginFailed, events.AccessDenied:
		return "", nil // a record of a refusal: nothing to change

	case events.AttrCreated, events.AttrUpdated, events.AttrSet, events.AttrDeleted:
		if c := authorizeAttr(st, ev); c != "" {
			return c, nil
		}
		if len(ev.Attrs) == 0 || hasDuplicateNames(ev.Attrs) {
			return events.CodeInvalidInput, nil
		}
		return decideAttrs(st, seq, ev, open)
	}
	return events.CodeInvalidInput, nil
}

// decideAttrs decides an attribute event whose caller is authorized: all items or none.
func decideAttrs(st State, seq uint64, ev *events.Event, open Opener) (events.Code, []func()) {
	t := ev.Time
	if ev.Type == events.AttrCreated || ev.Type == events.AttrSet {
		adds := 0
		for _, it := range ev.Attrs {
			if !st.Attr(events.AttrKey(ev.UserID, ev.SessionID, it.Name)).Live(t) {
				adds++
			}
		}
		if overCap(st, events.AttrPrefix(ev.UserID, ev.SessionID), t, ev.Cap, adds) {
			return events.CodeInvalidInput, nil // the owner would hold too many attributes
		}
	}
	plan := make([]func(), 0, len(ev.Attrs))
	for _, it := range ev.Attrs {
		key := events.AttrKey(ev.UserID, ev.SessionID, it.Name)
		old := st.Attr(key)
		live := old.Live(t)
		switch {
		case ev.Type == events.AttrDeleted:
			if old != nil {
				plan = append(plan, func() { st.Delete(key) })
			}
			continue
		case ev.Type == events.AttrCreated && live:
			return events.CodeAttrExists, nil
		case ev.Type == events.AttrUpdated && !live:
			return events.CodeNoAttr, nil
		}
		if !live {
			old = nil
		}
		rec, code := newAttr(ev, it, old, seq, open)
		if code != "" {
			return code, nil
		}
		plan = append(plan, func() { st.Put(key, rec) })
	}
	return "", plan
}

// newUser is the record of an accepted user.created: created at the event's time, or,
// imported, at the source's.
func newUser(ev *events.Event, seq uint64) *events.UserRecord {
	created := ev.Time
	if ev.Imported != nil && ev.User.Created > 0 {
		created = ev.User.Created
	}
	return &events.UserRecord{UserID: ev.UserID, Username: ev.User.Username, PasswordHash: ev.User.PasswordHash,
		SuperUser: ev.User.SuperUser, Approved: ev.User.Approved, Created: created, Seq: seq, Unopened: ev.Erased}
}

// rehash is user.rehashed's effect: the user's record with the new password hash.
func rehash(st State, ev *events.Event, u *events.UserRecord, seq uint64) func() {
	nu := *u
	nu.PasswordHash, nu.Seq = ev.User.PasswordHash, seq
	nu.Unopened = nu.Unopened || ev.Erased
	return func() { st.Put(events.UserKey(ev.UserID), &nu) }
}

// newAttr is the record an accepted create, update or set item stores: on top of old
// when the attribute is live (update), from nothing otherwise (create).
func newAttr(ev *events.Event, it events.AttrItem, old *events.AttrRecord, seq uint64, open Opener) (*events.AttrRecord, events.Code) {
	rec := &events.AttrRecord{Value: it.Value, Created: ev.Time, Modified: ev.Time, ExpiresAt: it.ExpiresAt, Seq: seq}
	if ev.Imported != nil && old == nil {
		// Imported: the attribute keeps its times from the system it came from.
		if it.Created > 0 {
			rec.Created = it.Created
		}
		if it.Modified > 0 {
			rec.Modified = it.Modified
		}
	}
	if ev.Erased && it.Value == nil {
		rec.Unopened = true // sealed with its user's personal data: only their key shows it
	}
	if old != nil {
		rec.Created = old.Created
		if it.ExpiresAt == 0 {
			rec.ExpiresAt = old.ExpiresAt // absent or 0 keeps the current expiry
		}
	}
	switch it.Enc {
	case events.Encrypted:
		rec.Encrypted = true
	case events.Inherit:
		if old != nil && old.Encrypted {
			rec.Encrypted = true
			break
		}
		if rec.Unopened {
			break // erased with its user's personal data
		}
		if open == nil {
			return nil, events.CodeInvalidInput
		}
		plain, err := open.Open(it.Value, sealed.AAD(ev.UserID, ev.SessionID, it.Name))
		if errors.Is(err, ErrNoKey) {
			rec.Unopened = true // plain, but only the key would show it
			break
		}
		if err != nil {
			return nil, events.CodeInvalidInput
		}
		rec.Value = plain
	}
	return rec, ""
}

// effectsAnyway returns the effects of an event recorded as accepted whose checks do not
// pass against the state at hand: a key expired by TTL during an outage, or a history
// that folds one user's events only (the actors that made them valid are elsewhere in
// the log). Each effect is applied as far as it makes sense.
func effectsAnyway(st State, seq uint64, ev *events.Event, open Opener) []func() {
	t := ev.Time
	switch ev.Type {
	case events.UserCreated:
		if ev.User == nil || ev.UserID == "" {
			return nil
		}
		u := newUser(ev, seq)
		return []func(){func() {
			st.Put(events.UserKey(ev.UserID), u)
			if u.Username != "" { // "": erased with its user (the user is deleted later in the log)
				st.Put(events.UsernameKey(u.Username), &events.UsernameRecord{UserID: u.UserID, Seq: seq})
			}
		}}
	case events.UserRehashed:
		if u := st.User(ev.UserID); u != nil && ev.User != nil {
			return []func(){rehash(st, ev, u, seq)}
		}
	case events.UserApproved:
		if u := st.User(ev.UserID); u != nil {
			nu := *u
			nu.Approved, nu.Seq = true, seq
			return []func(){func() { st.Put(events.UserKey(ev.UserID), &nu) }}
		}
	case events.SessionCreated:
		s := &events.SessionRecord{UserID: ev.UserID, Created: t, ExpiresAt: ev.ExpiresAt, App: ev.App,
			RemoteAddr: ev.RemoteAddr, UserAgent: ev.UserAgent, Seq: seq, Unopened: ev.Erased}
		return []func(){func() {
			st.Put(events.SessionKey(ev.SessionID), s)
			st.Put(events.SessionIndexKey(ev.UserID, ev.SessionID), &events.SessionRefRecord{ExpiresAt: s.ExpiresAt, Seq: seq})
		}}
	case events.SessionRenewed:
		if s := st.Session(ev.SessionID); s != nil {
			ns := *s
			ns.ExpiresAt, ns.Seq = ev.ExpiresAt, seq
			return []func(){func() {
				st.Put(events.SessionKey(ev.SessionID), &ns)
				st.Put(events.SessionIndexKey(ev.UserID, ev.SessionID), &events.SessionRefRecord{ExpiresAt: ns.ExpiresAt, Seq: seq})
			}}
		}
	case events.SessionEnded:
		return []func(){func() { endSession(st, ev.UserID, ev.SessionID) }}
	case events.UserDeleted:
		// The user's record may be missing (their creation removed from the log by an
		// erasure): what is left of them goes all the same.
		username := ""
		if u := st.User(ev.UserID); u != nil {
			username = u.Username
		}
		return []func(){func() { eraseUser(st, ev.UserID, username) }}
	case events.AttrDeleted:
		var plan []func()
		for _, it := range ev.Attrs {
			key := events.AttrKey(ev.UserID, ev.SessionID, it.Name)
			if st.Attr(key) != nil {
				plan = append(plan, func() { st.Delete(key) })
			}
		}
		return plan
	case events.AttrCreated, events.AttrUpdated, events.AttrSet:
		var plan []func()
		for _, it := range ev.Attrs {
			key := events.AttrKey(ev.UserID, ev.SessionID, it.Name)
			old := st.Attr(key)
			if !old.Live(t) {
				old = nil
			}
			if rec, code := newAttr(ev, it, old, seq, open); code == "" {
				plan = append(plan, func() { st.Put(key, rec) })
			}
		}
		return plan
	}
	return nil
}

// endSession removes a session and its attributes.
func endSession(st State, uid, sid string) {
	for _, k := range st.AttrKeys(events.AttrPrefix(uid, sid)) {
		st.Rewrite(k, nil)
	}
	st.Delete(events.SessionKey(sid))
	if st.Record(events.SessionIndexKey(uid, sid)) != nil {
		st.Delete(events.SessionIndexKey(uid, sid))
	}
}

// authorizeActor checks that the caller's session is live and is the caller's.
// An event with no actor comes from attrd itself (the first super-user).
func authorizeActor(st State, ev *events.Event) (*events.UserRecord, events.Code) {
	if ev.Actor == "" {
		return nil, ""
	}
	s := st.Session(ev.ActorSession)
	if !s.Live(ev.Time) || s.UserID != ev.Actor {
		return nil, events.CodeNoSession
	}
	u := st.User(ev.Actor)
	if u == nil {
		return nil, events.CodeNotAllowed
	}
	return u, ""
}

// authorizeAdmin lets super-users (and attrd itself) manage users.
func authorizeAdmin(st State, ev *events.Event) events.Code {
	u, c := authorizeActor(st, ev)
	if c != "" {
		return c
	}
	if u != nil && !u.SuperUser {
		return events.CodeNotAllowed
	}
	return ""
}

// authorizeAttr enforces invariant 6: a caller reaches its own user's attributes and its
// own user's sessions' attributes, a super-user anyone's; the target session must live.
func authorizeAttr(st State, ev *events.Event) events.Code {
	u, c := authorizeActor(st, ev)
	if c != "" {
		return c
	}
	if u != nil && !u.SuperUser && ev.UserID != u.UserID {
		return events.CodeNotAllowed
	}
	if st.User(ev.UserID) == nil {
		return events.CodeNotAllowed
	}
	if ev.SessionID != "" {
		s := st.Session(ev.SessionID)
		if !s.Live(ev.Time) || s.UserID != ev.UserID {
			return events.CodeNoSession
		}
	}
	return ""
}

func hasDuplicateNames(items []events.AttrItem) bool {
	seen := make(map[string]struct{}, len(items))
	for _, it := range items {
		if _, dup := seen[it.Name]; dup {
			return true
		}
		seen[it.Name] = struct{}{}
	}
	return false
}

// Keys returns the keys ev's fold reads, and the attribute prefixes it lists, so that a
// projector backed by KV can load them before folding.
func Keys(ev *events.Event) (keys []string, prefixes []string) {
	add := func(k ...string) { keys = append(keys, k...) }
	if ev.Actor != "" {
		add(events.UserKey(ev.Actor))
		if ev.ActorSession != "" {
			add(events.SessionKey(ev.ActorSession)) // "s." is no key: a load of it fails
		}
	}
	switch ev.Type {
	case events.UserCreated:
		add(events.UserKey(ev.UserID))
		if ev.User != nil {
			add(events.UsernameKey(ev.User.Username))
		}
	case events.UserApproved, events.UserRehashed:
		add(events.UserKey(ev.UserID))
	case events.UserDeleted:
		// The sessions' keys and attributes and the username come once these are
		// loaded (loadErasures).
		add(events.UserKey(ev.UserID))
		prefixes = append(prefixes, events.SessionIndexPrefix(ev.UserID), events.AttrPrefix(ev.UserID, ""))
	case events.SessionCreated:
		add(events.UserKey(ev.UserID), events.SessionKey(ev.SessionID), events.SessionIndexKey(ev.UserID, ev.SessionID))
		if ev.Cap > 0 {
			prefixes = append(prefixes, events.SessionIndexPrefix(ev.UserID))
		}
	case events.SessionRenewed, events.SessionEnded:
		add(events.SessionKey(ev.SessionID), events.SessionIndexKey(ev.UserID, ev.SessionID))
		prefixes = append(prefixes, events.AttrPrefix(ev.UserID, ev.SessionID))
	default:
		if ev.Cap > 0 && (ev.Type == events.AttrCreated || ev.Type == events.AttrSet) {
			prefixes = append(prefixes, events.AttrPrefix(ev.UserID, ev.SessionID))
		}
		add(events.UserKey(ev.UserID))
		if ev.SessionID != "" {
			add(events.SessionKey(ev.SessionID))
		}
		for _, it := range ev.Attrs {
			add(events.AttrKey(ev.UserID, ev.SessionID, it.Name))
		}
	}
	return keys, prefixes
}
