package api

import (
	"context"
	"encoding/json"
	"strings"
	"time"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// OpUserExport hands a user everything attrd holds of them (the right of access, GDPR
// article 15): for themselves, or for a super-user about anyone.
const OpUserExport Op = "user.export"

// exportUser answers the caller's (or, for a super-user, user_id's) export document.
// Values are decrypted, as history.at does, unless decrypt is false.
func (s *Service) exportUser(ctx context.Context, req *Request) (map[string]any, error) {
	ctx, err := s.reading(ctx)
	if err != nil {
		return nil, err
	}
	if s.cfg.History == nil {
		return nil, events.Errorf(events.CodeInvalidInput, "this instance serves no history")
	}
	_, uid, err := s.userCaller(ctx, req)
	if err != nil {
		return nil, err
	}
	if req.typeErr != nil {
		return nil, req.typeErr
	}
	decrypt := req.Decrypt == nil || *req.Decrypt
	fold := func(fn func(events.Entry, events.View) bool) (events.View, error) {
		var v events.View
		err := s.foldHistory(ctx, uid, 0, false, fn, &v)
		return v, err
	}
	// Half the reply for the history: the other half for the record, sessions and
	// attributes.
	return Export(fold, uid, s.cfg.Keyring, decrypt, s.maxReply()/2)
}

// Export builds a user's export document from one fold of their log (fold calls fn
// with each of the user's events and returns the projection at the end), so that its
// parts agree: the user's record (without the password hash), their live sessions
// with each one's attributes, their attributes, and their history as history.list
// shows it. A history over maxHistory bytes (0: no bound) ends early, with
// history_next: the sequence to go on from with history.list's after. A user who does
// not exist (or was deleted) is E005001.
func Export(fold func(fn func(events.Entry, events.View) bool) (events.View, error), uid string, keys *sealed.Keyring, decrypt bool, maxHistory int) (map[string]any, error) {
	history := []map[string]any{}
	size := 0
	var next uint64
	view, err := fold(func(e events.Entry, after events.View) bool {
		if e.Event == nil || next != 0 {
			return true
		}
		he := HistoryEvent(e, after, keys, decrypt)
		b, _ := json.Marshal(he)
		if size += len(b) + 1; maxHistory > 0 && size > maxHistory {
			next = e.Seq - 1 // history.list after this goes on with e
			return true
		}
		history = append(history, he)
		return true
	})
	if err != nil {
		return nil, err
	}
	var u *events.UserRecord
	if view != nil {
		u = view.User(uid)
	}
	if u == nil {
		return nil, events.Errorf(events.CodeNotAllowed, "no such user")
	}
	now := time.Now().UnixNano()
	attrs, err := AttrsAt(view, uid, "", now, keys, decrypt)
	if err != nil {
		return nil, err
	}
	sessions := []map[string]any{}
	index := events.SessionIndexPrefix(uid)
	for _, k := range view.AttrKeys(index) {
		sid := strings.TrimPrefix(k, index)
		ss := view.Session(sid)
		if !ss.Live(now) || ss.UserID != uid {
			continue
		}
		sa, err := AttrsAt(view, uid, sid, now, keys, decrypt)
		if err != nil {
			return nil, err
		}
		one := map[string]any{"session_id": sid, "creation_time": formatTime(ss.Created), "expiration_time": formatTime(ss.ExpiresAt),
			"current_app": ss.App, "attributes": sa}
		if ss.RemoteAddr != "" {
			one["remote_addr"] = ss.RemoteAddr
		}
		if ss.UserAgent != "" {
			one["user_agent"] = ss.UserAgent
		}
		sessions = append(sessions, one)
	}
	out := map[string]any{
		"exported_at": formatTime(now),
		"user": map[string]any{"user_id": u.UserID, "username": u.Username, "is_super_user": u.SuperUser,
			"is_approved": u.Approved, "creation_time": formatTime(u.Created)},
		"attributes": attrs,
		"sessions":   sessions,
		"history":    history,
	}
	if next != 0 {
		out["history_next"] = next
	}
	return out, nil
}
