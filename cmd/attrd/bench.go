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
func bench(ctx context.Context, args []string, stdout *os.File) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	dur := fs.Duration("duration", 3*time.Second, "how long each measurement runs")
	concs := fs.String("conc", "1,16,64,256", "comma-separated concurrencies")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of the attrd measurements to this file")
	if err := fs.Parse(args); err != nil {
		return err
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

	rawConn, err := nats.Connect(srv.ClientURL())
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

	fmt.Fprintf(stdout, "attrd bench: %s per measurement, %d CPUs; value 100 bytes, TTL 1h\n\n", *dur, nprocs())
	fmt.Fprintf(stdout, "%5s | %12s %9s %9s | %12s %9s %9s | %6s %8s | %s\n", "conc", "raw KV op/s", "p50", "p99", "attrd op/s", "p50", "p99", "ratio", "p50 x", "events/batch")
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
		var raw, att result
		b0, e0 := srv.Projector().Stats()
		rounds := max(int(*dur/(500*time.Millisecond)), 1)
		for r := 0; r < rounds; r++ {
			raw.add(measure(ctx, n, *dur/time.Duration(rounds), rawOp))
			if err := profile(*cpuprofile, r == 0); err != nil {
				return err
			}
			att.add(measure(ctx, n, *dur/time.Duration(rounds), attrdOp))
			if r == 0 && *cpuprofile != "" {
				pprof.StopCPUProfile()
			}
		}
		raw.finish()
		att.finish()
		b1, e1 := srv.Projector().Stats()
		perBatch := float64(e1-e0) / float64(max(b1-b0, 1))
		if raw.err != nil || att.err != nil {
			return fmt.Errorf("bench at %d: raw %v, attrd %v", n, raw.err, att.err)
		}
		fmt.Fprintf(stdout, "%5d | %12.0f %9s %9s | %12.0f %9s %9s | %5.0f%% %7.1fx | %.1f\n", n,
			raw.rate, raw.p50, raw.p99, att.rate, att.p50, att.p99, 100*att.rate/raw.rate, float64(att.p50)/float64(raw.p50), perBatch)
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
