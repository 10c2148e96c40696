// Package client is the Go client of attrd's NATS request API: what Zato's Python SSO
// API gives Zato services, for Go services.
//
//	c := client.New(nc, "CRM")
//	sess, err := c.Login(ctx, "alice", password)
//	user, err := sess.User(ctx)
//	err = user.Attr.Update(ctx, "theme", "dark", client.Expiration(time.Hour))
//	err = user.Attr.UpdateMany(ctx, []client.Item{{Name: "a", Value: 1}, {Name: "b", Value: 2, Encrypt: client.Bool(true)}})
//
// Errors are *events.Error carrying the contract's codes: match them with errors.Is
// against events.ErrNoAttr, events.ErrAttrExists, events.ErrNotAllowed, and so on.
package client

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/attrd/attrd/events"
)

// Client talks to attrd over NATS on behalf of one application.
type Client struct {
	nc  *nats.Conn
	app string
	// Timeout bounds one request when ctx has no deadline (default 10s).
	Timeout time.Duration
}

// New returns a client that sends current_app = app.
func New(nc *nats.Conn, app string) *Client {
	return &Client{nc: nc, app: app, Timeout: 10 * time.Second}
}

// NATS returns the client's connection.
func (c *Client) NATS() *nats.Conn { return c.nc }

// Call sends a raw request body (current_app is added) to the operation op, for
// example "user.attr.get", and decodes the reply's fields into out (may be nil).
func (c *Client) Call(ctx context.Context, op string, body map[string]any, out any) error {
	if body == nil {
		body = map[string]any{}
	}
	body["current_app"] = c.app
	data, err := json.Marshal(body)
	if err != nil {
		return fmt.Errorf("encode request: %w", err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.Timeout)
		defer cancel()
	}
	msg := nats.NewMsg("attrd." + op)
	msg.Data = data
	if id, ok := body["request_id"].(string); ok && id != "" {
		msg.Header.Set(nats.MsgIdHdr, id)
	}
	rep, err := c.nc.RequestMsgWithContext(ctx, msg)
	if err != nil {
		return fmt.Errorf("attrd %s: %w", op, err)
	}
	var env struct {
		Status    string          `json:"status"`
		SubStatus []string        `json:"sub_status"`
		Result    json.RawMessage `json:"result"`
		CID       string          `json:"cid"`
	}
	if err := json.Unmarshal(rep.Data, &env); err != nil {
		return fmt.Errorf("attrd %s: unreadable reply: %w", op, err)
	}
	switch {
	case env.Status == "ok":
	case env.Status == "error" && len(env.SubStatus) > 0:
		e := &events.Error{Code: events.Code(env.SubStatus[0]), Msg: op + " (cid " + env.CID + ")"}
		if n, err := strconv.Atoi(rep.Header.Get("Retry-After")); err == nil && n > 0 {
			e.RetryAfter = time.Duration(n) * time.Second
		}
		return e
	case string(env.Result) == `"Error"`:
		code := events.CodeInternal
		if n, _ := strconv.Atoi(rep.Header.Get("Nats-Service-Error-Code")); n == 400 {
			code = events.CodeBadRequest
		}
		return &events.Error{Code: code, Msg: op + " (cid " + env.CID + ")"}
	default:
		return fmt.Errorf("attrd %s: unexpected reply %q", op, rep.Data)
	}
	if out != nil {
		if err := json.Unmarshal(rep.Data, out); err != nil {
			return fmt.Errorf("attrd %s: %w", op, err)
		}
	}
	return nil
}

// Session is a logged-in session.
type Session struct {
	c   *Client
	UST string
}

// Login logs in and returns the session. Wrong credentials are events.ErrNotAllowed.
func (c *Client) Login(ctx context.Context, username, password string) (*Session, error) {
	var out struct {
		UST string `json:"ust"`
	}
	if err := c.Call(ctx, "user.login", map[string]any{"username": username, "password": password}, &out); err != nil {
		return nil, err
	}
	return &Session{c: c, UST: out.UST}, nil
}

// Resume returns the session of a UST obtained earlier.
func (c *Client) Resume(ust string) *Session { return &Session{c: c, UST: ust} }

// Logout ends the session; its session attributes end with it.
func (s *Session) Logout(ctx context.Context) error {
	return s.c.Call(ctx, "user.logout", map[string]any{"ust": s.UST}, nil)
}

// Renew extends the session and returns its new end.
func (s *Session) Renew(ctx context.Context) (time.Time, error) {
	var out struct {
		Exp time.Time `json:"expiration_time"`
	}
	err := s.c.Call(ctx, "session.renew", map[string]any{"ust": s.UST}, &out)
	return out.Exp, err
}

// User is a user as its session sees it, with its attributes.
type User struct {
	ID          string    `json:"user_id"`
	Username    string    `json:"username"`
	IsSuperUser bool      `json:"is_super_user"`
	Created     time.Time `json:"creation_time"`
	// Attr reaches the user's attributes.
	Attr *Attr `json:"-"`
}

// User returns the session's own user.
func (s *Session) User(ctx context.Context) (*User, error) {
	var u User
	if err := s.c.Call(ctx, "user.get", map[string]any{"ust": s.UST}, &u); err != nil {
		return nil, err
	}
	u.Attr = &Attr{s: s, userID: u.ID}
	return &u, nil
}

// UserByID returns the attributes handle of another user (the session must be a
// super-user's; otherwise every call is events.ErrNotAllowed).
func (s *Session) UserByID(userID string) *User {
	return &User{ID: userID, Attr: &Attr{s: s, userID: userID}}
}

// SessionAttr reaches the attributes of the session whose UST is targetUST (the
// session's own UST for its own attributes).
func (s *Session) SessionAttr(targetUST string) *Attr {
	return &Attr{s: s, targetUST: targetUST, session: true}
}

// CreateUser creates an approved user (super-user only) and returns its id.
func (s *Session) CreateUser(ctx context.Context, username, password string, superUser bool) (string, error) {
	var out struct {
		ID string `json:"user_id"`
	}
	err := s.c.Call(ctx, "user.create", map[string]any{"ust": s.UST, "username": username, "password": password, "is_super_user": superUser}, &out)
	return out.ID, err
}

// ApproveUser approves a user (super-user only); approving twice is ok.
func (s *Session) ApproveUser(ctx context.Context, userID string) error {
	return s.c.Call(ctx, "user.approve", map[string]any{"ust": s.UST, "user_id": userID}, nil)
}

// DeleteUser deletes another user for good (super-user only): their sessions end,
// their and their sessions' attributes go, and the username is free again.
func (s *Session) DeleteUser(ctx context.Context, userID string) error {
	return s.c.Call(ctx, "user.delete", map[string]any{"ust": s.UST, "user_id": userID}, nil)
}

// Export returns everything attrd holds of a user, as one JSON document: the caller's
// own (userID ""), or, for a super-user, anyone's.
func (s *Session) Export(ctx context.Context, userID string) (map[string]any, error) {
	body := map[string]any{"ust": s.UST}
	if userID != "" {
		body["user_id"] = userID
	}
	var out map[string]any
	err := s.c.Call(ctx, "user.export", body, &out)
	return out, err
}

// Bool returns a pointer to b, for Item.Encrypt.
func Bool(b bool) *bool { return &b }

// Duration returns a pointer to d, for Item.Expiration.
func Duration(d time.Duration) *time.Duration { return &d }
