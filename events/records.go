package events

import (
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/vmihailenco/msgpack/v5"
)

// Records are the values of the projection's keys, msgpack-encoded. Seq is the stream
// sequence of the event that last wrote the record.

// UserRecord is a user (key u.<uid>).
type UserRecord struct {
	UserID       string `msgpack:"uid"`
	Username     string `msgpack:"username"`
	PasswordHash string `msgpack:"pwhash"`
	SuperUser    bool   `msgpack:"super,omitempty"`
	Approved     bool   `msgpack:"approved,omitempty"`
	Created      int64  `msgpack:"created"`
	Seq          uint64 `msgpack:"seq"`
	// Unopened marks, in a reader's fold, a user whose username and password hash are
	// sealed in the log under a key it does not have (no key file, or the user's data
	// key destroyed). Never stored.
	Unopened bool `msgpack:"-"`
}

// UsernameRecord maps a username to its user (key n.<enc(username)>).
type UsernameRecord struct {
	UserID string `msgpack:"uid"`
	Seq    uint64 `msgpack:"seq"`
}

// SessionRecord is a login session (key s.<sid>).
type SessionRecord struct {
	UserID     string `msgpack:"uid"`
	Created    int64  `msgpack:"created"`
	ExpiresAt  int64  `msgpack:"exp"`
	App        string `msgpack:"app,omitempty"`
	RemoteAddr string `msgpack:"addr,omitempty"`
	UserAgent  string `msgpack:"ua,omitempty"`
	Seq        uint64 `msgpack:"seq"`
	// Unopened marks, in a reader's fold, a session whose address and user agent are
	// sealed in the log under a key it does not have. Never stored.
	Unopened bool `msgpack:"-"`
}

// Live reports whether the session is live at t (Unix nanoseconds).
func (s *SessionRecord) Live(t int64) bool { return s != nil && s.ExpiresAt > t }

// SessionRefRecord lists a session under its user (key x.<uid>.<sid>), so that the
// fold can count a user's live sessions; it lives as long as the session.
type SessionRefRecord struct {
	ExpiresAt int64  `msgpack:"exp"`
	Seq       uint64 `msgpack:"seq"`
}

// AttrRecord is one attribute (key a.…). ExpiresAt 0 means never.
type AttrRecord struct {
	// One-letter names keep the record small (one per attribute in the bucket); the
	// aliases read the names an older attrd wrote.
	Value     []byte `msgpack:"v,alias:val"` // JSON text, or sealed when Encrypted
	Encrypted bool   `msgpack:"e,alias:enc,omitempty"`
	Created   int64  `msgpack:"c,alias:created"`
	Modified  int64  `msgpack:"m,alias:mod"`
	ExpiresAt int64  `msgpack:"x,alias:exp,omitempty"`
	Seq       uint64 `msgpack:"s,alias:seq"`
	// Unopened marks, in a reader's fold without the key file, a plain attribute whose
	// value is still sealed (an update that kept the attribute's setting): the record is
	// right but for its value, which only the key opens. Never stored.
	Unopened bool `msgpack:"-"`
}

// Live reports whether the attribute is live at t (Unix nanoseconds).
func (a *AttrRecord) Live(t int64) bool { return a != nil && (a.ExpiresAt == 0 || a.ExpiresAt > t) }

// Decision is the projector's verdict on one event: accepted (Code "") or rejected with
// a contract code. It is sent to the waiting caller and, for events with a request key,
// kept under d.<key> so that a retry learns it.
type Decision struct {
	Seq     uint64 `msgpack:"seq"`
	EventID string `msgpack:"id"`
	Code    Code   `msgpack:"code,omitempty"`
	// Result fields of the request, repeated so that a retry can answer as the first did.
	UserID    string `msgpack:"uid,omitempty"`
	ExpiresAt int64  `msgpack:"exp,omitempty"`
	// Fingerprint is the event's, so that a retry can be told from a reuse.
	Fingerprint string `msgpack:"fp,omitempty"`
}

// Checkpoint is the projector's intent record, written before the KV writes of every
// batch it folds: the batch's stream sequences, its decisions, and the state before it
// of every key it writes (attribute values left out, see projector). After a crash the
// projector re-folds the batch from this record, so a batch is applied exactly once.
type Checkpoint struct {
	First     uint64     `msgpack:"first"`
	Last      uint64     `msgpack:"last"`
	Decisions []Decision `msgpack:"decisions"`
	Before    []KeyState `msgpack:"before"`
}

// LeaseRecord is the projector lease's value (key l.<partition>): who folds the
// partition, and how far it has folded the log (written with every renewal).
type LeaseRecord struct {
	Owner   string `msgpack:"owner"`
	Applied uint64 `msgpack:"applied,omitempty"`
}

// PresenceRecord is an attrd instance's presence key's value (i.<instance>, with a TTL,
// renewed while the instance runs): who shares the partitions, and since when.
type PresenceRecord struct {
	Instance string `msgpack:"i"`
	Joined   int64  `msgpack:"j"` // Unix ns of the instance's start
	// Unsettled says the instance has not yet renewed its presence and read it back
	// without a failure for a while (it has just started, or its NATS node was cut off
	// and is catching up): no partition is assigned to it meanwhile. Records of older
	// versions lack it: settled.
	Unsettled bool `msgpack:"u,omitempty"`
}

// RecordingRecord says from which stream sequence on the projector records decisions:
// every event at or after Since that was rejected has a message on its user's
// DecisionSubject, and every other one was accepted. Events before Since (folded by an
// older attrd) have their decisions recomputed.
type RecordingRecord struct {
	Since uint64 `msgpack:"since"`
}

// KeyState is one key's state in a Checkpoint: Data is the record's msgpack (nil: absent).
type KeyState struct {
	Key  string `msgpack:"k"`
	Data []byte `msgpack:"d,omitempty"`
	// Rev is the key's revision in KV when Data was read from it; 0 when not known (an
	// attrd before December 2026, or a state a recovery carried over from an earlier
	// record). A recovery that finds KV past Rev by a record older than the batch knows
	// Data was read from a server that was behind (issue 17).
	Rev uint64 `msgpack:"r,omitempty"`
}

// RecordSeq returns the stream sequence of the event that last wrote a record; false
// for a value that is not a record of the projection.
func RecordSeq(rec any) (uint64, bool) {
	switch r := rec.(type) {
	case *UserRecord:
		return r.Seq, true
	case *UsernameRecord:
		return r.Seq, true
	case *SessionRecord:
		return r.Seq, true
	case *SessionRefRecord:
		return r.Seq, true
	case *AttrRecord:
		return r.Seq, true
	}
	return 0, false
}

// Marshal encodes a record.
func Marshal(v any) ([]byte, error) { return msgpack.Marshal(v) }

// Unmarshal decodes a record.
func Unmarshal(data []byte, v any) error { return msgpack.Unmarshal(data, v) }

// DecodeRecord decodes the value of a projection key into its record type, chosen by the
// key's prefix.
func DecodeRecord(key string, data []byte) (any, error) {
	var rec any
	switch {
	case len(key) > 2 && key[:2] == "u.":
		rec = &UserRecord{}
	case len(key) > 2 && key[:2] == "n.":
		rec = &UsernameRecord{}
	case len(key) > 2 && key[:2] == "s.":
		rec = &SessionRecord{}
	case len(key) > 2 && key[:2] == "a.":
		rec = &AttrRecord{}
	case len(key) > 2 && key[:2] == "x.":
		rec = &SessionRefRecord{}
	case len(key) > 2 && key[:2] == "d.":
		rec = &Decision{}
	case len(key) > 2 && key[:2] == "p.":
		rec = &Checkpoint{}
	case len(key) > 2 && key[:2] == "r.":
		rec = &RecordingRecord{}
	case len(key) > 2 && key[:2] == "l.":
		rec = &LeaseRecord{}
	case len(key) > 2 && key[:2] == "i.":
		rec = &PresenceRecord{}
	default:
		return nil, fmt.Errorf("unknown projection key %q", key)
	}
	if err := msgpack.Unmarshal(data, rec); err != nil {
		return nil, fmt.Errorf("decode %s: %w", key, err)
	}
	return rec, nil
}

// HeaderExpires carries an attribute record's expiry (Unix nanoseconds, "0": never) on
// its KV message, so that a listing can read names and liveness from headers alone,
// without the values. Only a message with a TTL (Nats-TTL) carries it: one with neither
// never expires, whichever attrd wrote it (RecordNeverExpires).
const HeaderExpires = "Attrd-Exp"

// RecordHeaders returns the headers a record's KV message carries (nil: none); ttl
// says whether the message has a TTL.
func RecordHeaders(rec any, ttl bool) map[string][]string {
	if a, ok := rec.(*AttrRecord); ok && (ttl || a.ExpiresAt != 0) {
		return map[string][]string{HeaderExpires: {strconv.FormatInt(a.ExpiresAt, 10)}}
	}
	return nil
}

// RecordExpiry reads an attribute record's expiry from its KV message's headers: ok is
// false when the headers cannot tell (an older attrd's record with a TTL), and the
// record must be read.
func RecordExpiry(h map[string][]string) (exp int64, ok bool) {
	if v := h[HeaderExpires]; len(v) > 0 {
		exp, err := strconv.ParseInt(v[0], 10, 64)
		return exp, err == nil
	}
	return 0, len(h[jetstream.MsgTTLHeader]) == 0
}
