package events

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"time"

	"github.com/oklog/ulid/v2"
)

// StreamName is the event stream; EventsPrefix begins every subject it holds (see
// Layout for the subjects of events and decisions).
const (
	StreamName   = "ATTRD_EVENTS"
	EventsPrefix = "attrd.events"
)

// Projection keys, all in one bucket (see docs/DESIGN-NOTES.md for why one):
//
//	u.<uid>                      UserRecord
//	n.<enc(username)>            UsernameRecord (username index)
//	s.<sid>                      SessionRecord
//	a.<uid>.u.<enc(name)>        AttrRecord of a user attribute
//	a.<uid>.s.<sid>.<enc(name)>  AttrRecord of a session attribute
//	x.<uid>.<sid>                SessionRefRecord: a user's live sessions, to count them
//	d.<event id>                 Decision of a request with a request id (written by older versions)
//	p.<partition>                the projector's intent record (Checkpoint)
//	r.<partition>                RecordingRecord: from which sequence decisions are recorded
//	l.<partition>                the projector lease (who folds the partition; TTL)
//	w.ticketkey                  the key that seals watch tickets (api/watchticket.go)
//
// UserKey is the key of a user.
func UserKey(uid string) string { return "u." + uid }

// UsernameKey is the key of the username index entry.
func UsernameKey(username string) string { return "n." + EncodeName(username) }

// SessionKey is the key of a session.
func SessionKey(sid string) string { return "s." + sid }

// SessionIndexPrefix is the key prefix of a user's session index.
func SessionIndexPrefix(uid string) string { return "x." + uid + "." }

// SessionIndexKey is the key of one session in its user's session index.
func SessionIndexKey(uid, sid string) string { return SessionIndexPrefix(uid) + sid }

// DecisionKey is the key of a decision kept for retries.
func DecisionKey(eventID string) string { return "d." + eventID }

// LeaseKey is the key of a partition's projector lease.
func LeaseKey(partition string) string { return "l." + partition }

// IsProjectionKey reports whether a key of the bucket is part of the projection
// proper, which a replay rebuilds, rather than the projectors' and instances' own
// (intent, recording, lease, presence and heartbeat records; decisions kept by older
// versions).
func IsProjectionKey(key string) bool {
	for _, own := range []string{"p.", "d.", "r.", "l.", "i.", "h.", "w."} {
		if strings.HasPrefix(key, own) {
			return false
		}
	}
	return true
}

// OwnerOfKey returns the user whose partition a projection key belongs to: the user
// of an attribute (a.<uid>.…), a user record (u.<uid>) or a session index entry
// (x.<uid>.…); "" for any other key (a session's key names no user, a username's
// belongs to no partition).
func OwnerOfKey(key string) string {
	kind, rest, ok := strings.Cut(key, ".")
	if !ok || kind != "a" && kind != "u" && kind != "x" {
		return ""
	}
	uid, _, _ := strings.Cut(rest, ".")
	return uid
}

// HeartbeatKey is the key an attrd API instance writes every 250 ms to show that it
// reaches a quorum (api/quorum.go), and a read index's barrier (events.Barrier): id is
// its writer's.
func HeartbeatKey(id string) string { return "h." + id }

// HeartbeatTTL makes a heartbeat key go away after its writer stops.
const HeartbeatTTL = 10 * time.Second

// PresenceKey is the key of an attrd instance's presence.
func PresenceKey(instance string) string { return "i." + EncodeName(instance) }

// TicketKeyKey is the key of the 32 bytes that seal watch tickets, shared by every
// instance, made by the first that needs it.
const TicketKeyKey = "w.ticketkey"

// RecordingKey is the key of a partition's RecordingRecord.
func RecordingKey(partition string) string { return "r." + partition }

// CheckpointKey is the key of a partition's intent record.
func CheckpointKey(partition string) string { return "p." + partition }

// AttrPrefix is the key prefix of a user's attributes (sid "") or of one session's.
func AttrPrefix(uid, sid string) string {
	if sid == "" {
		return "a." + uid + ".u."
	}
	return "a." + uid + ".s." + sid + "."
}

// AttrKey is the key of one attribute.
func AttrKey(uid, sid, name string) string { return AttrPrefix(uid, sid) + EncodeName(name) }

// AttrNameFromKey returns the attribute name of a key under prefix.
func AttrNameFromKey(prefix, key string) (string, error) {
	if !strings.HasPrefix(key, prefix) {
		return "", fmt.Errorf("key %q is not under %q", key, prefix)
	}
	return DecodeName(key[len(prefix):])
}

// SessionID returns the id under which a session is stored: a hash of its UST, so that
// the UST itself is stored nowhere.
func SessionID(ust string) string {
	h := sha256.Sum256([]byte(ust))
	return hex.EncodeToString(h[:16])
}

// ValidUserID reports whether s can be a user id: a ULID, which is also safe in keys
// and subjects (no dots, no wildcards).
func ValidUserID(s string) bool {
	_, err := ulid.ParseStrict(s)
	return err == nil
}

// ValidSessionID reports whether s can be a session id (see SessionID).
func ValidSessionID(s string) bool {
	if len(s) != 32 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil && strings.ToLower(s) == s
}

// RequestKey returns the id of the event of a request that carries a request id: a
// ULID-form value derived from the caller (scope) and the request id, so that a retry's
// event has the same id, hence the same Nats-Msg-Id, and the stream drops it. Its time
// bits are not a time. Callers' ids never collide: the scope is part of the hash.
func RequestKey(scope, requestID string) string {
	h := sha256.Sum256([]byte(scope + "\x00" + requestID))
	var id ulid.ULID
	copy(id[:], h[:16])
	return id.String()
}

// EncodeName turns any string into a KV key token: ASCII letters, digits, '-' and '_'
// stand for themselves, every other byte is "=" and two upper-case hex digits. The
// result uses only [-_=a-zA-Z0-9], never a dot, and DecodeName reverses it exactly.
func EncodeName(name string) string {
	var b strings.Builder
	b.Grow(len(name))
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' {
			b.WriteByte(c)
			continue
		}
		const hexdig = "0123456789ABCDEF"
		b.WriteByte('=')
		b.WriteByte(hexdig[c>>4])
		b.WriteByte(hexdig[c&15])
	}
	return b.String()
}

// DecodeName reverses EncodeName.
func DecodeName(token string) (string, error) {
	var b strings.Builder
	b.Grow(len(token))
	for i := 0; i < len(token); i++ {
		c := token[i]
		if c != '=' {
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(token) {
			return "", fmt.Errorf("bad name token %q", token)
		}
		v, err := hex.DecodeString(token[i+1 : i+3])
		if err != nil {
			return "", fmt.Errorf("bad name token %q: %w", token, err)
		}
		b.WriteByte(v[0])
		i += 2
	}
	return b.String(), nil
}
