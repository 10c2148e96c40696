package api

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// sessionCache keeps recently used sessions and their users, so that authenticating a
// request does not read KV twice. A watch on the projection's session and user keys
// drops an entry as soon as the projector changes it (logout, renew, approval), and no
// entry is used for longer than maxAge in any case.
//
// Reads may therefore see a session for the few milliseconds the watch takes after a
// logout handled by another instance; writes never do, because the projector checks
// the caller's session again at the event's time (invariant 6 holds in the fold).
type sessionCache struct {
	mu      sync.Mutex
	entries map[string]cachedSession // by session id
	maxAge  time.Duration
	size    int
}

type cachedSession struct {
	session *events.SessionRecord
	user    *events.UserRecord
	at      time.Time
}

func newSessionCache(maxAge time.Duration, size int) *sessionCache {
	return &sessionCache{entries: map[string]cachedSession{}, maxAge: maxAge, size: size}
}

// get returns a session and its user as cached, and whether the entry is fresh (no
// older than maxAge); ok is false when there is no entry.
func (c *sessionCache) get(sid string) (s *events.SessionRecord, u *events.UserRecord, fresh, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[sid]
	if !ok {
		return nil, nil, false, false
	}
	return e.session, e.user, time.Since(e.at) <= c.maxAge, true
}

func (c *sessionCache) put(sid string, s *events.SessionRecord, u *events.UserRecord) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.entries) >= c.size {
		clear(c.entries)
	}
	c.entries[sid] = cachedSession{session: s, user: u, at: time.Now()}
}

// forget drops a session (sid != "") or every session of a user.
func (c *sessionCache) forget(sid, uid string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if sid != "" {
		delete(c.entries, sid)
		return
	}
	for k, e := range c.entries {
		if e.user.UserID == uid {
			delete(c.entries, k)
		}
	}
}

// watch drops entries as the projection changes, until ctx is done. The KV watcher is
// an ordered consumer: it recreates itself after a disconnect, and while it cannot,
// maxAge still bounds staleness.
func (c *sessionCache) watch(ctx context.Context, kv jetstream.KeyValue) error {
	return events.FollowKV(ctx, kv, []string{"s.>", "u.>"}, func(e jetstream.KeyValueEntry) {
		switch k := e.Key(); {
		case strings.HasPrefix(k, "s."):
			c.forget(k[2:], "")
		case strings.HasPrefix(k, "u."):
			c.forget("", k[2:])
		}
	})
}
