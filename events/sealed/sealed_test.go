package sealed

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func mustRing(t *testing.T) *Keyring {
	t.Helper()
	path := filepath.Join(t.TempDir(), "k")
	if err := GenerateKeyFile(path); err != nil {
		t.Fatal(err)
	}
	r, err := LoadKeyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestSealedValuesOpenOnlyForTheirOwnAttribute(t *testing.T) {
	r := mustRing(t)
	plain := []byte(`"card-4111"`)
	v, err := r.Seal(plain, AAD("u1", "", "card"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(v, plain) {
		t.Fatal("the sealed value holds the plaintext")
	}
	if id, _ := KeyID(v); id != r.Primary() {
		t.Fatalf("key id %q, want %q", id, r.Primary())
	}
	got, err := r.Open(v, AAD("u1", "", "card"))
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("open: %q %v", got, err)
	}
	for _, aad := range [][]byte{AAD("u2", "", "card"), AAD("u1", "s", "card"), AAD("u1", "", "other")} {
		if _, err := r.Open(v, aad); !errors.Is(err, ErrOpen) {
			t.Fatalf("opened with the wrong owner or name: %v", err)
		}
	}
	v[len(v)-1] ^= 1
	if _, err := r.Open(v, AAD("u1", "", "card")); !errors.Is(err, ErrOpen) {
		t.Fatal("a damaged value opened")
	}
	if _, err := r.Open([]byte{1}, nil); !errors.Is(err, ErrOpen) {
		t.Fatal("a truncated value opened")
	}
}

func TestKeyFileIsPrivateAndNeverOverwritten(t *testing.T) {
	path := filepath.Join(t.TempDir(), "k")
	if err := GenerateKeyFile(path); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", st.Mode().Perm())
	}
	if err := GenerateKeyFile(path); err == nil {
		t.Fatal("an existing key file was overwritten")
	}
}

func TestOlderKeysStillOpenAfterRotation(t *testing.T) {
	old, _ := NewKeyring("k1", map[string][]byte{"k1": bytes.Repeat([]byte{1}, 32)})
	v, _ := old.Seal([]byte("x"), nil)
	rotated, err := NewKeyring("k2", map[string][]byte{"k1": bytes.Repeat([]byte{1}, 32), "k2": bytes.Repeat([]byte{2}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := rotated.Open(v, nil); err != nil || string(got) != "x" {
		t.Fatalf("open with the old key after rotation: %v", err)
	}
	if _, err := LoadKeyFile(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("a missing key file loaded")
	}
}
