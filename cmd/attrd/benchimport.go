package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/cmd/attrd/zatodb"
)

// benchImport measures attrd import (issue 22): it writes a Zato SSO database on
// SQLite with n users of ten attributes each (one encrypted with Zato's key, one
// expiring; the password hashes encrypted, as Zato's default), starts `attrd serve` as
// a child, runs `attrd import` as another child, and prints the items per second and
// the import's peak memory.
func benchImport(ctx context.Context, n, parallel int, stdout *os.File) error {
	dir, err := os.MkdirTemp("", "attrd-bench-import-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	keyText := zatodb.NewKey()
	key, _ := zatodb.ParseKey(keyText)
	keyFile := filepath.Join(dir, "secrets.conf")
	if err := os.WriteFile(keyFile, []byte("[secret_keys]\nkey1="+keyText+"\n"), 0o600); err != nil {
		return err
	}
	dbPath := filepath.Join(dir, "zato.db")
	start := time.Now()
	b, err := zatodb.Create(ctx, dbPath, key)
	if err != nil {
		return err
	}
	// Zato's default is 100,000 rounds; the hash is checked at a login, not by the
	// import, so its cost does not matter here.
	hash := api.PassLibHash("password", []byte("0123456789abcdef"), 1000)
	created := time.Now().Add(-24 * time.Hour)
	for i := range n {
		id := fmt.Sprintf("zusr%08d", i)
		if _, err := b.AddUser(ctx, zatodb.NewUser{ID: id, Username: fmt.Sprintf("user-%d", i), PasswordHash: hash,
			ApprovalStatus: "approved", Created: created}); err != nil {
			return err
		}
		for j := range 10 {
			a := zatodb.NewAttr{UserID: id, Name: fmt.Sprintf("attr.%d", j), Value: fmt.Sprintf("value %d of user %d", j, i), Created: created}
			switch j {
			case 0:
				a.Encrypted = true
			case 1:
				a.Expires = time.Now().Add(24 * time.Hour)
			}
			if err := b.AddAttr(ctx, a); err != nil {
				return err
			}
		}
		if i%10_000 == 9_999 {
			if err := b.Commit(ctx); err != nil {
				return err
			}
		}
	}
	if err := b.Close(); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "attrd bench --import %d: a Zato SSO database on SQLite, %d users and %d attributes, written in %s\n",
		n, n, 10*n, time.Since(start).Round(time.Second))
	child, err := startChild(ctx, dir, 2*time.Minute)
	if err != nil {
		return err
	}
	defer child.stop()
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	data := filepath.Join(dir, "data")
	cmd := exec.CommandContext(ctx, exe, "import", "--from", "sqlite:"+dbPath, "--zato-secret-key-file", keyFile,
		"--nats-url", "nats://"+child.natsAddr, "--creds", credentialFile(data), "--encryption-key-file", filepath.Join(data, "encryption.key"),
		"--progress=false", fmt.Sprintf("--parallel=%d", parallel))
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	start = time.Now()
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("attrd import: %w\n%s", err, out.String())
	}
	took := time.Since(start)
	peak := int64(0)
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		peak = ru.Maxrss // KiB on Linux
	}
	served, _ := metricValue(ctx, "http://"+child.httpAddr+"/metrics", "process_resident_memory_bytes")
	fmt.Fprint(stdout, out.String())
	fmt.Fprintf(stdout, "import: %s, %.0f users/s, %.0f items/s (users and attributes); peak memory of attrd import %d MB; attrd serve's resident memory after it %.0f MB (%d users at once)\n",
		took.Round(100*time.Millisecond), float64(n)/took.Seconds(), float64(11*n)/took.Seconds(), peak>>10, served/(1<<20), parallel)
	return nil
}
