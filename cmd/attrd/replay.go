package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// errDifferences makes `attrd replay --verify` exit with status 1.
var errDifferences = errors.New("the rebuilt projection differs from the live one")

// replayCmd is `attrd replay`: fold the whole log in memory, then write it into fresh
// buckets (--into) or compare it with the live projection (--verify).
func replayCmd(ctx context.Context, args []string, stdout, stderr *os.File) error {
	fs := flag.NewFlagSet("replay", flag.ContinueOnError)
	into := fs.String("into", "", "rebuild into the fresh bucket <PREFIX>"+events.DefaultBucket)
	verify := fs.Bool("verify", false, "compare a rebuild with the live projection; exit 1 on any difference")
	tool := addToolFlags(fs, true)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if (*into == "") == !*verify {
		return errors.New("give one of --into PREFIX or --verify")
	}
	// The keys open values sealed only because an update kept the attribute's setting.
	nc, js, keys, err := tool.open("attrd-replay", stderr)
	if err != nil {
		return err
	}
	defer nc.Close()
	log, err := newLog(ctx, js, keys)
	if err != nil {
		return err
	}
	r := replayer{js: js, log: log, out: stdout, progress: newProgress(stderr)}
	if *verify {
		return r.verify(ctx, events.DefaultBucket)
	}
	return r.into(ctx, *into+events.DefaultBucket)
}

type replayer struct {
	js       jetstream.JetStream
	log      *projector.Log
	out      io.Writer
	progress *progress
}

// fold reads the whole log into memory, reporting progress. rejected holds the
// replay's rejections, by sequence.
func (r *replayer) fold(ctx context.Context) (m *projector.Memory, last uint64, rejected map[uint64]events.Code, err error) {
	last, total, err := r.log.Last(ctx)
	if err != nil {
		return nil, 0, nil, err
	}
	m = projector.NewMemory()
	rejected = map[uint64]events.Code{}
	r.progress.start("fold", total)
	var n uint64
	err = r.log.FoldAll(ctx, m, func(e events.Entry) {
		n++
		if e.Decision.Code != "" {
			rejected[e.Seq] = e.Decision.Code
		}
		r.progress.update(n)
	})
	r.progress.done()
	return m, last, rejected, err
}

func (r *replayer) into(ctx context.Context, bucket string) error {
	store := events.DefaultStoreConfig()
	store.Bucket = bucket
	if _, err := events.EnsureBucket(ctx, r.js, store); err != nil {
		return err
	}
	m, last, _, err := r.fold(ctx)
	if err != nil {
		return err
	}
	r.progress.start("write", uint64(m.Len()))
	err = projector.Write(ctx, r.js, bucket, m, last, func(done, total int) { r.progress.update(uint64(done)) })
	r.progress.done()
	if err != nil {
		return err
	}
	fmt.Fprintf(r.out, "rebuilt the log up to sequence %d into bucket %s\n", last, bucket)
	return nil
}

func (r *replayer) verify(ctx context.Context, bucket string) error {
	m, last, rejected, err := r.fold(ctx)
	if err != nil {
		return err
	}
	diffs, unopened, err := projector.Diff(ctx, r.js, bucket, m)
	if err != nil {
		return err
	}
	for _, d := range diffs {
		fmt.Fprintln(r.out, d)
	}
	// The decisions the projector recorded must be the replay's too.
	n := len(diffs)
	if since := m.RecordedSince(); since > 0 {
		seqs := map[uint64]bool{}
		for s := range rejected {
			seqs[s] = true
		}
		for s := range m.Recorded {
			seqs[s] = true
		}
		sorted := slices.Sorted(maps.Keys(seqs))
		for _, s := range sorted {
			if s < since || s > last || rejected[s] == m.Recorded[s] {
				continue
			}
			fmt.Fprintf(r.out, "event %d: the projector decided %s, the replay decides %s\n", s, decisionText(m.Recorded[s]), decisionText(rejected[s]))
			n++
		}
	}
	if unopened > 0 {
		fmt.Fprintf(r.out, "%d plain values sealed in the log were not compared (no key file); the rest of their records were\n", unopened)
	}
	if n > 0 {
		fmt.Fprintf(r.out, "%d differences between the log up to sequence %d and bucket %s\n", n, last, bucket)
		return errDifferences
	}
	fmt.Fprintf(r.out, "the log up to sequence %d reproduces bucket %s\n", last, bucket)
	return nil
}

func decisionText(c events.Code) string {
	if c == "" {
		return "accepted"
	}
	return "rejected " + string(c)
}

// progress reports a long step: a bar with rate and ETA on a terminal, a plain line
// every few seconds otherwise.
type progress struct {
	w        io.Writer
	terminal bool
	step     string
	total    uint64
	began    time.Time
	last     time.Time
	n        uint64
}

func newProgress(w *os.File) *progress {
	st, err := w.Stat()
	return &progress{w: w, terminal: err == nil && st.Mode()&os.ModeCharDevice != 0}
}

func (p *progress) start(step string, total uint64) {
	p.step, p.total, p.began, p.last = step, total, time.Now(), time.Time{}
}

func (p *progress) update(n uint64) {
	p.n = n
	every := 2 * time.Second
	if p.terminal {
		every = 100 * time.Millisecond
	}
	if time.Since(p.last) < every {
		return
	}
	p.last = time.Now()
	p.print(n, false)
}

// done prints the step's final state.
func (p *progress) done() { p.print(p.n, true) }

func (p *progress) print(n uint64, final bool) {
	el := time.Since(p.began)
	rate := float64(n) / max(el.Seconds(), 1e-9)
	frac := 1.0
	if p.total > 0 {
		frac = min(float64(n)/float64(p.total), 1)
	}
	eta := time.Duration(0)
	if rate > 0 && p.total > n {
		eta = time.Duration(float64(p.total-n)/rate) * time.Second
	}
	if !p.terminal {
		fmt.Fprintf(p.w, "%s: %d/%d (%.0f%%) %.0f/s elapsed %s eta %s\n", p.step, n, p.total, 100*frac, rate, el.Round(time.Millisecond), eta.Round(time.Second))
		return
	}
	const width = 30
	bar := strings.Repeat("=", int(frac*width)) + strings.Repeat(" ", width-int(frac*width))
	fmt.Fprintf(p.w, "\r%-5s [%s] %3.0f%% %d/%d  %.0f/s  ETA %s   ", p.step, bar, 100*frac, n, p.total, rate, eta.Round(time.Second))
	if final {
		fmt.Fprintln(p.w)
	}
}
