package events

import "strings"

// Events of earlier versions, erased. An event written before version 3 (or by a
// deployment without data keys) holds personal data in clear. When its user is
// deleted, such events are removed from the log (securely: overwritten on disk) and
// what an audit needs of them stays in an ErasureRecord on the user's subject
// <prefix>.erased: not an event, like a recorded decision.

// ErasedEvent is what stays of an event removed because it held a deleted user's
// personal data in clear: its metadata, and the names of the attributes it touched.
type ErasedEvent struct {
	Seq          uint64   `msgpack:"seq"`
	ID           string   `msgpack:"id"`
	Type         Type     `msgpack:"type"`
	Time         int64    `msgpack:"ts"`
	SessionID    string   `msgpack:"sid,omitempty"`
	Actor        string   `msgpack:"actor,omitempty"`
	ActorSession string   `msgpack:"asid,omitempty"`
	App          string   `msgpack:"app,omitempty"`
	CID          string   `msgpack:"cid,omitempty"`
	Names        []string `msgpack:"names,omitempty"`
}

// ErasureRecord lists the events of a deleted user removed from the log.
type ErasureRecord struct {
	UserID string        `msgpack:"uid"`
	Events []ErasedEvent `msgpack:"events"`
}

// ErasedSubject is where a user's ErasureRecord goes.
func (l Layout) ErasedSubject(uid string) string { return l.prefix(uid) + ".erased" }

// IsErasedSubject reports whether a subject of the event stream holds an
// ErasureRecord rather than an event.
func IsErasedSubject(subject string) bool { return strings.HasSuffix(subject, ".erased") }

// IsEventSubject reports whether a message of the event stream is an event: not a
// recorded decision, not an erasure record.
func IsEventSubject(subject string) bool {
	return !IsDecisionSubject(subject) && !IsErasedSubject(subject)
}

// ClearPersonal reports whether ev holds personal data in clear: an event written
// before version 3, or without data keys.
func ClearPersonal(ev *Event) bool {
	return hasTargetPersonal(ev) || ev.ActorName != "" || ev.RemoteAddr != "" || ev.UserAgent != ""
}

// Erased returns the metadata of ev (at sequence seq) that stays once it is removed.
func Erased(seq uint64, ev *Event) ErasedEvent {
	e := ErasedEvent{Seq: seq, ID: ev.ID, Type: ev.Type, Time: ev.Time, SessionID: ev.SessionID, Actor: ev.Actor,
		ActorSession: ev.ActorSession, App: ev.App, CID: ev.CID}
	for _, it := range ev.Attrs {
		e.Names = append(e.Names, it.Name)
	}
	return e
}

// Event returns the metadata as an event of user uid, marked Erased: what a history
// shows of it.
func (e ErasedEvent) Event(uid string) *Event {
	ev := &Event{ID: e.ID, Type: e.Type, Version: SchemaVersion, Time: e.Time, UserID: uid, SessionID: e.SessionID,
		Actor: e.Actor, ActorSession: e.ActorSession, App: e.App, CID: e.CID, Erased: true}
	for _, n := range e.Names {
		ev.Attrs = append(ev.Attrs, AttrItem{Name: n})
	}
	if e.Type == UserCreated {
		ev.User = &UserData{}
	}
	return ev
}
