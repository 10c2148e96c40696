package sealed

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
)

// Data keys: one user's own AES-256-GCM key, which seals what is personal in that
// user's events (crypto-shredding: destroying the key erases it, in every copy of the
// log). A data key is stored wrapped (sealed) by the deployment's key ring, bound to
// its user, and is never written anywhere in clear.
//
// Sealed form: 0x02 | 12-byte nonce | ciphertext+tag. The key is the one of the user
// the value belongs to; the additional data binds it to its place (see callers).

const formatDataKey = 0x02

// DataKey is a user's data key, ready to seal and open.
type DataKey struct {
	aead cipher.AEAD
	mac  []byte // the key of Fingerprint, derived from the data key
}

// NewDataKey returns 32 random bytes: a new user's data key, to be wrapped.
func NewDataKey() ([]byte, error) {
	k := make([]byte, 32)
	_, err := rand.Read(k)
	return k, err
}

// OpenDataKey makes a DataKey of a key's 32 bytes.
func OpenDataKey(raw []byte) (*DataKey, error) {
	if len(raw) != 32 {
		return nil, fmt.Errorf("sealed: a data key has %d bytes, want 32", len(raw))
	}
	aead, err := newGCM(raw)
	if err != nil {
		return nil, err
	}
	h := hmac.New(sha256.New, raw)
	h.Write([]byte("attrd/fingerprint/v1"))
	return &DataKey{aead: aead, mac: h.Sum(nil)}, nil
}

// Fingerprint returns a keyed hash of s (HMAC-SHA256 under a key derived from the
// data key), in base64: it tells two equal inputs apart from different ones, and once
// the data key is destroyed nobody can test a guess of s against it.
func (k *DataKey) Fingerprint(s string) string {
	h := hmac.New(sha256.New, k.mac)
	h.Write([]byte(s))
	return base64.RawStdEncoding.EncodeToString(h.Sum(nil))
}

// newGCM returns AES-256-GCM under a 32-byte key.
func newGCM(k []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// Seal encrypts plain under the data key.
func (k *DataKey) Seal(plain, aad []byte) ([]byte, error) {
	nonce := make([]byte, k.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	out := make([]byte, 0, 1+len(nonce)+len(plain)+k.aead.Overhead())
	out = append(out, formatDataKey)
	out = append(out, nonce...)
	return k.aead.Seal(out, nonce, plain, aad), nil
}

// Open decrypts a value sealed by Seal.
func (k *DataKey) Open(v, aad []byte) ([]byte, error) {
	n := k.aead.NonceSize()
	if len(v) < 1+n+k.aead.Overhead() || v[0] != formatDataKey {
		return nil, ErrOpen
	}
	plain, err := k.aead.Open(nil, v[1:1+n], v[1+n:], aad)
	if err != nil {
		return nil, ErrOpen
	}
	return plain, nil
}

// wrapAAD binds a wrapped data key to its user.
func wrapAAD(userID string) []byte { return []byte("attrd/datakey/v1\x00" + userID) }

// Wrap seals a user's data key under the ring's primary key.
func (r *Keyring) Wrap(raw []byte, userID string) ([]byte, error) {
	return r.Seal(raw, wrapAAD(userID))
}

// Unwrap opens a user's wrapped data key, with whichever key of the ring wrapped it.
func (r *Keyring) Unwrap(wrapped []byte, userID string) (*DataKey, error) {
	raw, err := r.Open(wrapped, wrapAAD(userID))
	if err != nil {
		return nil, err
	}
	return OpenDataKey(raw)
}

// Rewrap re-seals a wrapped data key under the primary key; rewrapped is false when
// the primary key wrapped it already.
func (r *Keyring) Rewrap(wrapped []byte, userID string) (out []byte, rewrapped bool, err error) {
	id, err := KeyID(wrapped)
	if err != nil {
		return nil, false, err
	}
	if id == r.primary {
		return wrapped, false, nil
	}
	raw, err := r.Open(wrapped, wrapAAD(userID))
	if err != nil {
		return nil, false, err
	}
	out, err = r.Wrap(raw, userID)
	return out, err == nil, err
}

// ErrNoUserKey says a value is sealed with the data key of a user who has none any
// more (deleted), or that the reader has no way to find users' keys.
var ErrNoUserKey = fmt.Errorf("%w: its user's data key is gone", ErrOpen)

// openForUser opens a value sealed with the data key of the user aad names.
func (r *Keyring) openForUser(v, aad []byte) ([]byte, error) {
	uid, ok := userOfAAD(aad)
	if r.userKey == nil || !ok {
		return nil, ErrNoUserKey
	}
	k, err := r.userKey(uid)
	if err != nil {
		return nil, err
	}
	if k == nil {
		return nil, ErrNoUserKey
	}
	return k.Open(v, aad)
}

// userOfAAD returns the user an attribute value's additional data (AAD) names.
func userOfAAD(aad []byte) (string, bool) {
	rest, ok := bytes.CutPrefix(aad, []byte(aadPrefix))
	if !ok {
		return "", false
	}
	uid, _, ok := bytes.Cut(rest, []byte{0})
	return string(uid), ok
}
