package events

import (
	"bufio"
	"crypto/rand"
	"fmt"
	"sync"
	"time"

	"github.com/oklog/ulid/v2"
	"github.com/vmihailenco/msgpack/v5"
)

// Type is an event's wire name. Wire names are part of the released contract for audit
// consumers: never rename one, add a new one instead.
type Type string

// Event types.
const (
	UserCreated  Type = "user.created"
	UserApproved Type = "user.approved"
	// UserDeleted erases a user: the user's sessions end, their attributes and the
	// user's record go, and the username is free again (docs/EVENTS.md).
	UserDeleted Type = "user.deleted"
	// UserRehashed replaces a user's password hash with attrd's own (argon2id), made at
	// the first login that checked a hash imported from elsewhere (attrd import).
	UserRehashed   Type = "user.rehashed"
	SessionCreated Type = "session.created"
	SessionRenewed Type = "session.renewed"
	SessionEnded   Type = "session.ended"
	AttrCreated    Type = "attr.created"
	AttrUpdated    Type = "attr.updated"
	AttrSet        Type = "attr.set"
	AttrDeleted    Type = "attr.deleted"
	// LoginFailed records a wrong password for an existing user; AccessDenied a request
	// refused before the log as another user's data (E005001). Both change nothing;
	// they are there for audits, and their number per user and per address is bounded.
	LoginFailed  Type = "login.failed"
	AccessDenied Type = "access.denied"
)

// SchemaVersion is the version written into new events (header Attrd-Event-Version and
// field "v"). Decode upgrades every older version it knows to this one:
//
//	1  the first released format
//	2  adds actor_name, the acting user's username, for audits
//	3  seals what is personal (usernames, password hashes, values, addresses, user
//	   agents) with its person's data key, in pii and apii (personal.go)
const SchemaVersion = 3

// Headers carried by event messages.
const (
	HeaderType    = "Attrd-Event-Type"
	HeaderVersion = "Attrd-Event-Version"
	// HeaderReply names the inbox of the attrd instance waiting for this event's
	// decision. It travels with the event so that the decision reaches the instance that
	// appended it, wherever the projector runs. The projector sends each inbox one
	// message per batch: a msgpack list of Decisions, which carry their event ids.
	HeaderReply = "Attrd-Reply"
)

// EncMode says how an attribute item's value is stored.
type EncMode uint8

const (
	// Plain: Value is the JSON text of the value.
	Plain EncMode = 0
	// Encrypted: Value is sealed (see package sealed) and is stored sealed.
	Encrypted EncMode = 1
	// Inherit: Value is sealed, and is stored sealed if the attribute is encrypted when
	// the event is folded, or opened and stored plain if it is not (an update or set that
	// did not say encrypt). Plaintext of a value that may belong to an encrypted
	// attribute thus never enters the log.
	Inherit EncMode = 2
)

// AttrItem is one attribute of an attribute event.
type AttrItem struct {
	Name  string  `msgpack:"n"`
	Value []byte  `msgpack:"val,omitempty"`
	Enc   EncMode `msgpack:"enc,omitempty"`
	// ExpiresAt is absolute (Unix nanoseconds), computed from the event's time and the
	// request's expiration. 0 means "not given": never on create, keep on update.
	ExpiresAt int64 `msgpack:"exp,omitempty"`
	// Created and Modified are, in an imported attr.created (Event.Imported), the
	// attribute's times in the system it came from (Unix ns); ignored otherwise.
	Created  int64 `msgpack:"c,omitempty"`
	Modified int64 `msgpack:"m,omitempty"`
}

// Imported says where an imported event's data came from (attrd import).
type Imported struct {
	From string `msgpack:"from"`         // the source system, for example "zato"
	ID   string `msgpack:"id,omitempty"` // the user's id there
}

// UserData is the body of user.created.
type UserData struct {
	Username     string `msgpack:"username"`
	PasswordHash string `msgpack:"pwhash"`
	SuperUser    bool   `msgpack:"super,omitempty"`
	Approved     bool   `msgpack:"approved,omitempty"`
	// Created is, in an imported user.created (Event.Imported), when the user was
	// created in the system it came from (Unix ns); ignored otherwise.
	Created int64 `msgpack:"created,omitempty"`
}

// Event is one entry of the log. One request is one event, so a batch is atomic by
// construction. Fields that do not apply to a type are empty.
type Event struct {
	ID      string `msgpack:"id"` // ULID
	Type    Type   `msgpack:"type"`
	Version int    `msgpack:"v"`
	Time    int64  `msgpack:"ts"` // Unix nanoseconds, set when the request was accepted

	UserID    string `msgpack:"uid"`           // whose data: the target user
	SessionID string `msgpack:"sid,omitempty"` // the target session, for session events and session attributes

	Actor        string `msgpack:"actor,omitempty"`      // the caller's user id ("" for the system)
	ActorSession string `msgpack:"asid,omitempty"`       // the caller's session id
	ActorName    string `msgpack:"actor_name,omitempty"` // the caller's username (version 2)
	App          string `msgpack:"app,omitempty"`
	RemoteAddr   string `msgpack:"addr,omitempty"`
	UserAgent    string `msgpack:"ua,omitempty"`
	CID          string `msgpack:"cid,omitempty"`
	// RequestKey is set when the caller gave a request id: the event's Nats-Msg-Id, and
	// the key under which its decision is kept for retries.
	RequestKey string `msgpack:"rk,omitempty"`
	// Fingerprint identifies the request behind a request key (its operation, target
	// and body, see api): a retry has the same, another request reusing the request id
	// does not, and is refused instead of answered with this event's outcome.
	Fingerprint string `msgpack:"fp,omitempty"`

	// Cap is what one owner may hold, as configured when the request was accepted: for
	// attr.created and attr.set the live attributes of the target (user or session),
	// for session.created the user's live sessions. 0: no cap. Carried in the event so
	// that a replay decides as the live fold did, whatever the replaying configuration.
	Cap int `msgpack:"cap,omitempty"`

	// Op is the refused operation of an access.denied (for example user.attr.get).
	Op string `msgpack:"op,omitempty"`

	User *UserData `msgpack:"user,omitempty"` // user.created; user.rehashed (the new hash)
	// Imported marks an event of attrd import: where its data came from.
	Imported  *Imported  `msgpack:"imp,omitempty"`
	ExpiresAt int64      `msgpack:"exp,omitempty"` // session.created, session.renewed
	Attrs     []AttrItem `msgpack:"attrs,omitempty"`

	// PII and APII hold, sealed, what is personal of the event's user and of its actor
	// (version 3, personal.go): until OpenPersonal opens them, the fields they hold
	// are empty.
	PII  []byte `msgpack:"pii,omitempty"`
	APII []byte `msgpack:"apii,omitempty"`
	// Erased, after OpenPersonal, says a sealed part could not be opened: its person's
	// data key is destroyed (the user was deleted) or the reader has none. Never stored.
	Erased bool `msgpack:"-"`
}

// At returns the event's time.
func (e *Event) At() time.Time { return time.Unix(0, e.Time).UTC() }

// IsSessionScope reports whether an attribute event is about session attributes.
func (e *Event) IsSessionScope() bool { return e.SessionID != "" }

// NewID returns a new ULID string. Its random part comes from the system's secure
// source, read 4 KiB at a time: an ID is made for every request and event, and a read
// of the source for each one was a system call each (1–2% of the CPU under load).
func NewID() string {
	idMu.Lock()
	defer idMu.Unlock()
	return ulid.MustNew(ulid.Now(), idEntropy).String()
}

var (
	idMu      sync.Mutex
	idEntropy = bufio.NewReaderSize(rand.Reader, 4096)
)

// Encode returns the msgpack form of e.
func Encode(e *Event) ([]byte, error) { return msgpack.Marshal(e) }

// Decode reads an event written by any known schema version and upgrades it to the
// current one. version is the Attrd-Event-Version header (0 if absent: the field wins).
func Decode(data []byte) (*Event, error) {
	var e Event
	if err := msgpack.Unmarshal(data, &e); err != nil {
		return nil, fmt.Errorf("decode event: %w", err)
	}
	if err := upgrade(&e); err != nil {
		return nil, err
	}
	return &e, nil
}

// upgrade turns an event of an older schema version into the current one, one version
// at a time, so that every released event replays.
func upgrade(e *Event) error {
	if e.Version < 1 || e.Version > SchemaVersion {
		return fmt.Errorf("event %s: unknown schema version %d", e.ID, e.Version)
	}
	for e.Version < SchemaVersion {
		switch e.Version {
		case 1:
			// Version 1 did not record the actor's username: it stays unknown ("").
		case 2:
			// Version 2 holds personal data in clear: nothing to open.
		}
		e.Version++
	}
	return nil
}
