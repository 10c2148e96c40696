package main

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// TestRotatingTheKeyFileReWrapsDataKeysAndTheOldKeyCanGo: users with encrypted and
// plain values and a history; a new key is put first in the key file and `attrd keys
// rotate` runs, after a rotation stopped half-way (it finishes it, re-wrapping only
// what was left). Then attrd restarts with a key file holding the new key alone, and
// every value still reads, decrypted, as does the history; the replay reproduces
// the projection.
func TestRotatingTheKeyFileReWrapsDataKeysAndTheOldKeyCanGo(t *testing.T) {
	dir := t.TempDir()
	oldFile := filepath.Join(dir, "encryption.key")
	f := newFixture(t, func(c *Config) { c.DataDir = dir })
	ctx := ctxT(t)
	for _, name := range []string{"u1", "u2", "u3"} {
		id, _ := f.regularUser(t, name)
		a := f.admin.UserByID(id).Attr
		expectCode(t, a.Create(ctx, "secret", name+"-secret", client.Encrypt(true)), noError)
		expectCode(t, a.Create(ctx, "plain", name+"-plain"), noError)
	}
	old, err := os.ReadFile(oldFile)
	if err != nil {
		t.Fatal(err)
	}
	newKey, _ := sealed.NewDataKey()
	newLine := "k2 " + base64.StdEncoding.EncodeToString(newKey) + "\n"
	bothFile := filepath.Join(t.TempDir(), "both.key")
	if err := os.WriteFile(bothFile, append([]byte(newLine), old...), 0o600); err != nil {
		t.Fatal(err)
	}
	// A rotation that stops after one key, as a kill -9 would leave it.
	both, err := sealed.LoadKeyFile(bothFile)
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(f.srv.apiConn)
	dk, err := events.OpenDataKeys(ctx, js, both)
	if err != nil {
		t.Fatal(err)
	}
	if r, err := dk.Rotate(ctx, 1); err != nil || r.Rewrapped != 1 {
		t.Fatalf("the first, stopped rotation: %+v %v", r, err)
	}
	code, out := runCmd(t, "keys", "rotate", "--nats-url", f.srv.ClientURL(), "--encryption-key-file="+bothFile)
	// admin, alice and u1..u3 have data keys: 5, one of them re-wrapped already.
	if code != 0 || !strings.Contains(out, "re-wrapped 4 data keys with key k2 (1 were already") || !strings.Contains(out, "can now be removed") {
		t.Fatalf("attrd keys rotate: exit %d\n%s", code, out)
	}
	if code, out := runCmd(t, "keys", "rotate", "--nats-url", f.srv.ClientURL(), "--encryption-key-file="+bothFile); code != 0 || !strings.Contains(out, "re-wrapped 0") {
		t.Fatalf("a second rotation: exit %d\n%s", code, out)
	}
	if err := f.srv.Close(); err != nil {
		t.Fatal(err)
	}

	newFile := filepath.Join(t.TempDir(), "new.key")
	if err := os.WriteFile(newFile, []byte(newLine), 0o600); err != nil {
		t.Fatal(err)
	}
	s2 := mustStart(t, func(c *Config) { c.DataDir, c.KeyFile = dir, newFile })
	admin := mustLogin(t, mustClient(t, s2), "admin", adminPassword)
	u1 := mustLogin(t, mustClient(t, s2), "u1", "u1-pw")
	me, err := u1.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := me.Attr.Get(ctx, "secret", client.Decrypt(true))
	if err != nil || string(got.Value) != `"u1-secret"` {
		t.Fatalf("an encrypted value with the new key alone: %+v %v", got, err)
	}
	expectCode(t, me.Attr.Update(ctx, "secret", "u1-new", client.Encrypt(true)), noError)
	if _, err := admin.CreateUser(ctx, "after", "after-pw", false); err != nil {
		t.Fatal(err)
	}
	code, hist := runCmd(t, "history", "--user", "u1", "--json", "--decrypt", "--nats-url", s2.ClientURL(), "--encryption-key-file="+newFile)
	if code != 0 || !strings.Contains(hist, "u1-secret") || !strings.Contains(hist, "u1-plain") || !strings.Contains(hist, `"username":"u1"`) {
		t.Fatalf("history with the new key alone: exit %d\n%s", code, hist)
	}
	code, out = runCmd(t, "replay", "--verify", "--nats-url", s2.ClientURL(), "--encryption-key-file="+newFile)
	if code != 0 || !strings.Contains(out, "reproduces") {
		t.Fatalf("replay --verify with the new key alone: exit %d\n%s", code, out)
	}
}
