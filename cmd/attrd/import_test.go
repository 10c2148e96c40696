package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/cmd/attrd/zatodb"
	"github.com/attrd/attrd/events"
)

// zatoFixture is a Zato SSO database on SQLite, written as Zato would, with its key.
type zatoFixture struct {
	path, keyFile string
	created       time.Time
	aliceID       string
}

// zatoPasswordRounds is what the fixtures hash with (Zato's default is 100,000; fewer
// keep the race detector's run short).
const zatoPasswordRounds = 1000

func newZatoFixture(t *testing.T) *zatoFixture {
	t.Helper()
	z, key := newZatoKey(t)
	z.path = filepath.Join(t.TempDir(), "zato.db")
	b, err := zatodb.Create(context.Background(), z.path, key)
	if err != nil {
		t.Fatal(err)
	}
	z.fill(t, b)
	return z
}

// newZatoKey makes a fixture's Zato key and its secrets.conf, as a Zato server's
// repository holds it.
func newZatoKey(t *testing.T) (*zatoFixture, *zatodb.Key) {
	t.Helper()
	z := &zatoFixture{keyFile: filepath.Join(t.TempDir(), "secrets.conf"),
		created: time.Date(2024, 3, 1, 9, 30, 0, 123456000, time.UTC), aliceID: "zusr4r9kq2b1m8n3p5t7v6w0x1y"}
	keyText := zatodb.NewKey()
	if err := os.WriteFile(z.keyFile, []byte("[secret_keys]\nkey1="+keyText+"\n\n[zato]\nwell_known_data=x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	key, _ := zatodb.ParseKey(keyText)
	return z, key
}

// fill writes the fixture's users (a super-user, a regular one, an unapproved one),
// attributes (plain, JSON, numbers, encrypted, expiring, expired; names with dots and
// non-ASCII) and a live session with an attribute.
func (z *zatoFixture) fill(t *testing.T, b *zatodb.Builder) {
	t.Helper()
	ctx := context.Background()
	hash := func(pw string) string { return api.PassLibHash(pw, []byte("0123456789abcdef"), zatoPasswordRounds) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err := b.AddUser(ctx, zatodb.NewUser{ID: "zusr0super0000000000000000", Username: "zadmin", PasswordHash: hash("admin-pw"),
		SuperUser: true, ApprovalStatus: "approved", Created: z.created})
	must(err)
	aliceRow, err := b.AddUser(ctx, zatodb.NewUser{ID: z.aliceID, Username: "zalice", PasswordHash: hash("alice-secret"),
		ApprovalStatus: "approved", Created: z.created.Add(time.Hour)})
	must(err)
	_, err = b.AddUser(ctx, zatodb.NewUser{ID: "zusr9unapproved000000000000", Username: "zbob", PasswordHash: hash("bob-pw"),
		ApprovalStatus: "before_decision", Created: z.created})
	must(err)
	now := time.Now().UTC()
	for _, a := range []zatodb.NewAttr{
		{Name: "plain", Value: "hello"},
		{Name: "profile.theme", Value: map[string]any{"dark": true, "size": 12}, Modified: z.created.Add(48 * time.Hour)},
		{Name: "prénom-日本", Value: 42},
		{Name: "secret", Value: "s3cret value", Encrypted: true},
		{Name: "expiring", Value: "soon", Expires: now.Add(time.Hour)},
		{Name: "expired", Value: "gone", Expires: now.Add(-time.Hour)},
	} {
		a.UserID, a.Created = z.aliceID, z.created.Add(2*time.Hour)
		must(b.AddAttr(ctx, a))
	}
	// A live session and its attribute: left behind by design.
	must(b.AddSession(ctx, aliceRow, "zust0session", now.Add(-time.Minute), now.Add(time.Hour)))
	must(b.AddAttr(ctx, zatodb.NewAttr{UserID: z.aliceID, Name: "cart", Value: 1, Created: now, UST: "zust0session"}))
	must(b.Close())
}

// importArgs are attrd import's arguments against f.
func importArgs(f *fixture, dir string, extra ...string) []string {
	return append([]string{"import", "--nats-url", f.srv.ClientURL(), "--encryption-key-file", filepath.Join(dir, "encryption.key"),
		"--progress=false"}, extra...)
}

// lastSeq is the event stream's last sequence.
func lastSeq(t *testing.T, f *fixture) uint64 {
	t.Helper()
	js, _ := jetstream.New(f.srv.apiConn)
	st, err := js.Stream(ctxT(t), events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.LastSeq
}

func TestAZatoDatabaseImportsAndItsUsersLogInWithTheirOwnPasswords(t *testing.T) {
	z := newZatoFixture(t)
	dir := t.TempDir()
	f := newFixture(t, func(c *Config) { c.DataDir = dir })
	ctx := ctxT(t)

	// A dry run reads everything and changes nothing.
	before := lastSeq(t, f)
	code, out := runCmd(t, importArgs(f, dir, "--from", "sqlite:"+z.path, "--zato-secret-key-file", z.keyFile, "--dry-run")...)
	if code != 0 || !strings.Contains(out, "3 would import") || lastSeq(t, f) != before {
		t.Fatalf("dry run: exit %d, log %d → %d\n%s", code, before, lastSeq(t, f), out)
	}

	// With its progress shown (on stderr: a line every 10 s off a terminal, and where it
	// ended).
	progress, _ := os.CreateTemp(t.TempDir(), "progress")
	outf, _ := os.CreateTemp(t.TempDir(), "out")
	code = run(context.Background(), withToolCreds(append(importArgs(f, dir, "--from", "sqlite:"+z.path, "--zato-secret-key-file", z.keyFile), "--progress=true")),
		strings.NewReader(""), outf, progress)
	ob, _ := os.ReadFile(outf.Name())
	out = string(ob)
	if code != 0 {
		t.Fatalf("import: exit %d\n%s", code, out)
	}
	if pb, _ := os.ReadFile(progress.Name()); !strings.Contains(string(pb), "100.0% 3/3 users, 5 attributes") {
		t.Errorf("the progress shown: %q", pb)
	}
	for _, want := range []string{"users:      3 imported", "attributes: 5 imported", "attribute: expired: 1", "1 sessions and their 1 attributes"} {
		if !strings.Contains(out, want) {
			t.Errorf("the report lacks %q:\n%s", want, out)
		}
	}

	// The imported user logs in with the password they had in Zato, over NATS and REST.
	alice := mustLogin(t, f.c, "zalice", "alice-secret")
	restLogin(t, f.srv, "zalice", "alice-secret")
	if _, err := f.c.Login(ctx, "zbob", "bob-pw"); events.CodeOf(err) != events.CodeNotAllowed {
		t.Errorf("an unapproved Zato user logs in: %v", err)
	}
	if _, err := f.c.Login(ctx, "zalice", "wrong"); events.CodeOf(err) != events.CodeNotAllowed {
		t.Errorf("a wrong password: %v", err)
	}
	zadmin := mustLogin(t, f.c, "zadmin", "admin-pw")
	if u, err := zadmin.User(ctx); err != nil || !u.IsSuperUser {
		t.Errorf("the Zato super-user is one here: %+v %v", u, err)
	}

	// Values read back as Zato would return them, through NATS and REST.
	u, err := alice.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	uid := api.ImportedUserID("zato", z.aliceID, z.created.Add(time.Hour))
	if u.ID != uid || !u.Created.Equal(z.created.Add(time.Hour).Truncate(time.Microsecond)) {
		t.Errorf("alice is %s created %v, want %s created %v", u.ID, u.Created, uid, z.created.Add(time.Hour))
	}
	got, err := u.Attr.GetMany(ctx, []string{"plain", "profile.theme", "prénom-日本", "secret", "expiring", "expired"})
	if err != nil {
		t.Fatal(err)
	}
	wantValues := map[string]string{"plain": `"hello"`, "profile.theme": `{"dark":true,"size":12}`, "prénom-日本": `42`,
		"secret": `"s3cret value"`, "expiring": `"soon"`}
	for name, want := range wantValues {
		a := got[name]
		if a == nil || !a.Found || string(a.Value) != want {
			t.Errorf("%s: %+v, want %s", name, a, want)
			continue
		}
		if !a.CreationTime.Equal(z.created.Add(2 * time.Hour)) {
			t.Errorf("%s was created %v in Zato, here %v", name, z.created.Add(2*time.Hour), a.CreationTime)
		}
	}
	if got["expired"].Found || !got["secret"].IsEncrypted || got["plain"].IsEncrypted {
		t.Errorf("expired found %v, secret encrypted %v, plain encrypted %v", got["expired"].Found, got["secret"].IsEncrypted, got["plain"].IsEncrypted)
	}
	if !got["profile.theme"].LastModified.Equal(z.created.Add(48 * time.Hour)) {
		t.Errorf("the modification time: %v", got["profile.theme"].LastModified)
	}
	if exp := got["expiring"].ExpirationTime; time.Until(exp) < 50*time.Minute {
		t.Errorf("the expiry: %v", exp)
	}
	st, _, body := httpDo(t, f.srv, "GET", "/zato/sso/user/attr?current_app=CRM&name=prénom-日本&name=secret", nil,
		map[string]string{"Authorization": "Bearer " + alice.UST})
	ok(t, st, body)
	res, _ := body["result"].(map[string]any)
	if v, _ := json.Marshal(res["secret"].(map[string]any)["value"]); string(v) != `"s3cret value"` {
		t.Errorf("REST: %v", body)
	}

	// The first login replaced the imported hash with attrd's own: the history says so,
	// and the password still works.
	var hist struct {
		Events []map[string]any `json:"events"`
	}
	if err := f.c.Call(ctx, "history.list", map[string]any{"ust": alice.UST, "types": []string{"user.rehashed", "user.created", "attr.created"}}, &hist); err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, e := range hist.Events {
		types = append(types, e["type"].(string)+":"+toString(e["imported_from"]))
	}
	if strings.Join(types, ",") != "user.created:zato,attr.created:zato,user.rehashed:" {
		t.Errorf("history: %v", types)
	}
	mustLogin(t, f.c, "zalice", "alice-secret")

	// A second import changes nothing and says so.
	before = lastSeq(t, f)
	code, out = runCmd(t, importArgs(f, dir, "--from", "sqlite:"+z.path, "--zato-secret-key-file", z.keyFile)...)
	if code != 0 || !strings.Contains(out, "0 imported, 3 already here") || !strings.Contains(out, "0 imported, 5 already here") {
		t.Fatalf("second import: exit %d\n%s", code, out)
	}
	if after := lastSeq(t, f); after != before {
		t.Errorf("a second import appended %d events", after-before)
	}
	// A user deleted here since is not brought back by another import.
	if err := zadmin.DeleteUser(ctx, uid); err != nil {
		t.Fatal(err)
	}
	code, out = runCmd(t, importArgs(f, dir, "--from", "sqlite:"+z.path, "--zato-secret-key-file", z.keyFile)...)
	if code != 0 || !strings.Contains(out, "deleted in attrd since an earlier import: not imported again: 1") {
		t.Fatalf("an import after a deletion: exit %d\n%s", code, out)
	}
	if _, err := f.c.Login(ctx, "zalice", "alice-secret"); events.CodeOf(err) != events.CodeNotAllowed {
		t.Errorf("the deleted user logs in after another import: %v", err)
	}
	// Imported events replay to the same projection (their times are in the events).
	if code, out := runCmd(t, "replay", "--verify", "--nats-url", f.srv.ClientURL(), "--encryption-key-file", filepath.Join(dir, "encryption.key")); code != 0 {
		t.Errorf("replay --verify after an import: exit %d\n%s", code, out)
	}
}

func TestWithoutZatosKeyEncryptedItemsAreLeftOutAndSaidSo(t *testing.T) {
	z := newZatoFixture(t)
	dir := t.TempDir()
	f := newFixture(t, func(c *Config) { c.DataDir = dir })
	code, out := runCmd(t, importArgs(f, dir, "--from", "sqlite:"+z.path)...)
	if code != 0 || !strings.Contains(out, "users:      0 imported") || !strings.Contains(out, "password hash is encrypted with Zato's key: give --zato-secret-key-file") {
		t.Fatalf("exit %d\n%s", code, out)
	}
	// Without attrd's own key file, nothing is written in clear: refused.
	code, out = runCmd(t, "import", "--nats-url", f.srv.ClientURL(), "--encryption-key-file", filepath.Join(dir, "none.key"),
		"--progress=false", "--from", "sqlite:"+z.path, "--zato-secret-key-file", z.keyFile)
	if code == 0 || !strings.Contains(out, "--encryption-key-file") {
		t.Fatalf("an import without attrd's key file: exit %d\n%s", code, out)
	}
	other := filepath.Join(dir, "other.key")
	_ = os.WriteFile(other, []byte(zatodb.NewKey()), 0o600)
	code, out = runCmd(t, importArgs(f, dir, "--from", "sqlite:"+z.path, "--zato-secret-key-file", other)...)
	if code != 0 || !strings.Contains(out, "does not open with the key given") {
		t.Fatalf("a wrong key: exit %d\n%s", code, out)
	}
}

func toString(v any) string {
	s, _ := v.(string)
	return s
}

// startPostgres runs a throwaway PostgreSQL server (Debian's postgresql package, as
// the postgres user, on loopback) with an empty database "zato", and returns its URL;
// it skips without root or the package.
func startPostgres(t *testing.T) string {
	t.Helper()
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	if len(bins) == 0 || os.Geteuid() != 0 {
		t.Skip("PostgreSQL: needs root and Debian's postgresql package (apt-get install postgresql)")
	}
	bin := bins[len(bins)-1]
	pg, err := user.Lookup("postgres")
	if err != nil {
		t.Skip("PostgreSQL: no postgres user")
	}
	uid, _ := strconv.Atoi(pg.Uid)
	gid, _ := strconv.Atoi(pg.Gid)
	dir, err := os.MkdirTemp("", "attrd-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(data, uid, gid); err != nil {
		t.Fatal(err)
	}
	as := func(name string, args ...string) *exec.Cmd {
		return exec.Command("runuser", append([]string{"-u", "postgres", "--", filepath.Join(bin, name)}, args...)...)
	}
	if out, err := as("initdb", "-D", data, "-A", "trust", "-U", "postgres").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	port := freePort(t)
	srv := as("postgres", "-D", data, "-p", strconv.Itoa(port), "-k", data, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off")
	var logs strings.Builder
	srv.Stdout, srv.Stderr = &logs, &logs
	// Its own process group: runuser passes no signal on, so the group gets them.
	srv.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-srv.Process.Pid, syscall.SIGINT) // PostgreSQL's fast shutdown
		done := make(chan struct{})
		go func() { _ = srv.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-srv.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	base := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/", port)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		db, err := sql.Open("pgx", base+"postgres?sslmode=disable")
		if err == nil {
			_, err = db.Exec("CREATE DATABASE zato")
			db.Close()
		}
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("PostgreSQL did not start: %v\n%s", err, logs.String())
		}
	}
	return base + "zato?sslmode=disable"
}

func TestAZatoPostgreSQLDatabaseImports(t *testing.T) {
	url := startPostgres(t)
	z, key := newZatoKey(t)
	b, err := zatodb.CreatePostgres(context.Background(), url, key)
	if err != nil {
		t.Fatal(err)
	}
	z.fill(t, b)
	dir := t.TempDir()
	f := newFixture(t, func(c *Config) { c.DataDir = dir })
	code, out := runCmd(t, importArgs(f, dir, "--from", url, "--zato-secret-key-file", z.keyFile)...)
	if code != 0 || !strings.Contains(out, "users:      3 imported") || !strings.Contains(out, "attributes: 5 imported") {
		t.Fatalf("import: exit %d\n%s", code, out)
	}
	alice := mustLogin(t, f.c, "zalice", "alice-secret")
	u, err := alice.User(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	a, err := u.Attr.Get(ctxT(t), "secret")
	if err != nil || string(a.Value) != `"s3cret value"` || !a.CreationTime.Equal(z.created.Add(2*time.Hour)) {
		t.Fatalf("secret: %+v %v", a, err)
	}
	code, out = runCmd(t, importArgs(f, dir, "--from", url, "--zato-secret-key-file", z.keyFile)...)
	if code != 0 || !strings.Contains(out, "0 imported, 3 already here") {
		t.Fatalf("second import: exit %d\n%s", code, out)
	}
}

func TestAStoppedImportLeavesNoUserHalfImportedAndARerunFinishes(t *testing.T) {
	dir := t.TempDir()
	f := newFixture(t, func(c *Config) { c.DataDir = dir })
	z, key := newZatoKey(t)
	z.path = filepath.Join(t.TempDir(), "zato.db")
	b, err := zatodb.Create(context.Background(), z.path, key)
	if err != nil {
		t.Fatal(err)
	}
	const users = 600
	hash := api.PassLibHash("pw", []byte("0123456789abcdef"), zatoPasswordRounds)
	for i := range users {
		id := fmt.Sprintf("zusr%05d", i)
		if _, err := b.AddUser(context.Background(), zatodb.NewUser{ID: id, Username: "u" + strconv.Itoa(i), PasswordHash: hash,
			ApprovalStatus: "approved", Created: z.created}); err != nil {
			t.Fatal(err)
		}
		for j := range 5 {
			if err := b.AddAttr(context.Background(), zatodb.NewAttr{UserID: id, Name: "a" + strconv.Itoa(j), Value: j, Created: z.created}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	// A stop (what SIGINT does to the command's context) once it has begun.
	ctx, cancel := context.WithCancel(context.Background())
	var out strings.Builder
	outf, _ := os.CreateTemp(t.TempDir(), "out")
	ran := make(chan int)
	go func() {
		ran <- run(ctx, withToolCreds(importArgs(f, dir, "--from", "sqlite:"+z.path, "--zato-secret-key-file", z.keyFile, "--parallel", "4")),
			strings.NewReader(""), outf, outf)
	}()
	first := f.admin.UserByID(api.ImportedUserID("zato", "zusr00000", z.created))
	waitFor(t, func() bool { _, err := first.Attr.Names(ctxT(t)); return err == nil }, "the first user imported")
	cancel()
	code := <-ran
	b2, _ := os.ReadFile(outf.Name())
	out.Write(b2)
	if code != 0 || !strings.Contains(out.String(), "stopped before the end") {
		t.Fatalf("a stopped import: exit %d\n%s", code, out.String())
	}
	// Every user here has all five attributes.
	imported := 0
	for i := range users {
		uid := api.ImportedUserID("zato", fmt.Sprintf("zusr%05d", i), z.created)
		names, err := f.admin.UserByID(uid).Attr.Names(ctxT(t))
		if events.CodeOf(err) == events.CodeNotAllowed {
			continue // not imported yet
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(names) != 5 {
			t.Fatalf("user %d has %d of 5 attributes after the stop", i, len(names))
		}
		imported++
	}
	if imported == 0 || imported == users {
		t.Fatalf("the stop came at %d of %d users: the test proves nothing", imported, users)
	}
	code, rerun := runCmd(t, importArgs(f, dir, "--from", "sqlite:"+z.path, "--zato-secret-key-file", z.keyFile)...)
	want := fmt.Sprintf("users:      %d imported, %d already here", users-imported, imported)
	if code != 0 || !strings.Contains(rerun, want) {
		t.Fatalf("the re-run: want %q, exit %d\n%s", want, code, rerun)
	}
	t.Logf("stopped after %d of %d users, each whole; the re-run imported the %d others", imported, users, users-imported)
}
