package events

import (
	"fmt"
	"slices"

	"github.com/attrd/attrd/events/sealed"
)

// Personal data in events (schema version 3). What an event holds of a person is
// sealed with that person's own data key (sealed.DataKey), so that destroying the key
// when the user is deleted erases it from the log and from every copy of the log
// (crypto-shredding). What stays in clear is what the fold needs to decide and an
// auditor needs to follow: ids, types, times, the actor's id, the application, the
// correlation and request ids, attribute names, encryption modes and expiries, and
// the super-user and approval flags (docs/SECURITY.md "Erasure").
//
//   - PII, sealed with the key of the event's user (UserID): the username and password
//     hash of user.created, and every attribute value.
//   - APII, sealed with the key of whoever acted (Actor, or the event's user when no
//     one else acted, as at a login): the actor's username, remote address and user
//     agent.

// targetPersonal is the clear form of an event's PII.
type targetPersonal struct {
	Username     string   `msgpack:"un,omitempty"`
	PasswordHash string   `msgpack:"pw,omitempty"`
	Values       [][]byte `msgpack:"vals,omitempty"` // Attrs[i].Value, in order
}

// actorPersonal is the clear form of an event's APII.
type actorPersonal struct {
	ActorName  string `msgpack:"an,omitempty"`
	RemoteAddr string `msgpack:"addr,omitempty"`
	UserAgent  string `msgpack:"ua,omitempty"`
}

// PersonalOwners returns whose data keys seal an event's PII (its user) and APII (its
// actor, or its user when no one else acted); "" for none.
func PersonalOwners(ev *Event) (target, actor string) {
	actor = ev.Actor
	if actor == "" {
		actor = ev.UserID
	}
	return ev.UserID, actor
}

func personalAAD(ev *Event, part string) []byte {
	return []byte("attrd/pii/v1\x00" + ev.ID + "\x00" + part)
}

// SealPersonal moves what ev holds of persons into its sealed fields: PII under
// target (the key of ev.UserID), APII under actor (see PersonalOwners). A part with
// nothing in it is not written. ev.ID must be set: the seal is bound to it.
func SealPersonal(ev *Event, target, actor *sealed.DataKey) error {
	var tp targetPersonal
	if ev.User != nil {
		tp.Username, tp.PasswordHash = ev.User.Username, ev.User.PasswordHash
	}
	hasValue := slices.ContainsFunc(ev.Attrs, func(it AttrItem) bool { return it.Value != nil })
	if hasValue {
		tp.Values = make([][]byte, len(ev.Attrs))
		for i, it := range ev.Attrs {
			tp.Values[i] = it.Value
		}
	}
	ap := actorPersonal{ActorName: ev.ActorName, RemoteAddr: ev.RemoteAddr, UserAgent: ev.UserAgent}
	if hasTargetPersonal(ev) {
		if target == nil {
			return fmt.Errorf("event %s: no data key for user %s", ev.ID, ev.UserID)
		}
		sealedTP, err := sealPart(target, tp, personalAAD(ev, "pii"))
		if err != nil {
			return err
		}
		ev.PII = sealedTP
		if ev.User != nil {
			ev.User.Username, ev.User.PasswordHash = "", ""
		}
		for i := range ev.Attrs {
			ev.Attrs[i].Value = nil
		}
	}
	if ap != (actorPersonal{}) {
		if actor == nil {
			_, who := PersonalOwners(ev)
			return fmt.Errorf("event %s: no data key for user %s", ev.ID, who)
		}
		sealedAP, err := sealPart(actor, ap, personalAAD(ev, "apii"))
		if err != nil {
			return err
		}
		ev.APII = sealedAP
		ev.ActorName, ev.RemoteAddr, ev.UserAgent = "", "", ""
	}
	return nil
}

func sealPart(k *sealed.DataKey, v any, aad []byte) ([]byte, error) {
	plain, err := Marshal(v)
	if err != nil {
		return nil, err
	}
	return k.Seal(plain, aad)
}

// OpenPersonal puts back into ev what its sealed fields hold. A part whose key is nil
// (its user's key destroyed by a deletion, or a reader without the key file), or that
// does not open with it, stays sealed, and ev.Erased says so; an event without sealed
// fields (older versions) is left as it is.
func OpenPersonal(ev *Event, target, actor *sealed.DataKey) {
	if ev.PII != nil {
		var tp targetPersonal
		if target == nil || openPart(target, ev.PII, personalAAD(ev, "pii"), &tp) != nil {
			ev.Erased = true
		} else {
			if ev.User != nil {
				ev.User.Username, ev.User.PasswordHash = tp.Username, tp.PasswordHash
			}
			if len(tp.Values) == len(ev.Attrs) {
				for i := range ev.Attrs {
					ev.Attrs[i].Value = tp.Values[i]
				}
			}
			ev.PII = nil
		}
	}
	if ev.APII != nil {
		var ap actorPersonal
		if actor == nil || openPart(actor, ev.APII, personalAAD(ev, "apii"), &ap) != nil {
			ev.Erased = true
		} else {
			ev.ActorName, ev.RemoteAddr, ev.UserAgent = ap.ActorName, ap.RemoteAddr, ap.UserAgent
			ev.APII = nil
		}
	}
}

func openPart(k *sealed.DataKey, v, aad []byte, out any) error {
	plain, err := k.Open(v, aad)
	if err != nil {
		return err
	}
	return Unmarshal(plain, out)
}
