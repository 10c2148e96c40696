package api

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// Login throttling: repeated failed logins for one username, and from one address,
// are answered E005001 without checking the password (no argon2 work) for a while
// that doubles with each failure, capped at a few minutes, so that guessing is slow
// and a real user is never locked out for long. A success resets the username's
// count. The counters live in the throttle bucket (events.ThrottleBucket): every
// instance sees them, and they survive restarts; one untouched for an hour is
// forgotten.
type throttle struct {
	kv jetstream.KeyValue
	// Failures allowed before the back-off starts, per username and per address.
	perUser, perAddr int
	maxBackoff       time.Duration
}

// Defaults of login throttling.
const (
	ThrottleFreeUserFailures = 5
	ThrottleFreeAddrFailures = 30
	ThrottleMaxBackoff       = 5 * time.Minute
)

// failures is one counter.
type failures struct {
	N     int   `msgpack:"n"`
	Until int64 `msgpack:"until"` // refused until (Unix ns)
}

func throttleKeys(username, addr string) (user, address string) {
	user = "u." + events.EncodeName(username)
	if addr != "" {
		address = "a." + events.EncodeName(addr)
	}
	return user, address
}

// blocked reports whether a login for username from addr is refused now, and how
// many failures the username has on record.
func (t *throttle) blocked(ctx context.Context, username, addr string) (bool, int, error) {
	uk, ak := throttleKeys(username, addr)
	now := time.Now().UnixNano()
	userFailures := 0
	for _, k := range []string{uk, ak} {
		if k == "" {
			continue
		}
		f, _, err := t.read(ctx, k)
		if err != nil {
			return false, 0, err
		}
		if k == uk {
			userFailures = f.N
		}
		if f.Until > now {
			return true, userFailures, nil
		}
	}
	return false, userFailures, nil
}

func (t *throttle) read(ctx context.Context, key string) (failures, uint64, error) {
	var f failures
	e, err := t.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return f, 0, nil
	}
	if err != nil {
		return f, 0, err
	}
	return f, e.Revision(), events.Unmarshal(e.Value(), &f)
}

// failed counts a failed login for username and from addr.
func (t *throttle) failed(ctx context.Context, username, addr string) error {
	uk, ak := throttleKeys(username, addr)
	if err := t.bump(ctx, uk, t.perUser); err != nil {
		return err
	}
	if ak != "" {
		return t.bump(ctx, ak, t.perAddr)
	}
	return nil
}

// bump adds a failure to key with compare-and-set (instances race on it), and sets
// the back-off once more than free failures were counted.
func (t *throttle) bump(ctx context.Context, key string, free int) error {
	for try := 0; try < 5; try++ {
		f, rev, err := t.read(ctx, key)
		if err != nil {
			return err
		}
		f.N++
		if over := f.N - free; over > 0 {
			backoff := t.maxBackoff
			if over < 20 {
				backoff = min(time.Second<<(over-1), t.maxBackoff)
			}
			f.Until = time.Now().Add(backoff).UnixNano()
		}
		data, _ := events.Marshal(&f)
		if rev == 0 {
			_, err = t.kv.Create(ctx, key, data)
		} else {
			_, err = t.kv.Update(ctx, key, data, rev)
		}
		if err == nil || !errors.Is(err, jetstream.ErrKeyExists) && !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return err
		}
	}
	return nil // lost every race: others counted meanwhile
}

// succeeded resets username's count.
func (t *throttle) succeeded(ctx context.Context, username string) error {
	uk, _ := throttleKeys(username, "")
	err := t.kv.Purge(ctx, uk)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	return err
}
