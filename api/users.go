package api

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/attrd/attrd/events"
)

func formatTime(t int64) string { return time.Unix(0, t).UTC().Format(time.RFC3339Nano) }

func (s *Service) login(ctx context.Context, req *Request, m *Meta) (map[string]any, error) {
	denied := events.Errorf(events.CodeNotAllowed, "wrong username or password")
	// No password this long was ever set: refused before any lookup or hashing.
	if req.typeErr != nil || req.Username == "" || req.Password == "" || len(req.Password) > MaxPasswordBytes || len(req.Username) > MaxNameBytes {
		return nil, denied
	}
	// At most one check of this username, and a few from this address, in flight here:
	// a flood holds no more places in the password gate than that.
	good, u, err := s.logins.check(ctx, req.Username, req.Password, m.RemoteAddr, func() (bool, *events.UserRecord, error) {
		// A full password gate refuses before the reads that lead to it.
		if err := s.hashes.Admits(passwordGateKey(req.Username, m.RemoteAddr)); err != nil {
			return false, nil, err
		}
		return s.checkLogin(ctx, req, m)
	})
	if errors.Is(err, errLoginInFlight) {
		return nil, retryAfter(denied, time.Second)
	}
	if err != nil {
		return nil, err
	}
	if u == nil || !good || !u.Approved {
		if u != nil && !good {
			ev := (*caller)(nil).event(events.LoginFailed, *m)
			ev.UserID, ev.ActorName = u.UserID, u.Username
			s.recordDenied(ev)
		}
		return nil, denied
	}
	ust := NewUST()
	ev := (*caller)(nil).event(events.SessionCreated, *m)
	// The user logs itself in: the actor is the user, in the session it opens.
	ev.UserID, ev.SessionID = u.UserID, events.SessionID(ust)
	ev.Actor, ev.ActorSession, ev.ActorName = u.UserID, ev.SessionID, u.Username
	ev.Time = time.Now().UnixNano()
	ev.ExpiresAt = ev.Time + int64(min(s.cfg.SessionTTL, s.cfg.SessionMaxLifetime))
	ev.Cap = s.cfg.Limits.MaxSessionsPerUser
	if _, err := s.apply(ctx, ev); err != nil {
		switch events.CodeOf(err) {
		case events.CodeNotAllowed:
			return nil, denied // not approved meanwhile
		case events.CodeInvalidInput:
			return nil, events.Errorf(events.CodeInvalidInput, "the user has %d live sessions, the most allowed: log out of one first", ev.Cap)
		}
		return nil, err
	}
	if strings.HasPrefix(u.PasswordHash, PBKDF2Prefix) {
		s.rehash(ctx, u, ev.SessionID, req.Password, m)
	}
	return map[string]any{"ust": ust, "expiration_time": formatTime(ev.ExpiresAt)}, nil
}

// rehash replaces an imported password hash (passlib.go) with attrd's own, after a
// login that checked it: user.rehashed, the user as its actor. A failure is logged and
// leaves the imported hash, which the next login replaces.
func (s *Service) rehash(ctx context.Context, u *events.UserRecord, sid, password string, m *Meta) {
	hash, err := s.hashPassword(ctx, "r."+u.UserID, password)
	if err == nil {
		ev := (*caller)(nil).event(events.UserRehashed, *m)
		ev.UserID, ev.Actor, ev.ActorSession, ev.ActorName = u.UserID, u.UserID, sid, u.Username
		ev.User = &events.UserData{PasswordHash: hash}
		_, err = s.apply(ctx, ev)
	}
	if err != nil {
		s.log.Warn("an imported password hash was not replaced: the next login tries again", "user", u.UserID, "err", err)
	}
}

// checkLogin checks a login's password, unless the throttle refuses it first, and
// counts the outcome. u is nil for an unknown username.
func (s *Service) checkLogin(ctx context.Context, req *Request, m *Meta) (good bool, u *events.UserRecord, err error) {
	failedBefore := 0
	if s.throttle != nil {
		until, n, err := s.throttle.blocked(ctx, req.Username, m.RemoteAddr)
		if err != nil {
			// The counters are a guard, not a gate: without them, logins go on.
			s.log.Warn("login throttling unavailable", "err", err)
		}
		if !until.IsZero() {
			// Refused before any lookup or hashing, and told when to come back.
			return false, nil, retryAfter(events.Errorf(events.CodeNotAllowed, "throttled: too many failed logins"), time.Until(until))
		}
		failedBefore = n
	}
	r, err := s.read(ctx, events.UsernameKey(req.Username))
	if err != nil {
		return false, nil, err
	}
	if ur, ok := r.(*events.UsernameRecord); ok {
		if u, err = s.readUser(ctx, ur.UserID); err != nil {
			return false, nil, err
		}
	}
	hash := dummyHash // an unknown user costs as much as a wrong password
	if u != nil {
		hash = u.PasswordHash
	}
	if good, err = s.checkPassword(ctx, passwordGateKey(req.Username, m.RemoteAddr), req.Password, hash); err != nil {
		return false, nil, err
	}
	if s.throttle != nil {
		var terr error
		if !good {
			terr = s.throttle.failed(ctx, req.Username, m.RemoteAddr)
		} else if failedBefore > 0 {
			terr = s.throttle.succeeded(ctx, req.Username)
		}
		if terr != nil {
			s.log.Warn("login throttling not updated", "err", terr)
		}
	}
	return good, u, nil
}

// passwordGateKey is whose turn a login's password check waits for in the gate: its
// address's, or, when none is known, its username's.
func passwordGateKey(username, addr string) string {
	if addr == "" {
		return "u." + username
	}
	return "a." + addr
}

// retryAfter sets when the refused client may come back.
func retryAfter(err *events.Error, d time.Duration) *events.Error {
	err.RetryAfter = max(d, time.Second)
	return err
}

func (s *Service) logout(ctx context.Context, req *Request, m *Meta) (map[string]any, error) {
	// Always ok, so that a token's validity does not leak.
	if req.UST == "" {
		return nil, nil
	}
	sid := events.SessionID(req.UST)
	sess, err := s.readSession(ctx, sid)
	if err != nil || sess == nil {
		return nil, err
	}
	ev := &events.Event{Type: events.SessionEnded, UserID: sess.UserID, SessionID: sid, Actor: sess.UserID,
		ActorSession: sid, CID: m.CID, App: m.App, RemoteAddr: m.RemoteAddr, UserAgent: m.UserAgent}
	if u, err := s.readUser(ctx, sess.UserID); err == nil && u != nil {
		ev.ActorName = u.Username
	}
	_, err = s.commit(ctx, ev)
	s.sessions.forget(sid, "") // this instance stops honouring it at once
	return nil, err
}

func (s *Service) whoAmI(ctx context.Context, req *Request) (map[string]any, error) {
	ctx, err := s.reading(ctx)
	if err != nil {
		return nil, err
	}
	c, err := s.authenticate(ctx, req.UST)
	if err != nil {
		return nil, err
	}
	return map[string]any{"user_id": c.user.UserID, "username": c.user.Username,
		"is_super_user": c.user.SuperUser, "creation_time": formatTime(c.user.Created)}, nil
}

// superUser authenticates a caller that must be a super-user.
func (s *Service) superUser(ctx context.Context, ust string) (*caller, error) {
	c, err := s.authenticate(ctx, ust)
	if err != nil {
		return nil, err
	}
	if !c.user.SuperUser {
		return nil, events.Errorf(events.CodeNotAllowed, "a super-user is required")
	}
	return c, nil
}

func (s *Service) createUser(ctx context.Context, req *Request, m *Meta) (map[string]any, error) {
	c, err := s.superUser(ctx, req.UST)
	if err != nil {
		return nil, err
	}
	if req.typeErr != nil {
		return nil, req.typeErr
	}
	super := req.IsSuperUser != nil && *req.IsSuperUser
	ev := c.event(events.UserCreated, *m)
	ev.RequestKey = c.requestKey(req.RequestID)
	d, err := s.newUser(ctx, ev, req.Username, req.Password, super)
	if err != nil {
		return nil, err
	}
	return map[string]any{"user_id": d.UserID}, nil
}

// newUser appends user.created for ev's actor (nil actor: attrd itself). Users created
// by a super-user (or by attrd) are approved.
func (s *Service) newUser(ctx context.Context, ev *events.Event, username, password string, super bool) (events.Decision, error) {
	if username == "" || len(username) > MaxNameBytes || ValidateName(username) != nil {
		return events.Decision{}, events.Errorf(events.CodeInvalidInput, "a username has 1 to %d bytes and no control characters", MaxNameBytes)
	}
	if password == "" || len(password) > MaxPasswordBytes {
		return events.Decision{}, events.Errorf(events.CodeInvalidInput, "a password has 1 to %d bytes", MaxPasswordBytes)
	}
	// The gate serves creators in turn (attrd itself: the operator's tools).
	hash, err := s.hashPassword(ctx, "c."+ev.Actor, password)
	if err != nil {
		return events.Decision{}, err
	}
	ev.UserID = events.NewID()
	ev.User = &events.UserData{Username: username, PasswordHash: hash, SuperUser: super, Approved: true}
	return s.apply(ctx, ev)
}

func (s *Service) approveUser(ctx context.Context, req *Request, m *Meta) (map[string]any, error) {
	c, err := s.superUser(ctx, req.UST)
	if err != nil {
		return nil, err
	}
	ev := c.event(events.UserApproved, *m)
	ev.UserID = req.UserID
	ev.RequestKey = c.requestKey(req.RequestID)
	if !events.ValidUserID(req.UserID) {
		return nil, events.Errorf(events.CodeNotAllowed, "no such user")
	}
	if u, err := s.readUser(ctx, req.UserID); err != nil || u == nil {
		if err == nil {
			err = events.Errorf(events.CodeNotAllowed, "no such user")
		}
		return nil, err
	}
	_, err = s.apply(ctx, ev)
	return nil, err
}

func (s *Service) renew(ctx context.Context, req *Request, m *Meta) (map[string]any, error) {
	c, err := s.authenticate(ctx, req.UST)
	if err != nil {
		return nil, err
	}
	ev := c.event(events.SessionRenewed, *m)
	ev.UserID, ev.SessionID = c.user.UserID, c.sid
	ev.RequestKey = c.requestKey(req.RequestID)
	ev.Time = time.Now().UnixNano()
	// Never past the session's absolute lifetime: a renewal that cannot extend it
	// answers the end it has and appends nothing.
	ev.ExpiresAt = min(ev.Time+int64(s.cfg.SessionTTL), c.session.Created+int64(s.cfg.SessionMaxLifetime))
	if ev.ExpiresAt <= c.session.ExpiresAt {
		return map[string]any{"expiration_time": formatTime(c.session.ExpiresAt)}, nil
	}
	d, err := s.apply(ctx, ev)
	if err != nil {
		return nil, err
	}
	return map[string]any{"expiration_time": formatTime(d.ExpiresAt)}, nil
}

// EnsureAdmin creates a super-user if there is no user at all. An empty password gets
// a random one, which is returned. created is false when users exist already.
func (s *Service) EnsureAdmin(ctx context.Context, username, password string) (created bool, pw string, err error) {
	lister, err := s.kv.ListKeysFiltered(ctx, "u.>")
	if err != nil {
		return false, "", err
	}
	for range lister.Keys() {
		_ = lister.Stop()
		return false, "", nil
	}
	if password == "" {
		password = NewUST()[:20]
	}
	if _, err := s.CreateUser(ctx, username, password, true); err != nil {
		if errors.Is(err, events.ErrUsernameExists) {
			return false, "", nil // another instance made it first
		}
		return false, "", err
	}
	return true, password, nil
}

// CreateUser creates an approved user as attrd itself (the operator's CLI, the first
// super-user) and returns its id.
func (s *Service) CreateUser(ctx context.Context, username, password string, super bool) (string, error) {
	ev := &events.Event{Type: events.UserCreated, App: "attrd", CID: events.NewID()}
	d, err := s.newUser(ctx, ev, username, password, super)
	return d.UserID, err
}
