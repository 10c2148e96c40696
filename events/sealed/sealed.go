// Package sealed is the at-rest form of encrypted attribute values: AES-256-GCM under a
// versioned key ring, with each ciphertext naming the key that sealed it so that keys can
// be rotated. Keys come from a key file given by configuration; they are never stored in
// NATS.
//
// Sealed form: 0x01 | len(keyID) | keyID | 12-byte nonce | ciphertext+tag. The
// additional data binds a value to its owner and name (see AAD), so a sealed value copied
// to another attribute does not open.
package sealed

import (
	"bufio"
	"bytes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

const formatV1 = 0x01

// ErrOpen is returned for a sealed value that cannot be opened: unknown key, damaged,
// or sealed for another attribute.
var ErrOpen = errors.New("sealed: cannot open value")

// Keyring holds the keys that open values and the primary key that seals new ones.
type Keyring struct {
	primary string
	keys    map[string]cipher.AEAD
	// userKey, when set, finds the data key that opens a value sealed with a user's own
	// key (DataKey.Seal): nil key when the user has none (deleted).
	userKey func(userID string) (*DataKey, error)
}

// WithUserKeys makes the ring open values sealed with users' data keys too, finding
// each user's with find. Set it before the ring is used.
func (r *Keyring) WithUserKeys(find func(userID string) (*DataKey, error)) { r.userKey = find }

// NewKeyring builds a ring from key ids and 32-byte keys; primary seals new values.
func NewKeyring(primary string, keys map[string][]byte) (*Keyring, error) {
	r := &Keyring{primary: primary, keys: make(map[string]cipher.AEAD, len(keys))}
	for id, k := range keys {
		if id == "" || len(id) > 255 || strings.ContainsAny(id, " \t\r\n") {
			return nil, fmt.Errorf("sealed: bad key id %q", id)
		}
		if len(k) != 32 {
			return nil, fmt.Errorf("sealed: key %q has %d bytes, want 32", id, len(k))
		}
		aead, err := newGCM(k)
		if err != nil {
			return nil, err
		}
		r.keys[id] = aead
	}
	if _, ok := r.keys[primary]; !ok {
		return nil, fmt.Errorf("sealed: primary key %q is not in the ring", primary)
	}
	return r, nil
}

// Primary returns the id of the key that seals new values.
func (r *Keyring) Primary() string { return r.primary }

// IDs returns the ids of every key of the ring, sorted.
func (r *Keyring) IDs() []string {
	ids := make([]string, 0, len(r.keys))
	for id := range r.keys {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// AAD is the additional data of a value: owner user, session ("" for a user attribute)
// and attribute name.
func AAD(userID, sessionID, name string) []byte {
	return []byte(aadPrefix + userID + "\x00" + sessionID + "\x00" + name)
}

const aadPrefix = "attrd/v1\x00"

// Seal encrypts plain under the primary key.
func (r *Keyring) Seal(plain, aad []byte) ([]byte, error) {
	aead := r.keys[r.primary]
	out := make([]byte, 0, 2+len(r.primary)+aead.NonceSize()+len(plain)+aead.Overhead())
	out = append(out, formatV1, byte(len(r.primary)))
	out = append(out, r.primary...)
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	out = append(out, nonce...)
	return aead.Seal(out, nonce, plain, aad), nil
}

// KeyID returns the id of the key that sealed v.
func KeyID(v []byte) (string, error) {
	if len(v) < 2 || v[0] != formatV1 || len(v) < 2+int(v[1]) {
		return "", ErrOpen
	}
	return string(v[2 : 2+int(v[1])]), nil
}

// Open decrypts a sealed value: one sealed by the ring, or, with WithUserKeys, one
// sealed with the data key of the user its additional data names.
func (r *Keyring) Open(v, aad []byte) ([]byte, error) {
	if len(v) > 0 && v[0] == formatDataKey {
		return r.openForUser(v, aad)
	}
	id, err := KeyID(v)
	if err != nil {
		return nil, err
	}
	aead, ok := r.keys[id]
	if !ok {
		return nil, fmt.Errorf("%w: unknown key %q", ErrOpen, id)
	}
	rest := v[2+len(id):]
	if len(rest) < aead.NonceSize()+aead.Overhead() {
		return nil, ErrOpen
	}
	plain, err := aead.Open(nil, rest[:aead.NonceSize()], rest[aead.NonceSize():], aad)
	if err != nil {
		return nil, ErrOpen
	}
	return plain, nil
}

// LoadKeyFile reads a key file: one key a line, "<id> <base64 of 32 bytes>"; blank lines
// and lines starting with # are skipped. The first key is the primary.
func LoadKeyFile(path string) (*Keyring, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read key file: %w", err)
	}
	keys := map[string][]byte{}
	primary := ""
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("key file %s line %d: want \"<id> <base64 key>\"", path, n)
		}
		k, err := base64.StdEncoding.DecodeString(f[1])
		if err != nil {
			return nil, fmt.Errorf("key file %s line %d: %w", path, n, err)
		}
		if _, dup := keys[f[0]]; dup {
			return nil, fmt.Errorf("key file %s line %d: key id %q twice", path, n, f[0])
		}
		keys[f[0]] = k
		if primary == "" {
			primary = f[0]
		}
	}
	if primary == "" {
		return nil, fmt.Errorf("key file %s holds no key", path)
	}
	return NewKeyring(primary, keys)
}

// GenerateKeyFile writes a new key file with one random key, mode 0600. It refuses to
// overwrite an existing file.
func GenerateKeyFile(path string) error {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	line := "# attrd encryption keys: \"<id> <base64 key>\", the first seals new values\nk1 " + base64.StdEncoding.EncodeToString(k) + "\n"
	if _, err := f.WriteString(line); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
