package api

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
)

// Watch tickets. A browser's EventSource cannot send an Authorization header, and a
// UST in a URL ends up in access logs, proxies' logs and the browser's history. So the
// page asks for a ticket first (POST /attrd/watch/ticket, with its Bearer token), and
// opens the EventSource with ?ticket=…: the ticket is the caller's UST (and the target
// session's, for a session watch) sealed with a key only attrd instances hold, good
// for TicketTTL. Logged, it shows nothing and soon opens nothing; it opens only
// watches (an instance takes it on the watch routes alone), and each watch it opens
// checks the session again, so a logout ends it at once.

// OpWatchTicket is the ticket operation.
const OpWatchTicket Op = "watch.ticket"

// TicketTTL is how long a ticket opens watches: long enough for an EventSource's own
// reconnections after a dropped connection; past it the page asks for a new ticket.
const TicketTTL = 5 * time.Minute

// ticket is what a ticket seals.
type ticket struct {
	UST       string `json:"u"`
	TargetUST string `json:"t,omitempty"`
	UserID    string `json:"id,omitempty"`
	Session   bool   `json:"s,omitempty"`
	Expires   int64  `json:"x"`
}

const ticketAAD = "attrd watch ticket v1"

// tickets holds the sealing key, read (or made) once.
type tickets struct {
	mu   sync.Mutex
	aead cipher.AEAD
}

// WatchTicket answers a ticket request: the caller and target are checked as a watch
// checks them, then sealed into the ticket.
func (s *Service) WatchTicket(ctx context.Context, req *Request, m Meta) (rep Reply) {
	if m.CID == "" {
		m.CID = events.NewID()
	}
	start := time.Now()
	defer func() { s.metrics.answered(OpWatchTicket, m.Transport, rep, time.Since(start), "") }()
	tk, err := s.sealTicket(ctx, req)
	if err != nil {
		return ErrorReply(m.CID, err)
	}
	return Reply{Status: 200, Body: map[string]any{"cid": m.CID, "status": "ok", "ticket": tk, "expires_in": int(TicketTTL / time.Second)}}
}

func (s *Service) sealTicket(ctx context.Context, req *Request) (string, error) {
	if err := s.checkApp(req); err != nil {
		return "", err
	}
	session := req.TargetUST != ""
	ctx, _, err := s.readTarget(ctx, session, req)
	if err != nil {
		return "", err
	}
	ust := req.UST
	if session || ust == "" {
		ust = req.CurrentUST
	}
	body, err := json.Marshal(ticket{UST: ust, TargetUST: req.TargetUST, UserID: req.UserID, Session: session,
		Expires: time.Now().Add(TicketTTL).UnixNano()})
	if err != nil {
		return "", err
	}
	aead, err := s.tickets.key(ctx, s)
	if err != nil {
		return "", err
	}
	nonce := make([]byte, aead.NonceSize())
	rand.Read(nonce)
	return base64.RawURLEncoding.EncodeToString(aead.Seal(nonce, nonce, body, []byte(ticketAAD))), nil
}

// OpenTicket returns the fields a ticket stands for, to fill a watch request of the
// given kind (session or user attributes); an unreadable, expired or other kind's
// ticket is E007001, as a bad UST is.
func (s *Service) OpenTicket(ctx context.Context, tk string, session bool) (map[string]string, error) {
	bad := events.Errorf(events.CodeNoSession, "no such ticket, or an expired one")
	raw, err := base64.RawURLEncoding.DecodeString(tk)
	if err != nil || len(tk) > 4096 {
		return nil, bad
	}
	aead, err := s.tickets.key(ctx, s)
	if err != nil {
		return nil, err
	}
	if len(raw) < aead.NonceSize() {
		return nil, bad
	}
	body, err := aead.Open(nil, raw[:aead.NonceSize()], raw[aead.NonceSize():], []byte(ticketAAD))
	var t ticket
	if err != nil || json.Unmarshal(body, &t) != nil || t.Expires < time.Now().UnixNano() || t.Session != session {
		return nil, bad
	}
	if session {
		return map[string]string{"current_ust": t.UST, "target_ust": t.TargetUST}, nil
	}
	f := map[string]string{"ust": t.UST}
	if t.UserID != "" {
		f["user_id"] = t.UserID
	}
	return f, nil
}

// key returns the sealing key, reading it from the bucket, or making it there when
// no instance has yet (the first creation wins; the others read it). With a key file
// the bucket holds it sealed with the file's key, so a copy of the bucket opens no
// ticket; one the key file no longer opens (its key rotated out) is replaced, which
// voids the tickets of the last five minutes.
func (k *tickets) key(ctx context.Context, s *Service) (cipher.AEAD, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.aead != nil {
		return k.aead, nil
	}
	var raw []byte
	for range 3 {
		// From the bucket's leader: a replica behind would show no key (or an old one).
		m, err := s.leader.Get(ctx, events.KVStream(s.cfg.Bucket), leaderread.Request{LastBySubj: events.KVSubject(s.cfg.Bucket, events.TicketKeyKey)})
		var rev uint64
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
		case err != nil:
			return nil, err
		case events.IsMarker(m.Header):
			// Deleted: made again below (a create takes a deleted key's place).
		default:
			rev = m.Sequence
			if raw, err = s.openTicketKey(m.Data); err == nil {
				break
			}
			raw = nil // not opened: replaced below
		}
		if raw != nil {
			break
		}
		fresh := make([]byte, 32)
		rand.Read(fresh)
		stored, err := s.sealTicketKey(fresh)
		if err != nil {
			return nil, err
		}
		if rev == 0 {
			_, err = s.kv.Create(ctx, events.TicketKeyKey, stored)
		} else {
			_, err = s.kv.Update(ctx, events.TicketKeyKey, stored, rev)
		}
		if err == nil {
			raw = fresh
			break
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return nil, err
		}
		// Another instance made it first: read theirs.
	}
	if len(raw) != 32 {
		return nil, errors.New("the watch ticket key could not be read or made")
	}
	block, err := aes.NewCipher(raw)
	if err != nil {
		return nil, err
	}
	if k.aead, err = cipher.NewGCM(block); err != nil {
		return nil, err
	}
	return k.aead, nil
}

// ticketKeyAAD binds a sealed ticket key to its use.
var ticketKeyAAD = []byte("attrd watch ticket key")

// sealTicketKey is how the ticket key is stored: sealed with the key file's key, or as
// it is without a key file.
func (s *Service) sealTicketKey(raw []byte) ([]byte, error) {
	if s.cfg.Keyring == nil {
		return raw, nil
	}
	return s.cfg.Keyring.Seal(raw, ticketKeyAAD)
}

// openTicketKey reads a stored ticket key.
func (s *Service) openTicketKey(v []byte) ([]byte, error) {
	if s.cfg.Keyring == nil {
		if len(v) != 32 {
			return nil, errors.New("a ticket key is 32 bytes")
		}
		return v, nil
	}
	raw, err := s.cfg.Keyring.Open(v, ticketKeyAAD)
	if err == nil && len(raw) != 32 {
		err = errors.New("a ticket key is 32 bytes")
	}
	return raw, err
}
