package api

import (
	"context"
	"errors"
	"fmt"

	"github.com/attrd/attrd/events"
)

// OpUserDelete deletes a user for good (a super-user only; nobody deletes themselves).
const OpUserDelete Op = "user.delete"

// deleteUser appends user.deleted for a super-user. The projector decides it (the
// target must exist and not be the caller: E008001 otherwise, as in Zato) and applies
// it: the user's sessions end, their UST stops working for every operation, the
// user's and sessions' attributes go and the username is free again
// (projector/erase.go). The history keeps the user's events.
func (s *Service) deleteUser(ctx context.Context, req *Request, m *Meta) (map[string]any, error) {
	c, err := s.superUser(ctx, req.UST)
	if err != nil {
		return nil, err
	}
	if !events.ValidUserID(req.UserID) {
		return nil, events.Errorf(events.CodeInvalidOperation, "no such user")
	}
	if req.UserID == c.user.UserID {
		return nil, events.Errorf(events.CodeInvalidOperation, "nobody deletes themselves")
	}
	// Read for the login counter's key only: the fold decides whether the user exists
	// (a retry, with its request id, finds the user gone and must answer as the first).
	u, err := s.readUser(ctx, req.UserID)
	if err != nil {
		return nil, err
	}
	ev := c.event(events.UserDeleted, *m)
	ev.UserID = req.UserID
	ev.RequestKey = c.requestKey(req.RequestID)
	if _, err := s.apply(ctx, ev); err != nil {
		return nil, err
	}
	// The data key is destroyed already: the projector does it before the decision
	// goes out (projector/erase.go finishErasures).
	if u != nil && s.throttle != nil {
		// The failed-login counter is keyed by the username: it goes with the user.
		if err := s.throttle.forget(ctx, u.Username); err != nil {
			s.log.Warn("the deleted user's login counter stays until it expires", "cid", m.CID, "err", err)
		}
	}
	return nil, nil
}

// encode returns the wire form of ev, with what is personal in it sealed with its
// person's data key when this deployment has them. ev itself is left as it is: the
// request goes on reading it.
func (s *Service) encode(ctx context.Context, ev *events.Event) ([]byte, error) {
	if s.dataKeys == nil {
		return events.Encode(ev)
	}
	c := *ev
	if ev.User != nil {
		u := *ev.User
		c.User = &u
	}
	c.Attrs = append([]events.AttrItem(nil), ev.Attrs...)
	if err := s.dataKeys.Seal(ctx, &c); err != nil {
		return nil, fmt.Errorf("seal the event's personal data: %w", err)
	}
	return events.Encode(&c)
}

// sealValue seals an attribute value of uid's: with uid's own data key when this
// deployment has them (deleting the user then erases it everywhere, and a rotation of
// the key file re-wraps the data keys only), else with the key ring.
func (s *Service) sealValue(ctx context.Context, uid string, plain, aad []byte) ([]byte, error) {
	if s.dataKeys == nil {
		return s.cfg.Keyring.Seal(plain, aad)
	}
	v, err := s.dataKeys.SealValue(ctx, uid, plain, aad)
	if errors.Is(err, events.ErrErased) {
		return nil, events.Errorf(events.CodeNotAllowed, "no such user")
	}
	return v, err
}

// keyFingerprint replaces the fingerprint of a request with a request id (a hash of
// its body, values included) by one keyed with its target user's data key, so that
// the log does not let anyone confirm a guessed value, and, once the user is deleted,
// nothing at all. Retries are compared keyed too. Without data keys (or for a user
// already deleted) it stays as it is.
func (s *Service) keyFingerprint(ctx context.Context, ev *events.Event) {
	if s.dataKeys == nil || ev.Fingerprint == "" || ev.UserID == "" {
		return
	}
	if k, err := s.dataKeys.Ensure(ctx, ev.UserID); err == nil {
		ev.Fingerprint = k.Fingerprint(ev.Fingerprint)
	}
}
