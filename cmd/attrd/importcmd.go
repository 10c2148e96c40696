package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/cmd/attrd/zatodb"
	"github.com/attrd/attrd/events"
)

// importCmd is `attrd import`: it brings a Zato SSO database's users and their
// attributes into a running attrd (docs/ZATO.md "Moving from Zato SSO").
func importCmd(ctx context.Context, args []string, stdout, stderr *os.File) error {
	fs := flag.NewFlagSet("import", flag.ContinueOnError)
	from := fs.String("from", "", `the Zato SSO database: "sqlite:PATH" or "postgres://USER:PASSWORD@HOST/DB"`)
	keyFile := fs.String("zato-secret-key-file", "", "Zato's secret key (the key alone, or Zato's secrets.conf): opens encrypted password hashes and values")
	dry := fs.Bool("dry-run", false, "read everything and report what an import would do, changing nothing")
	parallel := fs.Int("parallel", 16, "users imported at once")
	progress := fs.Bool("progress", true, "show a progress bar on stderr")
	reportFile := fs.String("report", "", "also write the report as JSON to this file")
	tool := addToolFlags(fs, true)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *from == "" {
		return errors.New("--from is required")
	}
	var zkey *zatodb.Key
	if *keyFile != "" {
		var err error
		if zkey, err = zatodb.LoadKey(*keyFile); err != nil {
			return fmt.Errorf("--zato-secret-key-file: %w", err)
		}
	}
	db, err := zatodb.Open(*from)
	if err != nil {
		return err
	}
	defer db.Close()
	counts, err := db.Count(ctx)
	if err != nil {
		return err
	}
	nc, js, keys, err := tool.open("attrd-import", stderr)
	if err != nil {
		return err
	}
	defer nc.Close()
	if keys == nil {
		// Without the key file the events would carry users' personal data in clear, in
		// a deployment that seals it: refused.
		if _, err := js.KeyValue(ctx, events.DataKeysBucket); err == nil {
			return errors.New("this attrd seals personal data with its key file: give it (--encryption-key-file)")
		}
	}
	svc, err := api.New(ctx, nc, api.Config{Keyring: keys, Logger: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		return err
	}
	defer svc.Close()
	im := &importer{svc: svc, key: zkey, dry: *dry, rep: importReport{DryRun: *dry, Counts: counts, Skipped: map[string]int{}},
		started: time.Now()}
	// A stop (SIGINT, SIGTERM) ends the reading; the users in progress are finished, so
	// none is left half-imported.
	work := context.WithoutCancel(ctx)
	var bar *progressBar
	if *progress {
		bar = newProgressBar(stderr, counts.Users, &im.rep)
		defer bar.stop()
	}
	err = im.run(ctx, work, db, max(*parallel, 1))
	if bar != nil {
		bar.stop()
	}
	im.rep.Seconds = time.Since(im.started).Seconds()
	im.rep.Stopped = ctx.Err() != nil
	im.rep.write(stdout)
	if *reportFile != "" {
		b, _ := json.MarshalIndent(&im.rep, "", "  ")
		if werr := os.WriteFile(*reportFile, b, 0o600); werr != nil {
			fmt.Fprintf(stderr, "attrd: the report file: %v\n", werr)
		}
	}
	return err
}

// importer imports users from a Zato database, several at a time.
type importer struct {
	svc     *api.Service
	key     *zatodb.Key
	dry     bool
	started time.Time

	mu  sync.Mutex
	rep importReport
}

// importReport is the final report (JSON with --report).
type importReport struct {
	DryRun        bool           `json:"dry_run"`
	Stopped       bool           `json:"stopped,omitempty"`
	Seconds       float64        `json:"seconds"`
	Counts        zatodb.Counts  `json:"zato_rows"`
	UsersRead     int64          `json:"users_read"`
	UsersImported int64          `json:"users_imported"`
	UsersPresent  int64          `json:"users_already_here"`
	UsersSkipped  int64          `json:"users_skipped"`
	Attrs         int64          `json:"attributes_imported"`
	AttrsPresent  int64          `json:"attributes_already_here"`
	AttrsSkipped  int64          `json:"attributes_skipped"`
	Skipped       map[string]int `json:"skipped_by_reason"`
	Examples      []string       `json:"skipped_examples,omitempty"`
}

func (im *importer) run(stop, work context.Context, db *zatodb.DB, parallel int) error {
	users := make(chan zatodb.User)
	var wg sync.WaitGroup
	var failed atomic.Pointer[error]
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for u := range users {
				if err := im.one(work, u); err != nil {
					failed.CompareAndSwap(nil, &err)
				}
			}
		}()
	}
	err := db.Users(stop, func(u zatodb.User) error {
		if failed.Load() != nil {
			return errors.New("stopped")
		}
		select {
		case users <- u:
			return nil
		case <-stop.Done():
			return stop.Err()
		}
	})
	close(users)
	wg.Wait()
	if f := failed.Load(); f != nil {
		return *f
	}
	if stop.Err() != nil {
		return nil // stopped at the operator's wish: the report says so
	}
	return err
}

// one imports one user and their attributes.
func (im *importer) one(ctx context.Context, zu zatodb.User) error {
	u := api.ImportedUser{From: "zato", SourceID: zu.ID, Username: zu.Username, SuperUser: zu.SuperUser, Approved: zu.Approved(),
		Created: zu.Created}
	var skips []api.ImportSkip
	hash := zu.Password
	if zatodb.IsToken(hash) {
		plain, err := im.open(hash)
		if err != nil {
			im.note(zu, []api.ImportSkip{{Reason: "its password hash is encrypted with Zato's key: " + err.Error()}}, api.ImportResult{}, len(zu.Attrs))
			return nil
		}
		hash = string(plain)
	}
	if !strings.HasPrefix(hash, api.PBKDF2Prefix) {
		im.note(zu, []api.ImportSkip{{Reason: "its password hash is not passlib's pbkdf2_sha512"}}, api.ImportResult{}, len(zu.Attrs))
		return nil
	}
	u.PasswordHash = hash
	for _, a := range zu.Attrs {
		ia, reason := im.attr(a)
		if reason != "" {
			skips = append(skips, api.ImportSkip{Name: a.Name, Reason: reason})
			continue
		}
		u.Attrs = append(u.Attrs, ia)
	}
	// Transient failures (an election, a restart of attrd) are tried again: an import
	// of a user is safe to repeat.
	var r api.ImportResult
	var err error
	for try, pause := 0, 100*time.Millisecond; try < 10; try, pause = try+1, min(2*pause, 5*time.Second) {
		if r, err = im.svc.Import(ctx, u, im.dry); err == nil || !transient(err) {
			break
		}
		time.Sleep(pause)
	}
	if err != nil {
		return fmt.Errorf("user %s (%s): %w", zu.ID, zu.Username, err)
	}
	im.note(zu, append(skips, r.Skipped...), r, 0)
	return nil
}

// transient reports a failure worth another try: NATS unavailable, an outcome unknown.
func transient(err error) bool {
	return api.Unavailable(err) || events.CodeOf(err) == events.CodeOutcomeUnknown
}

// open decrypts a Fernet token with Zato's key.
func (im *importer) open(token string) ([]byte, error) {
	if im.key == nil {
		return nil, errors.New("give --zato-secret-key-file")
	}
	plain, err := im.key.Decrypt(token)
	if err != nil {
		return nil, errors.New("it does not open with the key given")
	}
	return plain, nil
}

// attr turns a Zato attribute into an imported one, or says why it is left out. A
// value Zato encrypted is the JSON string of a Fernet token of the value's text (Zato
// encrypts strings only); one flagged encrypted that is not a token (Zato's update
// without encrypt stores it plain, and its reads pass it through) is taken as it is,
// and kept encrypted.
func (im *importer) attr(a zatodb.Attr) (api.ImportedAttr, string) {
	ia := api.ImportedAttr{Name: a.Name, Value: json.RawMessage(a.Value), Encrypt: a.Encrypted, Created: a.Created,
		Modified: a.Modified, ExpiresAt: a.Expires}
	if ia.Modified.IsZero() {
		ia.Modified = a.Created
	}
	if !a.Encrypted {
		return ia, ""
	}
	var token string
	if json.Unmarshal([]byte(a.Value), &token) != nil || !zatodb.IsToken(token) {
		return ia, ""
	}
	plain, err := im.open(token)
	if err != nil {
		return ia, "encrypted with Zato's key: " + err.Error()
	}
	v, _ := json.Marshal(string(plain))
	ia.Value = v
	return ia, ""
}

// note adds a user's outcome to the report. unread is the attributes of a user left
// out before Import saw them.
func (im *importer) note(zu zatodb.User, skips []api.ImportSkip, r api.ImportResult, unread int) {
	im.mu.Lock()
	defer im.mu.Unlock()
	rep := &im.rep
	atomic.AddInt64(&rep.UsersRead, 1) // the progress bar reads it without the lock
	userSkipped := false
	for _, s := range skips {
		what := "attribute"
		if s.Name == "" {
			what, userSkipped = "user", true
		} else {
			rep.AttrsSkipped++
		}
		rep.Skipped[what+": "+s.Reason]++
		if len(rep.Examples) < 20 {
			rep.Examples = append(rep.Examples, fmt.Sprintf("user %s (%s) %s %q: %s", zu.ID, zu.Username, what, s.Name, s.Reason))
		}
	}
	switch {
	case userSkipped:
		rep.UsersSkipped++
		rep.AttrsSkipped += int64(unread + len(zu.Attrs) - countNamed(skips))
	case r.UserImported:
		rep.UsersImported++
	case r.UserPresent:
		rep.UsersPresent++
	}
	atomic.AddInt64(&rep.Attrs, int64(r.Attrs))
	rep.AttrsPresent += int64(r.AttrsPresent)
}

func countNamed(skips []api.ImportSkip) int {
	n := 0
	for _, s := range skips {
		if s.Name != "" {
			n++
		}
	}
	return n
}

// write prints the report.
func (r *importReport) write(w io.Writer) {
	verb := "imported"
	if r.DryRun {
		verb = "would import"
	}
	fmt.Fprintf(w, "attrd import (%s): %d users read of %d in %.1f s\n", map[bool]string{true: "dry run", false: "done"}[r.DryRun],
		r.UsersRead, r.Counts.Users, r.Seconds)
	if r.Stopped {
		fmt.Fprintln(w, "  stopped before the end: the users read were finished; run it again to go on")
	}
	fmt.Fprintf(w, "  users:      %d %s, %d already here, %d skipped\n", r.UsersImported, verb, r.UsersPresent, r.UsersSkipped)
	fmt.Fprintf(w, "  attributes: %d %s, %d already here, %d skipped\n", r.Attrs, verb, r.AttrsPresent, r.AttrsSkipped)
	fmt.Fprintf(w, "  not imported by design: %d sessions and their %d attributes (users log in again: docs/ZATO.md)\n",
		r.Counts.Sessions, r.Counts.SessionAttrs)
	reasons := make([]string, 0, len(r.Skipped))
	for k := range r.Skipped {
		reasons = append(reasons, k)
	}
	sort.Strings(reasons)
	for _, k := range reasons {
		fmt.Fprintf(w, "  skipped, %s: %d\n", k, r.Skipped[k])
	}
	for _, e := range r.Examples {
		fmt.Fprintf(w, "    e.g. %s\n", e)
	}
}

// progressBar redraws one line on a terminal (or prints a line every 10 s elsewhere).
type progressBar struct {
	w     *os.File
	total int
	rep   *importReport
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
}

func newProgressBar(w *os.File, total int, rep *importReport) *progressBar {
	b := &progressBar{w: w, total: total, rep: rep, done: make(chan struct{})}
	tty := false
	if st, err := w.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
		tty = true
	}
	every := 10 * time.Second
	if tty {
		every = 200 * time.Millisecond
	}
	start := time.Now()
	draw := func() {
		read := atomic.LoadInt64(&rep.UsersRead)
		pct := 100.0
		if total > 0 {
			pct = 100 * float64(read) / float64(total)
		}
		bar := strings.Repeat("█", int(pct/4)) + strings.Repeat("░", 25-int(pct/4))
		line := fmt.Sprintf("%s %5.1f%% %d/%d users, %d attributes, %.0f users/s", bar, pct, read, total,
			atomic.LoadInt64(&rep.Attrs), float64(read)/time.Since(start).Seconds())
		if tty {
			fmt.Fprintf(w, "\r%s", line)
		} else {
			fmt.Fprintln(w, line)
		}
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-b.done:
				draw() // where it ended
				if tty {
					fmt.Fprintln(w)
				}
				return
			case <-t.C:
				draw()
			}
		}
	}()
	return b
}

func (b *progressBar) stop() {
	b.once.Do(func() { close(b.done); b.wg.Wait() })
}
