package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// Op names an operation. The NATS subject of an operation is "attrd." + Op.
type Op string

// Operations on users and sessions.
const (
	OpLogin        Op = "user.login"
	OpLogout       Op = "user.logout"
	OpWhoAmI       Op = "user.get"
	OpUserCreate   Op = "user.create"
	OpUserApprove  Op = "user.approve"
	OpSessionRenew Op = "session.renew"
)

// Attribute verbs.
const (
	VerbCreate = "create"
	VerbUpdate = "update"
	VerbSet    = "set"
	VerbGet    = "get"
	VerbDelete = "delete"
	VerbExists = "exists"
	VerbNames  = "names"
)

// Verbs lists the attribute verbs.
var Verbs = []string{VerbCreate, VerbUpdate, VerbSet, VerbGet, VerbDelete, VerbExists, VerbNames}

// UserAttrOp names an operation on user attributes.
func UserAttrOp(verb string) Op { return Op("user.attr." + verb) }

// SessionAttrOp names an operation on session attributes.
func SessionAttrOp(verb string) Op { return Op("session.attr." + verb) }

// Ops lists every operation.
func Ops() []Op {
	ops := []Op{OpLogin, OpLogout, OpWhoAmI, OpUserCreate, OpUserApprove, OpSessionRenew, OpHistory, OpHistoryAt}
	for _, v := range Verbs {
		ops = append(ops, UserAttrOp(v), SessionAttrOp(v))
	}
	return ops
}

// Meta is what a transport knows of a request besides its body.
type Meta struct {
	CID        string // the correlation id, a ULID
	App        string // filled from the body
	RemoteAddr string
	UserAgent  string
	RequestID  string // from a transport header (Idempotency-Key, Nats-Msg-Id)
}

// Reply is an operation's answer: the HTTP status REST gives it and the JSON body.
type Reply struct {
	Status int
	Code   events.Code // "" when ok
	Body   map[string]any
}

// NeverExpires is how "no expiry" is written.
const NeverExpires = "9999-12-31T00:00:00Z"

// Handle runs op. Every error becomes the contract's reply; nothing panics out of it.
func (s *Service) Handle(ctx context.Context, op Op, req *Request, m Meta) (rep Reply) {
	if m.CID == "" {
		m.CID = events.NewID()
	}
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("request panicked", "cid", m.CID, "op", op, "panic", fmt.Sprint(p))
			rep = ErrorReply(m.CID, fmt.Errorf("panic: %v", p))
		}
	}()
	out, err := s.handle(ctx, op, req, &m)
	if err != nil {
		if c := events.CodeOf(err); c == events.CodeInternal {
			s.log.Error("request failed", "cid", m.CID, "op", op, "err", err)
		} else {
			s.log.Debug("request refused", "cid", m.CID, "op", op, "code", c, "err", err)
		}
		return ErrorReply(m.CID, err)
	}
	if out == nil {
		out = map[string]any{}
	}
	out["cid"] = m.CID
	out["status"] = "ok"
	return Reply{Status: 200, Body: out}
}

// ErrorReply maps an error to the contract's status and body; every transport uses it.
func ErrorReply(cid string, err error) Reply {
	code := events.CodeOf(err)
	switch code {
	case events.CodeBadRequest:
		return Reply{Status: 400, Code: code, Body: map[string]any{"result": "Error", "cid": cid, "details": "Bad request"}}
	case events.CodeInternal:
		return Reply{Status: 500, Code: code, Body: map[string]any{"result": "Error", "cid": cid, "details": "Internal error"}}
	}
	status := 403
	switch code {
	case events.CodeBadApp:
		status = 200
	case events.CodeOutcomeUnknown:
		status = 503
	}
	return Reply{Status: status, Code: code, Body: map[string]any{"cid": cid, "status": "error", "sub_status": []string{string(code)}}}
}

func badRequest(format string, args ...any) error {
	return events.Errorf(events.CodeBadRequest, format, args...)
}

// require checks that the body has the fields; a missing one is the 400 reply.
func require(req *Request, fields ...string) error {
	for _, f := range fields {
		if !req.Has(f) {
			return badRequest("missing field %s", f)
		}
	}
	return nil
}

func (s *Service) handle(ctx context.Context, op Op, req *Request, m *Meta) (map[string]any, error) {
	if err := require(req, "current_app"); err != nil {
		return nil, err
	}
	switch op {
	case OpLogin:
		if err := require(req, "username", "password"); err != nil {
			return nil, err
		}
	case OpLogout, OpWhoAmI, OpSessionRenew:
		if err := require(req, "ust"); err != nil {
			return nil, err
		}
	case OpUserCreate:
		if err := require(req, "ust", "username", "password"); err != nil {
			return nil, err
		}
	case OpUserApprove:
		if err := require(req, "ust", "user_id"); err != nil {
			return nil, err
		}
	}
	if !s.AppAllowed(req.CurrentApp) {
		return nil, events.Errorf(events.CodeBadApp, "unknown application %q", req.CurrentApp)
	}
	m.App = req.CurrentApp
	// remote_addr and user_agent in the body are the end user's, passed on by the
	// calling service (as in Zato); they win over what the transport saw.
	if req.RemoteAddr != "" {
		m.RemoteAddr = req.RemoteAddr
	}
	if req.UserAgent != "" {
		m.UserAgent = req.UserAgent
	}
	if req.RequestID == "" {
		req.RequestID = m.RequestID
	}
	switch op {
	case OpLogin:
		return s.login(ctx, req, m)
	case OpLogout:
		return s.logout(ctx, req, m)
	case OpWhoAmI:
		return s.whoAmI(ctx, req)
	case OpUserCreate:
		return s.createUser(ctx, req, m)
	case OpUserApprove:
		return s.approveUser(ctx, req, m)
	case OpSessionRenew:
		return s.renew(ctx, req, m)
	case OpHistory, OpHistoryAt:
		if s.cfg.History == nil {
			return nil, errors.New("history is not configured")
		}
		if op == OpHistory {
			return s.history(ctx, req)
		}
		return s.historyAt(ctx, req)
	}
	for _, v := range Verbs {
		switch op {
		case UserAttrOp(v):
			return s.attr(ctx, false, v, req, m)
		case SessionAttrOp(v):
			return s.attr(ctx, true, v, req, m)
		}
	}
	return nil, badRequest("unknown operation %q", op)
}

func formatTime(t int64) string { return time.Unix(0, t).UTC().Format(time.RFC3339Nano) }

func (s *Service) login(ctx context.Context, req *Request, m *Meta) (map[string]any, error) {
	denied := events.Errorf(events.CodeNotAllowed, "wrong username or password")
	if req.typeErr != nil || req.Username == "" || req.Password == "" {
		return nil, denied
	}
	r, err := s.read(ctx, events.UsernameKey(req.Username))
	if err != nil {
		return nil, err
	}
	var u *events.UserRecord
	if ur, ok := r.(*events.UsernameRecord); ok {
		if u, err = s.readUser(ctx, ur.UserID); err != nil {
			return nil, err
		}
	}
	if u == nil {
		CheckPassword(req.Password, dummyHash)
		return nil, denied
	}
	if !CheckPassword(req.Password, u.PasswordHash) || !u.Approved {
		return nil, denied
	}
	ust := NewUST()
	ev := (*caller)(nil).event(events.SessionCreated, *m)
	ev.UserID, ev.SessionID, ev.ActorName = u.UserID, events.SessionID(ust), u.Username
	ev.Time = time.Now().UnixNano()
	ev.ExpiresAt = ev.Time + int64(s.cfg.SessionTTL)
	if _, err := s.apply(ctx, ev); err != nil {
		if events.CodeOf(err) == events.CodeNotAllowed {
			return nil, denied // not approved meanwhile
		}
		return nil, err
	}
	return map[string]any{"ust": ust, "expiration_time": formatTime(ev.ExpiresAt)}, nil
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
	if req.RequestID != "" {
		ev.RequestKey = events.RequestKey(sess.UserID, req.RequestID)
	}
	_, err = s.commit(ctx, ev)
	s.sessions.forget(sid, "") // this instance stops honouring it at once
	return nil, err
}

func (s *Service) whoAmI(ctx context.Context, req *Request) (map[string]any, error) {
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
	if password == "" {
		return events.Decision{}, events.Errorf(events.CodeInvalidInput, "the password is empty")
	}
	hash, err := HashPassword(password, s.cfg.Password)
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
	ev.ExpiresAt = ev.Time + int64(s.cfg.SessionTTL)
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

// target is whose attributes a request reaches.
type target struct {
	c   *caller
	uid string
	sid string // "" for user attributes
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
			return nil, events.Errorf(events.CodeNotAllowed, "another user's session")
		}
		return &target{c: c, uid: ts.UserID, sid: sid}, nil
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
		return nil, "", events.Errorf(events.CodeNotAllowed, "another user's data, or no such user")
	}
	return c, req.UserID, nil
}

func (s *Service) attr(ctx context.Context, session bool, verb string, req *Request, m *Meta) (map[string]any, error) {
	t, err := s.resolve(ctx, session, req)
	if err != nil {
		return nil, err
	}
	if req.typeErr != nil {
		return nil, req.typeErr
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
		names, err := s.names(ctx, t)
		if err != nil {
			return nil, err
		}
		return map[string]any{"result": names}, nil
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
	ev.Attrs = make([]events.AttrItem, len(items))
	for i, it := range items {
		ai := events.AttrItem{Name: it.Name, Value: it.Value}
		if it.Expiration != nil && *it.Expiration > 0 {
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
			if ai.Value, err = s.cfg.Keyring.Seal(it.Value, sealed.AAD(t.uid, t.sid, it.Name)); err != nil {
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

// attrView is one attribute as a get answers it.
func attrView(keys *sealed.Keyring, uid, sid, name string, a *events.AttrRecord, decrypt bool) (map[string]any, error) {
	out := map[string]any{"found": true, "name": name, "creation_time": formatTime(a.Created),
		"last_modified": formatTime(a.Modified), "expiration_time": NeverExpires, "is_encrypted": a.Encrypted}
	if a.ExpiresAt != 0 {
		out["expiration_time"] = formatTime(a.ExpiresAt)
	}
	switch {
	case !a.Encrypted:
		out["value"] = json.RawMessage(a.Value)
	case !decrypt:
		out["value"] = sealedText(a.Value)
	default:
		if keys == nil {
			return nil, errors.New("an encrypted value but no encryption key configured")
		}
		plain, err := keys.Open(a.Value, sealed.AAD(uid, sid, name))
		if err != nil {
			return nil, fmt.Errorf("open %q: %w", name, err)
		}
		out["value"] = json.RawMessage(plain)
	}
	return out, nil
}

func (s *Service) readAttrs(ctx context.Context, t *target, verb string, req *Request) (map[string]any, error) {
	names, many, err := req.names(s.cfg.Limits)
	if err != nil {
		return nil, err
	}
	recs, err := s.getAttrs(ctx, t, names)
	if err != nil {
		return nil, err
	}
	decrypt := req.Decrypt == nil || *req.Decrypt
	answer := func(name string) (any, error) {
		a := recs[name]
		if verb == VerbExists {
			return a != nil, nil
		}
		if a == nil {
			return map[string]any{"found": false}, nil
		}
		return attrView(s.cfg.Keyring, t.uid, t.sid, name, a, decrypt)
	}
	if !many {
		v, err := answer(names[0])
		if err != nil {
			return nil, err
		}
		if verb == VerbExists {
			return map[string]any{"result": v}, nil
		}
		return v.(map[string]any), nil
	}
	result := make(map[string]any, len(names))
	for _, n := range names {
		if result[n], err = answer(n); err != nil {
			return nil, err
		}
	}
	return map[string]any{"result": result}, nil
}

// getAttrs reads the named attributes, keeping only the live ones.
func (s *Service) getAttrs(ctx context.Context, t *target, names []string) (map[string]*events.AttrRecord, error) {
	now := time.Now().UnixNano()
	out := make(map[string]*events.AttrRecord, len(names))
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make([]error, len(names))
	sem := make(chan struct{}, 16)
	for i, n := range names {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r, err := s.read(ctx, events.AttrKey(t.uid, t.sid, n))
			if a, ok := r.(*events.AttrRecord); ok && a.Live(now) {
				mu.Lock()
				out[n] = a
				mu.Unlock()
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	return out, errors.Join(errs...)
}

// names lists the live attribute names of the target, sorted byte-wise.
func (s *Service) names(ctx context.Context, t *target) ([]string, error) {
	prefix := events.AttrPrefix(t.uid, t.sid)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := s.kv.WatchFiltered(wctx, []string{prefix + ">"}, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, err
	}
	defer w.Stop()
	now := time.Now().UnixNano()
	names := []string{}
	seen := map[string]bool{} // a key may be listed twice while it is being written
	for e := range w.Updates() {
		if e == nil {
			break
		}
		var a events.AttrRecord
		if err := events.Unmarshal(e.Value(), &a); err != nil || !a.Live(now) {
			continue
		}
		n, err := events.AttrNameFromKey(prefix, e.Key())
		if err != nil {
			return nil, err
		}
		if !seen[n] {
			seen[n] = true
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names, nil
}
