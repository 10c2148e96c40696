package api

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"strings"
	"time"

	"golang.org/x/crypto/argon2"

	"github.com/attrd/attrd/events"
)

// PasswordParams is the argon2id cost of a password hash.
type PasswordParams struct {
	Time    uint32
	MemoryK uint32 // KiB
	Threads uint8
}

// DefaultPasswordParams follows OWASP's argon2id minimum (19 MiB, 2 passes, 1 lane).
var DefaultPasswordParams = PasswordParams{Time: 2, MemoryK: 19 * 1024, Threads: 1}

// HashPassword returns an argon2id hash in the PHC string form.
func HashPassword(password string, p PasswordParams) (string, error) {
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return "", err
	}
	key := argon2.IDKey([]byte(password), salt, p.Time, p.MemoryK, p.Threads, 32)
	b64 := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, p.MemoryK, p.Time, p.Threads,
		b64.EncodeToString(salt), b64.EncodeToString(key)), nil
}

// CheckPassword reports whether password matches a hash made by HashPassword, or an
// imported one (passlib.go).
func CheckPassword(password, hash string) bool {
	if strings.HasPrefix(hash, PBKDF2Prefix) {
		return checkPBKDF2(password, hash)
	}
	parts := strings.Split(hash, "$")
	if len(parts) != 6 || parts[1] != "argon2id" {
		return false
	}
	var p PasswordParams
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &p.MemoryK, &p.Time, &p.Threads); err != nil {
		return false
	}
	b64 := base64.RawStdEncoding
	salt, err1 := b64.DecodeString(parts[4])
	want, err2 := b64.DecodeString(parts[5])
	if err1 != nil || err2 != nil {
		return false
	}
	got := argon2.IDKey([]byte(password), salt, p.Time, p.MemoryK, p.Threads, uint32(len(want)))
	return subtle.ConstantTimeCompare(got, want) == 1
}

// dummyHash is checked against when a username is unknown, so that a login takes as
// long for an unknown user as for a wrong password.
var dummyHash, _ = HashPassword("attrd-dummy", DefaultPasswordParams)

// NewUST returns a new user session token: 32 random bytes, URL-safe base64.
func NewUST() string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// caller is who sent a request: a live session and its user.
type caller struct {
	sid     string
	session *events.SessionRecord
	user    *events.UserRecord
}

// authenticate resolves a UST to a live session and its user; anything else is
// ErrNoSession.
func (s *Service) authenticate(ctx context.Context, ust string) (*caller, error) {
	if ust == "" {
		return nil, events.Errorf(events.CodeNoSession, "no session token")
	}
	sid := events.SessionID(ust)
	now := time.Now().UnixNano()
	if sess, u, ok := s.localSession(sid); ok && readFloor(ctx) == 0 {
		// This instance folds the session's partition: its records are the latest
		// committed, a logout's effect included, without the cache's delay. (Not for a
		// read through the read index: a projector deposed without knowing it yet
		// would answer old.)
		if !sess.Live(now) || u == nil || !u.Approved {
			return nil, events.Errorf(events.CodeNoSession, "no such session")
		}
		return &caller{sid: sid, session: sess, user: u}, nil
	}
	// A write may take the cache's word (the fold checks the session again); a read
	// reads afresh, so that it never honours a session ended elsewhere (quorum.go).
	var sess *events.SessionRecord
	var u *events.UserRecord
	fresh, cached := false, false
	if !isRead(ctx) {
		sess, u, fresh, cached = s.sessions.get(sid)
	}
	// The cache answers only "live": a cached session that looks ended may have been
	// renewed by another instance a moment ago, so KV decides before a refusal.
	if !fresh || !sess.Live(now) {
		ks, ku, err := s.readSessionAndUser(ctx, sid)
		switch {
		case err == nil:
			sess, u = ks, ku
		case cached && sess.Live(now) && Unavailable(err):
			// KV cannot answer now, and the NATS node this instance talks to may be
			// the one that says so (a node healed from a network cut answers a
			// stream's API requests "temporarily unavailable" until its Raft group
			// has caught up with the leader, seconds after its routes are back,
			// while events already reach the stream): a write takes the cache's
			// older word, since the fold checks the session again (issue 21).
		default:
			return nil, err
		}
	}
	if !sess.Live(now) || u == nil || !u.Approved {
		return nil, events.Errorf(events.CodeNoSession, "no such session")
	}
	return &caller{sid: sid, session: sess, user: u}, nil
}

// readSessionAndUser reads a session and its user from KV, and caches both.
func (s *Service) readSessionAndUser(ctx context.Context, sid string) (*events.SessionRecord, *events.UserRecord, error) {
	if floor := readFloor(ctx); floor > 0 {
		// Through the read index: both in one request when the cache names the
		// session's user (checked against the session read).
		if cached, _, _, ok := s.sessions.get(sid); ok && cached != nil {
			uk, sk := events.UserKey(cached.UserID), events.SessionKey(sid)
			recs, ok, err := s.readIndexedKeys(ctx, []string{sk, uk}, floor)
			if err != nil {
				return nil, nil, err
			}
			sess, _ := recs[sk].(*events.SessionRecord)
			u, _ := recs[uk].(*events.UserRecord)
			if ok && (sess == nil || sess.UserID == cached.UserID) {
				if sess == nil {
					return nil, nil, nil
				}
				if u != nil {
					s.sessions.put(sid, sess, u)
				}
				return sess, u, nil
			}
		}
	}
	sess, err := s.readSession(ctx, sid)
	if err != nil || sess == nil {
		return nil, nil, err
	}
	u, err := s.readUser(ctx, sess.UserID)
	if err != nil {
		return nil, nil, err
	}
	if u != nil {
		s.sessions.put(sid, sess, u)
	}
	return sess, u, nil
}

// localSession reads a session and its user from this instance's projectors, when
// they hold both as the latest committed records (ok false: they cannot say).
func (s *Service) localSession(sid string) (*events.SessionRecord, *events.UserRecord, bool) {
	if s.cfg.Local == nil {
		return nil, nil, false
	}
	r, ok := s.cfg.Local.Read(events.SessionKey(sid))
	sess, _ := r.(*events.SessionRecord)
	if !ok || sess == nil {
		return nil, nil, false // absent sessions are not local knowledge: ask KV
	}
	r, ok = s.cfg.Local.Read(events.UserKey(sess.UserID))
	u, _ := r.(*events.UserRecord)
	return sess, u, ok
}

// event returns an event acted by c with the request's metadata.
func (c *caller) event(t events.Type, m Meta) *events.Event {
	ev := &events.Event{Type: t, CID: m.CID, App: m.App, RemoteAddr: m.RemoteAddr, UserAgent: m.UserAgent, Fingerprint: m.Fingerprint}
	if c != nil {
		ev.Actor, ev.ActorSession, ev.ActorName = c.user.UserID, c.sid, c.user.Username
	}
	return ev
}

// requestKey scopes a request id to the caller.
func (c *caller) requestKey(requestID string) string {
	if requestID == "" {
		return ""
	}
	return events.RequestKey(c.user.UserID, requestID)
}
