package zatodb

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestAFernetTokenOpensWithItsKeyAndNoOther(t *testing.T) {
	k, err := ParseKey(NewKey())
	if err != nil {
		t.Fatal(err)
	}
	tok := k.Encrypt([]byte("$pbkdf2-sha512$1000$salt$sum"))
	if !strings.HasPrefix(tok, "gAAAA") || !IsToken(tok) || !IsToken(SecretPrefix+tok) {
		t.Fatalf("a token looks like Zato's: %s", tok)
	}
	for _, in := range []string{tok, SecretPrefix + tok} {
		if got, err := k.Decrypt(in); err != nil || string(got) != "$pbkdf2-sha512$1000$salt$sum" {
			t.Fatalf("%q: %q %v", in, got, err)
		}
	}
	other, _ := ParseKey(NewKey())
	if _, err := other.Decrypt(tok); err != ErrToken {
		t.Errorf("another key opens it: %v", err)
	}
	b := []byte(tok)
	b[len(b)/2] ^= 1
	if _, err := k.Decrypt(string(b)); err == nil {
		t.Error("a changed token opens")
	}
	if _, err := k.Decrypt("gAAAAshort"); err != ErrToken {
		t.Errorf("a short token: %v", err)
	}
}

func TestZatosKeyIsReadAloneOrFromSecretsConf(t *testing.T) {
	key := NewKey()
	dir := t.TempDir()
	alone := filepath.Join(dir, "key")
	conf := filepath.Join(dir, "secrets.conf")
	os.WriteFile(alone, []byte(key+"\n"), 0o600)
	os.WriteFile(conf, []byte("[secret_keys]\nkey1 = "+key+"\n\n[zato]\nwell_known_data = gAAAA\n"), 0o600)
	a, err1 := LoadKey(alone)
	c, err2 := LoadKey(conf)
	if err1 != nil || err2 != nil || string(a.sign) != string(c.sign) || string(a.enc) != string(c.enc) {
		t.Fatalf("%v %v", err1, err2)
	}
	os.WriteFile(alone, []byte("not a key"), 0o600)
	if _, err := LoadKey(alone); err == nil {
		t.Error("a file without a key")
	}
}
