package api

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"slices"
	"time"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// History operations.
const (
	OpHistory   Op = "history.list" // a user's, a session's or an attribute's events
	OpHistoryAt Op = "history.at"   // attributes as they were at a time
)

// HistorySource folds the log for one user (projector.Log is one).
type HistorySource interface {
	// FoldUser calls fn with each of the user's events in log order, with its decision
	// and the projection right after it, until fn returns false; with hasAt it stops
	// after the last of the user's events, in log order, whose time is at or before at.
	// It returns the projection as of the last event folded.
	FoldUser(ctx context.Context, uid string, at int64, hasAt bool, fn func(events.Entry, events.View) bool) (events.View, error)
}

// Paging bounds of a history request.
const (
	DefaultHistoryLimit = 100
	MaxHistoryLimit     = 1000
)

var eventTypes = []events.Type{events.UserCreated, events.UserApproved, events.UserDeleted, events.UserRehashed, events.SessionCreated, events.SessionRenewed,
	events.SessionEnded, events.AttrCreated, events.AttrUpdated, events.AttrSet, events.AttrDeleted,
	events.LoginFailed, events.AccessDenied}

// CheckEventTypes refuses a type filter naming an unknown event type (E008002).
func CheckEventTypes(types []string) error {
	for _, t := range types {
		if !slices.Contains(eventTypes, events.Type(t)) {
			return events.Errorf(events.CodeInvalidInput, "unknown event type %q", t)
		}
	}
	return nil
}

// HistoryFilter selects events of a user's history.
type HistoryFilter struct {
	SessionID string // only this session's events ("": all)
	Name      string // only events on this attribute ("": all); of SessionID's when set, else of the user's
	// Since and Until bound the events' times (Unix ns), each only when its Has… is set:
	// a given time is that time, 1970 included. Times are the appending instance's
	// clock, not monotonic in log order: the bounds filter every event, they do not
	// stop the reading.
	Since, Until       int64
	HasSince, HasUntil bool
	Types              []string // only these types (none: all)
	After              uint64   // events after this sequence (paging)
}

// Match reports whether an entry passes the filter.
func (f *HistoryFilter) Match(e events.Entry) bool {
	ev := e.Event
	if ev == nil || e.Seq <= f.After || f.HasSince && ev.Time < f.Since || f.HasUntil && ev.Time > f.Until {
		return false
	}
	if len(f.Types) > 0 && !slices.Contains(f.Types, string(ev.Type)) {
		return false
	}
	if f.SessionID != "" && ev.SessionID != f.SessionID {
		return false
	}
	if f.Name != "" {
		if ev.SessionID != f.SessionID {
			return false // a user attribute's history has no session attributes, and back
		}
		return slices.ContainsFunc(ev.Attrs, func(it events.AttrItem) bool { return it.Name == f.Name })
	}
	return true
}

// HistoryEvent is how one entry of the history is shown: time, type, actor, app, remote
// address, cid, the decision and the change. after is the projection right after the
// event. A value that the event stored encrypted shows as value_encrypted unless keys
// is given and decrypt is true (then value and value_encrypted); one sealed in the log
// only because the update kept the attribute's setting (Inherit) and plain shows as
// its plain value, or as value_unavailable without the key.
func HistoryEvent(e events.Entry, after events.View, keys *sealed.Keyring, decrypt bool) map[string]any {
	ev := e.Event
	out := map[string]any{"seq": e.Seq, "id": ev.ID, "time": formatTime(ev.Time), "type": string(ev.Type),
		"user_id": ev.UserID, "decision": "accepted"}
	if e.Decision.Code != "" {
		out["decision"], out["code"] = "rejected", string(e.Decision.Code)
	}
	if ev.Erased {
		// What is personal in it is sealed, and this reader cannot open it: its
		// person's data key is destroyed (the user was deleted), or there is no key file.
		out["personal_data"] = "sealed"
	}
	if ev.Type == events.LoginFailed || ev.Type == events.AccessDenied {
		// A request the API refused before the log: recorded so an audit sees it.
		out["decision"], out["code"] = "rejected", string(events.CodeNotAllowed)
		if ev.Op != "" {
			out["op"] = ev.Op
		}
	}
	for k, v := range map[string]string{"actor": ev.Actor, "actor_name": ev.ActorName, "actor_session": ev.ActorSession, "app": ev.App,
		"remote_addr": ev.RemoteAddr, "user_agent": ev.UserAgent, "cid": ev.CID, "session_id": ev.SessionID} {
		if v != "" {
			out[k] = v
		}
	}
	if ev.Imported != nil {
		// Where an imported event's data came from (attrd import).
		out["imported_from"], out["imported_id"] = ev.Imported.From, ev.Imported.ID
	}
	switch ev.Type {
	case events.UserCreated:
		if ev.User != nil {
			out["is_super_user"] = ev.User.SuperUser
			if ev.User.Username != "" {
				out["username"] = ev.User.Username
			}
		}
	case events.SessionCreated, events.SessionRenewed:
		out["expiration_time"] = formatTime(ev.ExpiresAt)
	}
	if len(ev.Attrs) > 0 {
		changes := make([]map[string]any, len(ev.Attrs))
		for i, it := range ev.Attrs {
			c := map[string]any{"name": it.Name}
			if ev.Type != events.AttrDeleted {
				if it.ExpiresAt != 0 {
					c["expiration_time"] = formatTime(it.ExpiresAt)
				}
				encrypted := it.Enc == events.Encrypted
				if it.Enc == events.Inherit && after != nil {
					// Sealed in the log because the update kept the attribute's setting:
					// encrypted if the attribute is (as stored by this event, or, for a
					// rejected one, as it stood), plain otherwise.
					a := after.Attr(events.AttrKey(ev.UserID, ev.SessionID, it.Name))
					encrypted = a != nil && a.Encrypted
				}
				switch {
				case ev.Erased && it.Value == nil:
					// Sealed with the user's personal data, and no key here for it (no
					// key file, or the user was deleted).
					c["value_unavailable"] = true
				case it.Enc == events.Plain:
					c["value"] = json.RawMessage(it.Value)
				case (decrypt || !encrypted) && keys != nil:
					if plain, err := keys.Open(it.Value, sealed.AAD(ev.UserID, ev.SessionID, it.Name)); err == nil {
						c["value"] = json.RawMessage(plain)
					} else {
						c["value_unavailable"] = true
					}
					if encrypted {
						c["value_encrypted"] = true
					}
				case encrypted:
					c["value_encrypted"] = true
				default:
					c["value_unavailable"] = true // plain, sealed in the log, and no key here
				}
			}
			changes[i] = c
		}
		out["changes"] = changes
	}
	return out
}

// AttrsAt shows the attributes a view holds under a user (sid "") or a session that are
// live at t, as get shows them. A session that was not the user's live session at t is
// E007001.
func AttrsAt(v events.View, uid, sid string, t int64, keys *sealed.Keyring, decrypt bool) (map[string]any, error) {
	if sid != "" {
		if ss := v.Session(sid); !ss.Live(t) || ss.UserID != uid {
			return nil, events.Errorf(events.CodeNoSession, "no such session at that time")
		}
	}
	prefix := events.AttrPrefix(uid, sid)
	out := map[string]any{}
	for _, k := range v.AttrKeys(prefix) {
		a := v.Attr(k)
		if !a.Live(t) {
			continue
		}
		name, err := events.AttrNameFromKey(prefix, k)
		if err != nil {
			return nil, err
		}
		if out[name], err = attrView(keys, uid, sid, name, a, decrypt); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ParseTime reads an RFC 3339 time as Unix nanoseconds: one that int64 nanoseconds
// cannot hold (before 1678, after 2261) is E008002 as well as one that does not parse.
func ParseTime(field, s string) (int64, error) {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return 0, events.Errorf(events.CodeInvalidInput, "%s must be an RFC 3339 time", field)
	}
	if y := t.Year(); y < 1678 || y > 2261 {
		return 0, events.Errorf(events.CodeInvalidInput, "%s is out of range (years 1678 to 2261)", field)
	}
	return t.UnixNano(), nil
}

// optionalTime reads an optional time field: absent or empty is no bound.
func optionalTime(field, s string) (int64, bool, error) {
	if s == "" {
		return 0, false, nil
	}
	t, err := ParseTime(field, s)
	return t, err == nil, err
}

// historyTarget authenticates the caller and finds whose history it asks for: its own,
// or (a super-user) anyone's; and which session, from session_id or target_ust.
func (s *Service) historyTarget(ctx context.Context, req *Request) (c *caller, uid, sid string, err error) {
	if c, uid, err = s.userCaller(ctx, req); err != nil {
		return nil, "", "", err
	}
	sid = req.SessionID
	if sid != "" && !events.ValidSessionID(sid) {
		return nil, "", "", events.Errorf(events.CodeInvalidInput, "session_id is 32 hex digits")
	}
	if req.TargetUST != "" {
		sid = events.SessionID(req.TargetUST)
		if req.UserID == "" {
			// Whose session: a super-user may name another user's session by its UST
			// alone. Only a live session tells its user; an ended one needs user_id.
			ss, err := s.readSession(ctx, sid)
			if err != nil {
				return nil, "", "", err
			}
			if ss.Live(time.Now().UnixNano()) {
				if ss.UserID != c.user.UserID && !c.user.SuperUser {
					return nil, "", "", events.Errorf(events.CodeNotAllowed, "another user's session")
				}
				uid = ss.UserID
			}
			// An ended session is looked for among the caller's own (or user_id's)
			// sessions; one that is not there is E007001, for history and history.at alike.
		}
	}
	if req.typeErr != nil {
		return nil, "", "", req.typeErr
	}
	return c, uid, sid, nil
}

func (s *Service) history(ctx context.Context, req *Request) (map[string]any, error) {
	ctx, err := s.reading(ctx)
	if err != nil {
		return nil, err
	}
	_, uid, sid, err := s.historyTarget(ctx, req)
	if err != nil {
		return nil, err
	}
	f := HistoryFilter{SessionID: sid, Types: req.Types}
	if req.Name != nil {
		if err := ValidateName(*req.Name); err != nil {
			return nil, err
		}
		f.Name = *req.Name
	}
	if err := CheckEventTypes(req.Types); err != nil {
		return nil, err
	}
	if f.Since, f.HasSince, err = optionalTime("since", req.Since); err != nil {
		return nil, err
	}
	if f.Until, f.HasUntil, err = optionalTime("until", req.Until); err != nil {
		return nil, err
	}
	limit := int64(DefaultHistoryLimit)
	if req.Limit != nil {
		limit = *req.Limit
	}
	if limit < 1 || limit > MaxHistoryLimit {
		return nil, events.Errorf(events.CodeInvalidInput, "limit is 1 to %d", MaxHistoryLimit)
	}
	if req.AfterName != "" {
		return nil, events.Errorf(events.CodeInvalidInput, "after is a sequence, a whole number")
	}
	if req.After != nil {
		if *req.After < 0 {
			return nil, events.Errorf(events.CodeInvalidInput, "after is a sequence, not negative")
		}
		f.After = uint64(*req.After)
	}
	decrypt := req.Decrypt != nil && *req.Decrypt
	list := []map[string]any{}
	more := false
	sawSession := sid == ""
	size, max := 0, s.maxReply()-1024
	err = s.foldHistory(ctx, uid, 0, false, func(e events.Entry, after events.View) bool {
		if !sawSession && e.Event != nil && e.Event.Type == events.SessionCreated && e.Event.SessionID == sid {
			sawSession = true
		}
		if !f.Match(e) {
			return true
		}
		if int64(len(list)) == limit {
			more = true
			return false
		}
		he := HistoryEvent(e, after, s.cfg.Keyring, decrypt)
		b, _ := json.Marshal(he)
		if size += len(b) + 1; size > max {
			if len(list) == 0 {
				return false // one event over the reply bound: refused below
			}
			more = true // the page ends where the reply bound is
			return false
		}
		list = append(list, he)
		return true
	})
	if err != nil {
		return nil, err
	}
	if !sawSession {
		return nil, events.Errorf(events.CodeNoSession, "no such session of this user")
	}
	if size > max && len(list) == 0 {
		return nil, events.Errorf(events.CodeInvalidInput, "one event of this history is over the reply limit of %d bytes", max)
	}
	out := map[string]any{"events": list}
	if more {
		out["next"] = list[len(list)-1]["seq"]
	}
	return out, nil
}

func (s *Service) historyAt(ctx context.Context, req *Request) (map[string]any, error) {
	if err := require(req, "at"); err != nil {
		return nil, err
	}
	ctx, err := s.reading(ctx)
	if err != nil {
		return nil, err
	}
	_, uid, sid, err := s.historyTarget(ctx, req)
	if err != nil {
		return nil, err
	}
	at, err := ParseTime("at", req.At) // required: empty is no time
	if err != nil {
		return nil, err
	}
	var view events.View
	err = s.foldHistory(ctx, uid, at, true, nil, &view)
	if err != nil {
		return nil, err
	}
	result, err := AttrsAt(view, uid, sid, at, s.cfg.Keyring, req.Decrypt == nil || *req.Decrypt)
	if err != nil {
		return nil, err
	}
	// Its size is checked by the transport on the encoded reply (CheckReplySize).
	return map[string]any{"at": formatTime(at), "result": result}, nil
}

// foldHistory folds a user's history within the history bounds: at most
// HistoryConcurrency folds at once (others wait up to two seconds, then are refused as
// busy), each within HistoryTimeout (then E008002: the history is too long to fold per
// request). The view reached goes to view, if not nil.
func (s *Service) foldHistory(ctx context.Context, uid string, at int64, hasAt bool, fn func(events.Entry, events.View) bool, view ...*events.View) error {
	var v events.View
	var err error
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HistoryTimeout)
	defer cancel()
	if gerr := s.histories.Do(ctx, "", func() { v, err = s.cfg.History.FoldUser(hctx, uid, at, hasAt, fn) }); gerr != nil {
		return gerr
	}
	if err != nil && hctx.Err() != nil && ctx.Err() == nil {
		return events.Errorf(events.CodeInvalidInput, "this history takes longer than %s to read: narrow it, or use the operator's attrd history", s.cfg.HistoryTimeout)
	}
	if len(view) > 0 {
		*view[0] = v
	}
	return err
}

// sealedText is how an encrypted value reads when not decrypted: its sealed bytes in
// base64, as a JSON string.
func sealedText(v []byte) json.RawMessage {
	b, _ := json.Marshal(base64.StdEncoding.EncodeToString(v))
	return b
}
