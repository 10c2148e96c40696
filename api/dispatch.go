package api

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/attrd/attrd/events"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
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
	ops := []Op{OpLogin, OpLogout, OpWhoAmI, OpUserCreate, OpUserApprove, OpUserDelete, OpUserExport, OpSessionRenew, OpHistory, OpHistoryAt}
	for _, v := range Verbs {
		ops = append(ops, UserAttrOp(v), SessionAttrOp(v))
	}
	return ops
}

// Meta is what a transport knows of a request besides its body.
type Meta struct {
	CID        string // the correlation id, a ULID
	App        string // filled from the body
	RemoteAddr string // the end user's address, as the transport saw it
	UserAgent  string
	// BodyAudit lets remote_addr and user_agent in the body win over RemoteAddr and
	// UserAgent: a service on NATS reports its end user's. Over REST the caller is the
	// end user, so the connection and its headers are the truth and the body's fields
	// are ignored.
	BodyAudit bool
	RequestID string // from a transport header (Idempotency-Key, Nats-Msg-Id)
	// Transport names the API the request came by (TransportNATS, TransportREST), for
	// metrics.
	Transport string
	// Fingerprint identifies the request (operation, target, body) when it has a
	// request id; Handle fills it.
	Fingerprint string
}

// Reply is an operation's answer: the HTTP status REST gives it and the JSON body.
type Reply struct {
	Status int
	Code   events.Code // "" when ok
	Body   map[string]any
	// RetryAfter is when the client may come back, for a refusal that says so.
	RetryAfter time.Duration
}

// RetryAfterHeader is the value of the Retry-After header a transport sends with rep
// (REST and NATS alike), in whole seconds rounded up; "" for none. Every 503 has one:
// a bound refused it or its outcome is unknown, and the client should come back.
func (rep Reply) RetryAfterHeader() string {
	d := rep.RetryAfter
	if d <= 0 && rep.Status == 503 {
		d = time.Second
	}
	if d <= 0 {
		return ""
	}
	return strconv.FormatInt(int64((d+time.Second-1)/time.Second), 10)
}

// NeverExpires is how "no expiry" is written.
const NeverExpires = "9999-12-31T00:00:00Z"

// Handle runs op. Every error becomes the contract's reply; nothing panics out of it.
func (s *Service) Handle(ctx context.Context, op Op, req *Request, m Meta) (rep Reply) {
	if m.CID == "" {
		m.CID = events.NewID()
	}
	start := time.Now()
	ctx, span := startRequest(ctx, op, m.Transport)
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("request panicked", "cid", m.CID, "op", op, "panic", fmt.Sprint(p))
			rep = ErrorReply(m.CID, fmt.Errorf("panic: %v", p))
		}
		endRequest(span, rep)
		s.metrics.answered(op, m.Transport, rep, time.Since(start), "")
	}()
	out, err := s.handle(ctx, op, req, &m)
	var ad *accessDenied
	if errors.As(err, &ad) {
		s.deniedAccess(ctx, ad.c, op, &m, ad.uid, ad.sid)
	}
	if err != nil && events.CodeOf(err) == events.CodeInternal && Unavailable(err) {
		// NATS or JetStream could not answer (a node lost, no quorum, a leader
		// election): not a bug. 503, and the client retries.
		err = events.Errorf(events.CodeOutcomeUnknown, "unavailable, try again: %w", err)
	}
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

// Refuse answers a request refused before its operation ran (a body too large or
// unreadable), counting it as Handle counts the others; reason, if set, is its refusal
// reason in the metrics (RefusedOversize).
func (s *Service) Refuse(op Op, m Meta, err error, reason string) Reply {
	rep := ErrorReply(m.CID, err)
	s.metrics.answered(op, m.Transport, rep, 0, reason)
	return rep
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
	return Reply{Status: status, Code: code, Body: map[string]any{"cid": cid, "status": "error", "sub_status": []string{string(code)}},
		RetryAfter: events.RetryAfterOf(err)}
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
	case OpUserApprove, OpUserDelete:
		if err := require(req, "ust", "user_id"); err != nil {
			return nil, err
		}
	}
	if err := s.checkApp(req); err != nil {
		return nil, err
	}
	m.App = req.CurrentApp
	if m.BodyAudit {
		// remote_addr and user_agent in the body are the end user's, passed on by the
		// calling service (as in Zato); they win over what the transport saw. They end
		// up in the audit history, so they must be plain text of a sane length.
		if err := validAuditField("remote_addr", req.RemoteAddr, MaxRemoteAddrBytes); err != nil {
			return nil, err
		}
		if err := validAuditField("user_agent", req.UserAgent, MaxUserAgentBytes); err != nil {
			return nil, err
		}
		if req.RemoteAddr != "" {
			m.RemoteAddr = req.RemoteAddr
		}
		if req.UserAgent != "" {
			m.UserAgent = req.UserAgent
		}
	}
	if req.RequestID == "" {
		req.RequestID = m.RequestID
	}
	switch op {
	case OpLogin, OpLogout:
		// Each login is a new session and a logout always ends the session it names:
		// neither is a retryable request.
		req.RequestID = ""
	}
	if req.RequestID != "" {
		m.Fingerprint = req.fingerprint(op)
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
	case OpUserDelete:
		return s.deleteUser(ctx, req, m)
	case OpUserExport:
		return s.exportUser(ctx, req)
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

// Unavailable reports an error of NATS or JetStream being unreachable or without a
// leader for the moment, or of the request being cut short (the instance stopping),
// rather than a bug.
func Unavailable(err error) bool {
	for _, e := range []error{nats.ErrTimeout, nats.ErrNoResponders, nats.ErrConnectionClosed, nats.ErrConnectionDraining,
		nats.ErrDisconnected, nats.ErrConnectionReconnecting, jetstream.ErrNoStreamResponse, jetstream.ErrJetStreamNotEnabled,
		context.DeadlineExceeded, context.Canceled, jetstream.ErrStreamNotFound} {
		if errors.Is(err, e) {
			return true
		}
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		// 503: no cluster, no leader, no quorum; 10158: the same message id is still
		// being proposed (a retry during an outage).
		return apiErr.Code == 503 || apiErr.ErrorCode == 10158 || apiErr.Code == 408
	}
	return false
}
