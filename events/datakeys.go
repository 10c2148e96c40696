package events

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events/sealed"
)

// DataKeysBucket holds every user's data key, wrapped by the deployment's key ring
// (sealed.Keyring.Wrap), one key k.<uid> with one revision: deleting a user purges
// it, and what the user's events hold sealed under it is erased (personal.go).
const DataKeysBucket = "attrd_datakeys"

// DataKeysConfig is the data keys bucket's stream: a key-value bucket of one revision a
// key, replicated as the rest, read from its leader, and, unlike what a KV config
// makes, allowing a message to be deleted, so that a destroyed key's message is erased
// (overwritten on disk; DenyDelete cannot be turned off once a stream has it).
func (c StoreConfig) DataKeysConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:              KVStream(DataKeysBucket),
		Description:       "attrd users' data keys, wrapped",
		Subjects:          []string{"$KV." + DataKeysBucket + ".>"},
		MaxMsgsPerSubject: 1,
		MaxBytes:          -1,
		MaxMsgs:           -1,
		MaxMsgSize:        -1,
		Storage:           jetstream.FileStorage,
		Replicas:          max(c.Replicas, 1),
		AllowRollup:       true,
		DenyPurge:         false,
		DenyDelete:        false,
		Discard:           jetstream.DiscardNew,
		Duplicates:        2 * time.Minute,
	}
}

// DataKeyKey is the key of a user's wrapped data key.
func DataKeyKey(uid string) string { return "k." + uid }

// DataKeys reads, makes and destroys users' data keys, with a cache: a key read is
// kept for dataKeyTTL, so that a key destroyed on another instance is gone from this
// one's memory soon after.
//
// A destroyed key leaves a tombstone (erasedMark) in its place, so that no key is made
// again for a deleted user: what a late request about them holds is dropped, not
// sealed under a new key that would not open their earlier events.
type DataKeys struct {
	kv   jetstream.KeyValue
	st   jetstream.Stream // the bucket's, for secure deletes
	ring *sealed.Keyring
	mu   sync.Mutex
	keys map[string]cachedKey
}

type cachedKey struct {
	key    *sealed.DataKey // nil: the user has none
	erased bool            // the user's key was destroyed
	at     time.Time
}

// erasedMark is the value left where a user's data key was destroyed.
var erasedMark = []byte("erased")

// ErrErased says a user's data key was destroyed: the user was deleted.
var ErrErased = errors.New("the user was deleted: their data key is destroyed")

// dataKeyTTL is how long a data key (or its absence) is kept in memory, and
// dataKeysCached how many are. A key destroyed on another instance leaves this one's
// memory as soon as its watch (Follow) sees it; the TTL bounds it when nothing
// follows.
const (
	dataKeyTTL     = 5 * time.Minute
	dataKeysCached = 100_000
)

// Follow drops from the cache every key destroyed elsewhere, as the bucket's changes
// come, until ctx ends: so that an instance does not open a deleted user's data with a
// key it read before the deletion.
func (d *DataKeys) Follow(ctx context.Context) error {
	err := FollowKV(ctx, d.kv, nil, func(e jetstream.KeyValueEntry) {
		if e.Operation() != jetstream.KeyValuePut || bytes.Equal(e.Value(), erasedMark) {
			d.forget(strings.TrimPrefix(e.Key(), "k."))
		}
	})
	if err != nil {
		return fmt.Errorf("follow the data keys: %w", err)
	}
	return nil
}

// NewDataKeys returns the data keys of the bucket kv (whose stream is st), wrapped by
// ring; ring then opens values sealed with them too (sealed.Keyring.WithUserKeys).
func NewDataKeys(kv jetstream.KeyValue, st jetstream.Stream, ring *sealed.Keyring) *DataKeys {
	d := &DataKeys{kv: kv, st: st, ring: ring, keys: map[string]cachedKey{}}
	ring.WithUserKeys(func(uid string) (*sealed.DataKey, error) {
		ctx, cancel := context.WithTimeout(context.Background(), dataKeyReadTimeout)
		defer cancel()
		return d.Get(ctx, uid)
	})
	return d
}

// dataKeyReadTimeout bounds the read of a data key to open a value (the ring's Open
// takes no context).
const dataKeyReadTimeout = 5 * time.Second

// SealValue seals an attribute value of uid's with uid's data key (made if missing);
// ErrErased for a deleted user.
func (d *DataKeys) SealValue(ctx context.Context, uid string, plain, aad []byte) ([]byte, error) {
	k, err := d.Ensure(ctx, uid)
	if err != nil {
		return nil, err
	}
	return k.Seal(plain, aad)
}

// OpenDataKeys opens the data keys bucket of a deployment (nil, nil when it has none:
// one made before version 3).
func OpenDataKeys(ctx context.Context, js jetstream.JetStream, ring *sealed.Keyring) (*DataKeys, error) {
	kv, err := js.KeyValue(ctx, DataKeysBucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	st, err := js.Stream(ctx, KVStream(DataKeysBucket))
	if err != nil {
		return nil, err
	}
	return NewDataKeys(kv, st, ring), nil
}

// Get returns uid's data key; nil when there is none (the user was deleted, or never
// had one).
func (d *DataKeys) Get(ctx context.Context, uid string) (*sealed.DataKey, error) {
	c, err := d.lookup(ctx, uid)
	return c.key, err
}

// Erased reports whether uid's data key was destroyed (the user was deleted).
func (d *DataKeys) Erased(ctx context.Context, uid string) (bool, error) {
	c, err := d.lookup(ctx, uid)
	return c.erased, err
}

// lookup reads uid's data key, from the cache when it is fresh there.
func (d *DataKeys) lookup(ctx context.Context, uid string) (cachedKey, error) {
	if uid == "" {
		return cachedKey{}, nil
	}
	if c, ok := d.cached(uid); ok {
		return c, nil
	}
	e, err := d.kv.Get(ctx, DataKeyKey(uid))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return d.keep(uid, cachedKey{}), nil
	}
	if err != nil {
		return cachedKey{}, fmt.Errorf("data key of %s: %w", uid, err)
	}
	if bytes.Equal(e.Value(), erasedMark) {
		return d.keep(uid, cachedKey{erased: true}), nil
	}
	k, err := d.ring.Unwrap(e.Value(), uid)
	if err != nil {
		return cachedKey{}, fmt.Errorf("data key of %s: %w", uid, err)
	}
	return d.keep(uid, cachedKey{key: k}), nil
}

// Ensure returns uid's data key, making one if the user has none yet (a new user, or
// one made before version 3); ErrErased for a deleted user. Two instances making one
// at once agree on the first.
func (d *DataKeys) Ensure(ctx context.Context, uid string) (*sealed.DataKey, error) {
	return d.ensure(ctx, uid, 3)
}

func (d *DataKeys) ensure(ctx context.Context, uid string, tries int) (*sealed.DataKey, error) {
	c, err := d.lookup(ctx, uid)
	switch {
	case err != nil:
		return nil, err
	case c.erased:
		return nil, ErrErased
	case c.key != nil:
		return c.key, nil
	}
	raw, err := sealed.NewDataKey()
	if err != nil {
		return nil, err
	}
	wrapped, err := d.ring.Wrap(raw, uid)
	if err != nil {
		return nil, err
	}
	if _, err := d.kv.Create(ctx, DataKeyKey(uid), wrapped); err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) && tries > 1 {
			d.forget(uid)
			return d.ensure(ctx, uid, tries-1) // another instance made it first, or destroyed it
		}
		return nil, fmt.Errorf("make the data key of %s: %w", uid, err)
	}
	k, err := sealed.OpenDataKey(raw)
	if err == nil {
		d.keep(uid, cachedKey{key: k})
	}
	return k, err
}

// Destroy destroys uid's data key: its message is erased from the bucket's stream
// (overwritten on disk, not only marked deleted), then a tombstone takes its place.
// What the key sealed cannot be opened again, in any copy of the log, taken before or
// after. Destroying a key twice, or one never made, is no error.
func (d *DataKeys) Destroy(ctx context.Context, uid string) error {
	d.forget(uid)
	defer d.forget(uid) // a lookup racing the destruction may have kept the key
	e, err := d.kv.Get(ctx, DataKeyKey(uid))
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
	case err != nil:
		return fmt.Errorf("data key of %s: %w", uid, err)
	case bytes.Equal(e.Value(), erasedMark):
		return nil // destroyed already
	default:
		// NATS subtlety: a message the stream removes (a purge, or a new revision in a
		// bucket of one) stays on disk until its block is compacted; a secure delete
		// overwrites it. So the key's message is erased first, and only then replaced.
		// A crash in between leaves no key and no tombstone: the key is gone all the same.
		err := d.st.SecureDeleteMsg(ctx, e.Revision())
		var apiErr *jetstream.APIError
		if err != nil && !(errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeMessageNotFound) {
			return fmt.Errorf("erase the data key of %s: %w", uid, err)
		}
	}
	if _, err := d.kv.Put(ctx, DataKeyKey(uid), erasedMark); err != nil {
		return fmt.Errorf("leave a tombstone for the data key of %s: %w", uid, err)
	}
	return nil
}

func (d *DataKeys) cached(uid string) (cachedKey, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	c, ok := d.keys[uid]
	if !ok || time.Since(c.at) > dataKeyTTL {
		return cachedKey{}, false
	}
	return c, true
}

func (d *DataKeys) keep(uid string, c cachedKey) cachedKey {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.keys) >= dataKeysCached {
		clear(d.keys) // bounded: start again rather than track recency
	}
	c.at = time.Now()
	d.keys[uid] = c
	return c
}

func (d *DataKeys) forget(uid string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.keys, uid)
}

// Seal seals ev's personal data with its user's and actor's data keys, making them
// when missing (a new user's, or one made before version 3). What belongs to a
// deleted user (a late request about them, which the fold rejects) is dropped.
//
// A key is made only for a part that holds something: an event about a user id that
// names nobody (an access.denied for a made-up id) makes no key.
func (d *DataKeys) Seal(ctx context.Context, ev *Event) error {
	target, actor := PersonalOwners(ev)
	var tk, ak *sealed.DataKey
	var err error
	if hasTargetPersonal(ev) {
		tk, err = d.Ensure(ctx, target)
		if errors.Is(err, ErrErased) {
			dropTargetPersonal(ev)
		} else if err != nil {
			return err
		}
	}
	if ev.ActorName != "" || ev.RemoteAddr != "" || ev.UserAgent != "" {
		if actor == target && tk != nil {
			ak = tk
		} else if ak, err = d.Ensure(ctx, actor); errors.Is(err, ErrErased) {
			dropActorPersonal(ev)
		} else if err != nil {
			return err
		}
	}
	return SealPersonal(ev, tk, ak)
}

// hasTargetPersonal reports whether ev holds anything personal of its user.
func hasTargetPersonal(ev *Event) bool {
	if ev.User != nil && (ev.User.Username != "" || ev.User.PasswordHash != "") {
		return true
	}
	return slices.ContainsFunc(ev.Attrs, func(it AttrItem) bool { return it.Value != nil })
}

// Open opens ev's personal data with the keys there are; what belongs to a user
// without one (deleted) stays sealed, and ev.Erased says so.
func (d *DataKeys) Open(ctx context.Context, ev *Event) error {
	if ev.PII == nil && ev.APII == nil {
		return nil
	}
	target, actor := PersonalOwners(ev)
	tk, err := d.Get(ctx, target)
	if err != nil {
		return err
	}
	ak := tk
	if actor != target {
		if ak, err = d.Get(ctx, actor); err != nil {
			return err
		}
	}
	OpenPersonal(ev, tk, ak)
	return nil
}

// dropTargetPersonal removes what ev holds of its user (who was deleted).
func dropTargetPersonal(ev *Event) {
	if ev.User != nil {
		ev.User.Username, ev.User.PasswordHash = "", ""
	}
	for i := range ev.Attrs {
		ev.Attrs[i].Value = nil
	}
}

// dropActorPersonal removes what ev holds of its actor (who was deleted).
func dropActorPersonal(ev *Event) { ev.ActorName, ev.RemoteAddr, ev.UserAgent = "", "", "" }

// Rotation is what Rotate did.
type Rotation struct {
	Rewrapped int // wrapped again with the ring's primary key
	Current   int // wrapped with it already
	Erased    int // tombstones of deleted users' keys
}

// Rotate wraps every data key again with the ring's primary key (the key file's first),
// so that the other keys of the file wrap none; after it they can be removed from the
// file. Each key is replaced with compare-and-set, so that a key destroyed meanwhile
// stays destroyed; a rotation stopped half-way is finished by running it again.
// limit > 0 stops after that many keys re-wrapped.
func (d *DataKeys) Rotate(ctx context.Context, limit int) (Rotation, error) {
	var r Rotation
	lister, err := d.kv.ListKeys(ctx)
	if err != nil {
		return r, fmt.Errorf("list the data keys: %w", err)
	}
	var keys []string
	for k := range lister.Keys() {
		keys = append(keys, k)
	}
	for _, key := range keys {
		if limit > 0 && r.Rewrapped >= limit {
			break
		}
		uid := strings.TrimPrefix(key, "k.")
		for try := 0; ; try++ {
			e, err := d.kv.Get(ctx, key)
			if errors.Is(err, jetstream.ErrKeyNotFound) {
				break
			}
			if err != nil {
				return r, fmt.Errorf("data key of %s: %w", uid, err)
			}
			if bytes.Equal(e.Value(), erasedMark) {
				r.Erased++
				break
			}
			out, rewrapped, err := d.ring.Rewrap(e.Value(), uid)
			if err != nil {
				return r, fmt.Errorf("data key of %s: %w", uid, err)
			}
			if !rewrapped {
				r.Current++
				break
			}
			if _, err := d.kv.Update(ctx, key, out, e.Revision()); err != nil {
				if try < 3 && errors.Is(err, jetstream.ErrKeyExists) {
					continue // changed meanwhile (destroyed, most likely): read it again
				}
				return r, fmt.Errorf("re-wrap the data key of %s: %w", uid, err)
			}
			d.forget(uid)
			r.Rewrapped++
			break
		}
	}
	return r, nil
}
