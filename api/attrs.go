package api

import (
	"context"
	"math"
	"time"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// target is whose attributes a request reaches.
type target struct {
	c   *caller
	uid string
	sid string // "" for user attributes
	// session is the target session's record (session attributes), as resolve read it.
	session *events.SessionRecord
}

// resolve authenticates the caller of an attribute request and finds its target,
// enforcing invariant 6.
func (s *Service) resolve(ctx context.Context, session bool, req *Request) (*target, error) {
	if session {
		if err := require(req, "current_ust", "target_ust"); err != nil {
			return nil, err
		}
		c, err := s.authenticate(ctx, req.CurrentUST)
		if err != nil {
			return nil, err
		}
		sid := events.SessionID(req.TargetUST)
		ts := c.session
		if sid != c.sid {
			if ts, err = s.readSession(ctx, sid); err != nil {
				return nil, err
			}
			if !ts.Live(time.Now().UnixNano()) {
				return nil, events.Errorf(events.CodeNoSession, "no such target session")
			}
		}
		if ts.UserID != c.user.UserID && !c.user.SuperUser {
			return nil, events.Errorf(events.CodeNotAllowed, "another user's session%w", &accessDenied{c, ts.UserID, sid})
		}
		return &target{c: c, uid: ts.UserID, sid: sid, session: ts}, nil
	}
	c, uid, err := s.userCaller(ctx, req)
	if err != nil {
		return nil, err
	}
	if uid != c.user.UserID {
		u, err := s.readUser(ctx, uid)
		if err != nil {
			return nil, err
		}
		if u == nil {
			return nil, events.Errorf(events.CodeNotAllowed, "no such user")
		}
	}
	return &target{c: c, uid: uid}, nil
}

// userCaller authenticates the caller of a user endpoint (ust, or its synonym
// current_ust) and returns whose data it asks for: its own, or, for a super-user, the
// user_id it names. A user id goes into keys and subject filters, so only a well-formed
// one is taken (no dots, no wildcards).
func (s *Service) userCaller(ctx context.Context, req *Request) (*caller, string, error) {
	if !req.Has("ust") && !req.Has("current_ust") {
		return nil, "", badRequest("missing field ust")
	}
	ust := req.UST
	if ust == "" {
		ust = req.CurrentUST
	}
	c, err := s.authenticate(ctx, ust)
	if err != nil {
		return nil, "", err
	}
	if req.UserID == "" || req.UserID == c.user.UserID {
		return c, c.user.UserID, nil
	}
	if !c.user.SuperUser || !events.ValidUserID(req.UserID) {
		return nil, "", events.Errorf(events.CodeNotAllowed, "another user's data, or no such user%w", &accessDenied{c, req.UserID, ""})
	}
	return c, req.UserID, nil
}

// readTarget admits a read (quorum.go) and resolves its target, for get, exists,
// names, a watch and a watch ticket.
func (s *Service) readTarget(ctx context.Context, session bool, req *Request) (context.Context, *target, error) {
	ctx, err := s.reading(ctx)
	if err != nil {
		return ctx, nil, err
	}
	ctx = s.prefetch(ctx, session, req)
	t, err := s.resolve(ctx, session, req)
	if err == nil && req.typeErr != nil {
		err = req.typeErr
	}
	return ctx, t, err
}

// checkApp refuses a request without current_app (400) or with an unknown one.
func (s *Service) checkApp(req *Request) error {
	if err := require(req, "current_app"); err != nil {
		return err
	}
	if !s.AppAllowed(req.CurrentApp) {
		return events.Errorf(events.CodeBadApp, "unknown application %q", req.CurrentApp)
	}
	return nil
}

func (s *Service) attr(ctx context.Context, session bool, verb string, req *Request, m *Meta) (map[string]any, error) {
	var t *target
	var err error
	switch verb {
	case VerbGet, VerbExists, VerbNames:
		ctx, t, err = s.readTarget(ctx, session, req)
	default:
		if t, err = s.resolve(ctx, session, req); err == nil && req.typeErr != nil {
			err = req.typeErr
		}
	}
	if err != nil {
		return nil, err
	}
	switch verb {
	case VerbCreate, VerbUpdate, VerbSet:
		return nil, s.writeAttrs(ctx, t, verb, req, m)
	case VerbDelete:
		names, _, err := req.names(s.cfg.Limits)
		if err != nil {
			return nil, err
		}
		if len(names) == 0 {
			return nil, events.Errorf(events.CodeInvalidInput, "data is empty")
		}
		ev := t.event(events.AttrDeleted, *m, req)
		for _, n := range names {
			ev.Attrs = append(ev.Attrs, events.AttrItem{Name: n})
		}
		_, err = s.apply(ctx, ev)
		return nil, err
	case VerbGet, VerbExists:
		return s.readAttrs(ctx, t, verb, req)
	case VerbNames:
		return s.names(ctx, t, req)
	}
	return nil, badRequest("unknown verb %q", verb)
}

func (t *target) event(typ events.Type, m Meta, req *Request) *events.Event {
	ev := t.c.event(typ, m)
	ev.UserID, ev.SessionID = t.uid, t.sid
	ev.RequestKey = t.c.requestKey(req.RequestID)
	return ev
}

var eventOfVerb = map[string]events.Type{VerbCreate: events.AttrCreated, VerbUpdate: events.AttrUpdated, VerbSet: events.AttrSet}

// writeAttrs turns create, update and set into one event: the batch is one message, so
// it is applied all or nothing.
func (s *Service) writeAttrs(ctx context.Context, t *target, verb string, req *Request, m *Meta) error {
	items, err := req.items(s.cfg.Limits)
	if err != nil {
		return err
	}
	ev := t.event(eventOfVerb[verb], *m, req)
	ev.Time = time.Now().UnixNano()
	if verb != VerbUpdate {
		ev.Cap = s.cfg.Limits.MaxAttrsPerUser
		if t.sid != "" {
			ev.Cap = s.cfg.Limits.MaxAttrsPerSession
		}
	}
	ev.Attrs = make([]events.AttrItem, len(items))
	for i, it := range items {
		ai := events.AttrItem{Name: it.Name, Value: it.Value}
		if it.Expiration != nil && *it.Expiration > 0 {
			// Seconds become an absolute time in nanoseconds: one that int64 cannot hold
			// would wrap into the past and destroy the attribute.
			if *it.Expiration > (math.MaxInt64-ev.Time)/int64(time.Second) {
				return events.Errorf(events.CodeInvalidInput, "the expiration of %q (%d s) is too far away", it.Name, *it.Expiration)
			}
			ai.ExpiresAt = ev.Time + *it.Expiration*int64(time.Second)
		}
		seal := it.Encrypt != nil && *it.Encrypt
		switch {
		case seal:
			ai.Enc = events.Encrypted
		case it.Encrypt == nil && verb != VerbCreate && s.cfg.Keyring != nil:
			// Update and set without encrypt keep the attribute's setting, which only
			// the projector knows for sure: the value enters the log sealed either way.
			ai.Enc, seal = events.Inherit, true
		case it.Encrypt == nil && verb != VerbCreate:
			// No key ring: nothing can become encrypted (encrypt:true is refused), so the
			// attribute's current record says whether keeping its setting is possible.
			if err := s.refuseIfEncrypted(ctx, t, it.Name); err != nil {
				return err
			}
		}
		if seal {
			if s.cfg.Keyring == nil {
				return events.Errorf(events.CodeInvalidInput, "encryption is not configured")
			}
			if ai.Value, err = s.sealValue(ctx, t.uid, it.Value, sealed.AAD(t.uid, t.sid, it.Name)); err != nil {
				return err
			}
		}
		ev.Attrs[i] = ai
	}
	_, err = s.apply(ctx, ev)
	return err
}

// refuseIfEncrypted refuses a write that would keep an attribute encrypted when there
// is no key to seal its new value with.
func (s *Service) refuseIfEncrypted(ctx context.Context, t *target, name string) error {
	r, err := s.read(ctx, events.AttrKey(t.uid, t.sid, name))
	if err != nil {
		return err
	}
	if a, ok := r.(*events.AttrRecord); ok && a.Encrypted && a.Live(time.Now().UnixNano()) {
		return events.Errorf(events.CodeInvalidInput, "%q is encrypted and encryption is not configured", name)
	}
	return nil
}
