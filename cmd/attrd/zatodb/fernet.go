package zatodb

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"time"
)

// Zato encrypts secrets (password hashes, encrypted attribute values, USTs) with
// Fernet (cryptography.fernet): a key of 32 bytes in URL-safe base64, the first 16
// signing (HMAC-SHA256), the last 16 encrypting (AES-128-CBC, PKCS #7); a token is
// URL-safe base64 of 0x80 | time (8 bytes) | IV (16) | ciphertext | HMAC (32). Tokens
// start "gAAAA"; Zato may prefix stored ones with "zato.secf.".

// Key is a Fernet key.
type Key struct{ sign, enc []byte }

// ErrToken is a token that is not Fernet's or does not open with the key.
var ErrToken = errors.New("not a Fernet token of this key")

// SecretPrefix is what Zato may put before a stored token (zato.common.const SECRETS).
const SecretPrefix = "zato.secf."

// ParseKey reads a Fernet key.
func ParseKey(s string) (*Key, error) {
	b, err := base64.URLEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != 32 {
		return nil, errors.New("a Fernet key is 32 bytes in URL-safe base64")
	}
	return &Key{sign: b[:16], enc: b[16:]}, nil
}

// LoadKey reads Zato's secret key from a file: the key alone, or Zato's secrets.conf
// (the key1 line of its [secret_keys] section).
func LoadKey(path string) (*Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	text := string(b)
	for _, line := range strings.Split(text, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok && strings.TrimSpace(k) == "key1" {
			text = v
			break
		}
	}
	return ParseKey(text)
}

// IsToken reports whether s looks like a Fernet token (as Zato's decrypt decides
// whether to decrypt: a "gAAA" or "zato.secf." prefix).
func IsToken(s string) bool {
	return strings.HasPrefix(s, "gAAA") || strings.HasPrefix(s, SecretPrefix)
}

// Decrypt opens a token.
func (k *Key) Decrypt(token string) ([]byte, error) {
	raw, err := base64.URLEncoding.DecodeString(strings.TrimPrefix(strings.TrimSpace(token), SecretPrefix))
	if err != nil || len(raw) < 1+8+16+16+32 || raw[0] != 0x80 || (len(raw)-1-8-16-32)%aes.BlockSize != 0 {
		return nil, ErrToken
	}
	body, sum := raw[:len(raw)-32], raw[len(raw)-32:]
	mac := hmac.New(sha256.New, k.sign)
	mac.Write(body)
	if !hmac.Equal(mac.Sum(nil), sum) {
		return nil, ErrToken
	}
	block, err := aes.NewCipher(k.enc)
	if err != nil {
		return nil, err
	}
	iv, ct := body[9:25], body[25:]
	plain := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(plain, ct)
	n := int(plain[len(plain)-1])
	if n < 1 || n > aes.BlockSize || !bytes.Equal(plain[len(plain)-n:], bytes.Repeat([]byte{byte(n)}, n)) {
		return nil, ErrToken
	}
	return plain[:len(plain)-n], nil
}

// Encrypt makes a token, as Zato would (tests, and tools that build Zato databases).
func (k *Key) Encrypt(plain []byte) string {
	iv := make([]byte, 16)
	rand.Read(iv)
	n := aes.BlockSize - len(plain)%aes.BlockSize
	padded := append(bytes.Clone(plain), bytes.Repeat([]byte{byte(n)}, n)...)
	block, _ := aes.NewCipher(k.enc)
	ct := make([]byte, len(padded))
	cipher.NewCBCEncrypter(block, iv).CryptBlocks(ct, padded)
	body := []byte{0x80}
	body = binary.BigEndian.AppendUint64(body, uint64(time.Now().Unix()))
	body = append(append(body, iv...), ct...)
	mac := hmac.New(sha256.New, k.sign)
	mac.Write(body)
	return base64.URLEncoding.EncodeToString(mac.Sum(body))
}

// NewKey makes a random key, in the form Zato keeps it.
func NewKey() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.URLEncoding.EncodeToString(b)
}
