package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
)

// bench measures, in one process on an embedded server, (a) raw JetStream KV puts with
// a per-key TTL and (b) attrd updates through the whole path (NATS request, event,
// projector, KV write, decision, reply), at several concurrencies, and prints the ratio.
// It also measures (c) a bare request/reply echo, the hop every attrd request pays, as
// a yardstick of what the path can reach.
func bench(ctx context.Context, args []string, stdout *os.File) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	dur := fs.Duration("duration", 3*time.Second, "how long each measurement runs")
	concs := fs.String("conc", "1,16,64,256", "comma-separated concurrencies")
	replayEvents := fs.Int("replay", 0, "instead, measure replay over a log of this many events")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of the attrd measurements to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *replayEvents > 0 {
		return benchReplay(ctx, *replayEvents, stdout)
	}
	var levels []int
	for _, c := range strings.Split(*concs, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(c))
		if err != nil || n < 1 {
			return fmt.Errorf("--conc: bad concurrency %q", c)
		}
		levels = append(levels, n)
	}
	dir, err := os.MkdirTemp("", "attrd-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	srv, err := Start(ctx, Config{DataDir: dir, HTTPAddr: "127.0.0.1:0", NATSAddr: "127.0.0.1:0", AdminUsername: "admin",
		AdminPassword: "bench", Password: api.PasswordParams{Time: 1, MemoryK: 64, Threads: 1},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return err
	}
	defer srv.Close()

	rawConn, err := srv.InternalConn("bench-raw") // the raw bucket lives where attrd's does
	if err != nil {
		return err
	}
	defer rawConn.Close()
	js, _ := jetstream.New(rawConn)
	if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "bench_raw", History: 1, LimitMarkerTTL: 5 * time.Minute}); err != nil {
		return err
	}
	cliConn, err := nats.Connect(srv.ClientURL())
	if err != nil {
		return err
	}
	defer cliConn.Close()
	c := client.New(cliConn, "CRM")
	sess, err := c.Login(ctx, "admin", "bench")
	if err != nil {
		return err
	}
	user, err := sess.User(ctx)
	if err != nil {
		return err
	}
	maxC := slices.Max(levels)
	items := make([]client.Item, maxC)
	for i := range items {
		items[i] = client.Item{Name: "k" + strconv.Itoa(i), Value: 0}
	}
	for i := 0; i < len(items); i += 1000 {
		if err := user.Attr.CreateMany(ctx, items[i:min(i+1000, len(items))]); err != nil {
			return err
		}
	}
	value := strings.Repeat("v", 100)

	// (c) the request/reply hop alone: an echo responder on an in-process connection,
	// dispatching concurrently as attrd's API does. Every attrd request pays this hop.
	echoConn, err := srv.InternalConn("bench-echo")
	if err != nil {
		return err
	}
	defer echoConn.Close()
	echoSub, err := echoConn.Subscribe("attrd-bench.echo", func(m *nats.Msg) { go m.Respond(m.Data) })
	if err != nil {
		return err
	}
	if err := echoSub.SetPendingLimits(-1, -1); err != nil {
		return err
	}
	echoOp := func(g, i int) error {
		_, err := cliConn.RequestWithContext(ctx, "attrd-bench.echo", []byte(value))
		return err
	}

	fmt.Fprintf(stdout, "attrd bench: %s per measurement, %d CPUs; value 100 bytes, TTL 1h\n\n", *dur, nprocs())
	fmt.Fprintf(stdout, "%5s | %11s %8s %8s | %11s %8s %8s | %6s %7s | %10s %6s | %s\n", "conc",
		"raw KV op/s", "p50", "p99", "attrd op/s", "p50", "p99", "ratio", "p50 x", "echo req/s", "ratio", "events/batch")
	for _, n := range levels {
		rawOp := func(g, i int) error {
			subj := events.KVSubject("bench_raw", "k"+strconv.Itoa(g))
			_, err := js.PublishMsg(ctx, &nats.Msg{Subject: subj, Data: []byte(value)}, jetstream.WithMsgTTL(time.Hour))
			return err
		}
		attrdOp := func(g, i int) error {
			return user.Attr.Update(ctx, "k"+strconv.Itoa(g), value, client.Expiration(time.Hour))
		}
		// The two alternate in short rounds, so that both see the same machine: on a
		// shared machine the load of the moment moves absolute numbers a lot.
		var raw, att, echo result
		b0, e0 := srv.Projector().Stats()
		rounds := max(int(*dur/(500*time.Millisecond)), 1)
		for r := 0; r < rounds; r++ {
			raw.add(measure(ctx, n, *dur/time.Duration(rounds), rawOp))
			echo.add(measure(ctx, n, *dur/time.Duration(rounds)/2, echoOp))
			// The profile covers the attrd rounds (and, between them, the others').
			if err := profile(*cpuprofile, r == 0); err != nil {
				return err
			}
			att.add(measure(ctx, n, *dur/time.Duration(rounds), attrdOp))
		}
		if *cpuprofile != "" {
			pprof.StopCPUProfile()
		}
		raw.finish()
		att.finish()
		echo.finish()
		b1, e1 := srv.Projector().Stats()
		perBatch := float64(e1-e0) / float64(max(b1-b0, 1))
		if err := errors.Join(raw.err, att.err, echo.err); err != nil {
			return fmt.Errorf("bench at %d: %w", n, err)
		}
		fmt.Fprintf(stdout, "%5d | %11.0f %8s %8s | %11.0f %8s %8s | %5.0f%% %6.1fx | %10.0f %5.0f%% | %.1f\n", n,
			raw.rate, raw.p50, raw.p99, att.rate, att.p50, att.p99, 100*att.rate/raw.rate, float64(att.p50)/float64(raw.p50),
			echo.rate, 100*echo.rate/raw.rate, perBatch)
	}
	return nil
}

// result is what a measurement saw: operations, their latencies and the time taken.
type result struct {
	rate     float64
	p50, p99 time.Duration
	err      error
	lat      []time.Duration
	elapsed  time.Duration
}

// add merges another round into r.
func (r *result) add(o result) {
	r.lat = append(r.lat, o.lat...)
	r.elapsed += o.elapsed
	r.err = errors.Join(r.err, o.err)
}

// finish computes the rate and percentiles.
func (r *result) finish() {
	if len(r.lat) == 0 {
		r.err = errors.Join(r.err, errors.New("no operation completed"))
		return
	}
	slices.Sort(r.lat)
	q := func(p float64) time.Duration { return r.lat[int(p*float64(len(r.lat)-1))].Round(time.Microsecond) }
	r.rate, r.p50, r.p99 = float64(len(r.lat))/r.elapsed.Seconds(), q(0.50), q(0.99)
}

// measure runs op from n goroutines for d.
func measure(ctx context.Context, n int, d time.Duration, op func(g, i int) error) result {
	var wg sync.WaitGroup
	lat := make([][]time.Duration, n)
	errs := make([]error, n)
	start := time.Now()
	end := start.Add(d)
	for g := 0; g < n; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(end) && ctx.Err() == nil; i++ {
				t0 := time.Now()
				if err := op(g, i); err != nil {
					errs[g] = err
					return
				}
				lat[g] = append(lat[g], time.Since(t0))
			}
		}()
	}
	wg.Wait()
	res := result{elapsed: time.Since(start), err: errors.Join(errs...)}
	for _, l := range lat {
		res.lat = append(res.lat, l...)
	}
	return res
}

// profile starts a CPU profile into path when asked (the first attrd round of each
// concurrency; the last one written is kept).
func profile(path string, first bool) error {
	if path == "" || !first {
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	return pprof.StartCPUProfile(f)
}

func nprocs() int { return runtime.GOMAXPROCS(0) }
