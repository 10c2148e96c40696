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
	st jetstream.Stream // the bucket's: forget purges a username's subject
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

// blocked reports until when a login for username from addr is refused (zero: it is
// not), and how many failures the username has on record.
func (t *throttle) blocked(ctx context.Context, username, addr string) (time.Time, int, error) {
	uk, ak := throttleKeys(username, addr)
	var until int64
	userFailures := 0
	for _, k := range []string{uk, ak} {
		if k == "" {
			continue
		}
		f, _, err := t.read(ctx, k)
		if err != nil {
			return time.Time{}, 0, err
		}
		if k == uk {
			userFailures = f.N
		}
		until = max(until, f.Until)
	}
	if until <= time.Now().UnixNano() {
		return time.Time{}, userFailures, nil
	}
	return time.Unix(0, until), userFailures, nil
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
	if err := t.bump(ctx, uk, 1); err != nil {
		return err
	}
	if ak != "" {
		return t.bump(ctx, ak, 1)
	}
	return nil
}

// free is how many failures key may have before the back-off starts.
func (t *throttle) free(key string) int {
	if key[0] == 'a' {
		return t.perAddr
	}
	return t.perUser
}

// bump adds n failures to key with compare-and-set (instances race on it), and sets
// the back-off once more than the free failures were counted.
func (t *throttle) bump(ctx context.Context, key string, n int) error {
	for try := 0; try < 5; try++ {
		f, rev, err := t.read(ctx, key)
		if err != nil {
			return err
		}
		f.N += n
		if over := f.N - t.free(key); over > 0 {
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

// forget removes every message about username from the bucket's stream, its subject
// (which holds the username) included: a purge of the key would leave a marker there.
func (t *throttle) forget(ctx context.Context, username string) error {
	uk, _ := throttleKeys(username, "")
	return t.st.Purge(ctx, jetstream.WithPurgeSubject(events.KVSubject(events.ThrottleBucket, uk)))
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
