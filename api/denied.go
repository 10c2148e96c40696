package api

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/attrd/attrd/events"
)

// Denied attempts (a wrong password for an existing user, another user's data) are
// refused before the log, so an audit would not see them. They are recorded as
// login.failed and access.denied events in the target user's history, at most
// deniedPerMinute per target user and per remote address on this instance: a flood
// cannot grow the log without bound.
const deniedPerMinute = 10

// rateLimiter counts events per key in fixed one-minute windows. It holds at most
// maxKeys keys; when full it starts over (a flood of distinct keys forgets the
// counts, never the bound on memory).
type rateLimiter struct {
	mu      sync.Mutex
	limit   int
	window  time.Duration
	maxKeys int
	counts  map[string]*rateCount
}

type rateCount struct {
	since time.Time
	n     int
}

func newRateLimiter(limit int, window time.Duration, maxKeys int) *rateLimiter {
	return &rateLimiter{limit: limit, window: window, maxKeys: maxKeys, counts: map[string]*rateCount{}}
}

// allow counts one event for every key and reports whether all of them are within
// the limit.
func (l *rateLimiter) allow(keys ...string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	ok := true
	for _, k := range keys {
		c := l.counts[k]
		if c == nil {
			if len(l.counts) >= l.maxKeys {
				clear(l.counts)
			}
			c = &rateCount{since: now}
			l.counts[k] = c
		}
		if now.Sub(c.since) >= l.window {
			c.since, c.n = now, 0
		}
		c.n++
		if c.n > l.limit {
			ok = false
		}
	}
	return ok
}

// recordDenied appends a login.failed or access.denied event, within the rate, and
// does not wait for it: the refusal is the answer whatever happens to the record.
func (s *Service) recordDenied(ev *events.Event) {
	keys := []string{"user:" + ev.UserID}
	if ev.RemoteAddr != "" {
		keys = append(keys, "addr:"+ev.RemoteAddr)
	}
	if !s.denied.allow(keys...) {
		return
	}
	ev.ID, ev.Version = events.NewID(), events.SchemaVersion
	if ev.Time == 0 {
		ev.Time = time.Now().UnixNano()
	}
	data, err := s.encode(context.Background(), ev)
	if err != nil {
		s.log.Warn("denied attempt not recorded", "type", ev.Type, "err", err)
		return
	}
	msg := &nats.Msg{Subject: s.layout.Subject(ev), Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, string(ev.Type))
	msg.Header.Set(events.HeaderVersion, fmt.Sprint(events.SchemaVersion))
	msg.Header.Set(nats.MsgIdHdr, ev.ID)
	if err := s.nc.PublishMsg(msg); err != nil {
		s.log.Warn("denied attempt not recorded", "type", ev.Type, "err", err)
	}
}

// accessDenied travels inside an E005001 refused for another user's data, so that
// Handle records it with the operation.
type accessDenied struct {
	c        *caller
	uid, sid string
}

func (*accessDenied) Error() string { return "" }

// deniedAccess records that c was refused op on user uid's data (a session of it when
// sid is set). Nothing is recorded for a user that does not exist.
func (s *Service) deniedAccess(ctx context.Context, c *caller, op Op, m *Meta, uid, sid string) {
	if !events.ValidUserID(uid) {
		return
	}
	if u, err := s.readUser(ctx, uid); err != nil || u == nil {
		return
	}
	ev := c.event(events.AccessDenied, *m)
	ev.UserID, ev.SessionID, ev.Op = uid, sid, string(op)
	s.recordDenied(ev)
}
