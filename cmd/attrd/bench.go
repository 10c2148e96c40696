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
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
)

// bench measures, in one process on an embedded server, attrd's operations through
// the whole path (NATS request, event, projector, KV write, decision, reply) against
// the raw JetStream operations they are built on, at several concurrencies, and prints
// the ratios: updates against raw KV puts with a per-key TTL, gets against raw KV gets,
// update_many of 10 and 100 items against single updates, and a bare request/reply
// echo, the hop every attrd request pays, as a yardstick. Updates carry a unique
// request id each (--request-ids, the default), as careful clients send them.
//
// With --interval it instead runs updates alone for --duration at one concurrency and
// prints the throughput of every interval, so that decay shows; --check-decay makes it
// exit 1 when the last interval is under 90% of the first.
func bench(ctx context.Context, args []string, stdout *os.File) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	dur := fs.Duration("duration", 3*time.Second, "how long each measurement runs (with --interval: the whole run)")
	concs := fs.String("conc", "1,16,64,256", "comma-separated concurrencies")
	requestIDs := fs.Bool("request-ids", true, "send every update with a unique request id")
	interval := fs.Duration("interval", 0, "run updates alone for --duration and print the throughput of every interval")
	checkDecay := fs.Bool("check-decay", false, "with --interval: exit 1 if the last interval is under 90% of the first")
	replayEvents := fs.Int("replay", 0, "instead, measure replay over a log of this many events")
	storage := fs.Int("storage", 0, "instead, measure the bytes per live attribute of this many attributes")
	batchKeys := fs.Int("batch", 0, "instead, measure writes of this many keys: async puts with acks against one fast batch")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of the measurements to this file (with --ops, of those alone)")
	only := fs.String("ops", "", "comma-separated operations to run (default all): put, update, get-raw, get, many10, many100, echo")
	dedup := fs.Duration("dedup-window", 2*time.Minute, "the server's de-duplication window (how long request ids are remembered)")
	metricsOn := fs.Bool("metrics", true, "keep attrd's Prometheus metrics on (false measures what they cost)")
	traceRatio := fs.Float64("trace-ratio", 0, "trace this fraction of requests (spans made and dropped: measures what tracing costs; 0: off)")
	importUsers := fs.Int("import", 0, "instead, measure attrd import of a Zato database of this many users with ten attributes each")
	importParallel := fs.Int("import-parallel", 16, "with --import: users imported at once")
	watchers := fs.Int("watchers", 0, "instead, measure watches: latency to 1, 100, ... this many watchers, memory per watch, updates with this many idle")
	watchWrites := fs.Int("watch-writes", 200, "with --watchers: writes per latency measurement")
	child := fs.Bool("child", false, "measure as a client over TCP: start `attrd serve` as a child process on a temp dir")
	tools := addToolFlags(fs, false)
	adminUser := fs.String("admin-user", env("ATTRD_ADMIN_USERNAME", "admin"), "with --nats-url: the super-user the benchmark logs in as; its password from ATTRD_ADMIN_PASSWORD (ATTRD_ADMIN_USERNAME)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	external := false // --nats-url given: measure a running attrd as a client over TCP
	fs.Visit(func(f *flag.Flag) { external = external || f.Name == "nats-url" })
	if *replayEvents > 0 {
		return benchReplay(ctx, *replayEvents, stdout)
	}
	if *storage > 0 {
		return benchStorage(ctx, *storage, stdout)
	}
	if *importUsers > 0 {
		return benchImport(ctx, *importUsers, *importParallel, stdout)
	}
	var levels []int
	for _, c := range strings.Split(*concs, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(c))
		if err != nil || n < 1 {
			return fmt.Errorf("--conc: bad concurrency %q", c)
		}
		levels = append(levels, n)
	}
	if *batchKeys > 0 {
		return benchBatch(ctx, *batchKeys, levels, *dur, stdout)
	}
	var b *benchEnv
	var err error
	switch {
	case *child:
		b, err = newChildBenchEnv(ctx, slices.Max(levels)*100, *dedup)
	case external:
		b, err = newExternalBenchEnv(ctx, tools, *adminUser, os.Getenv("ATTRD_ADMIN_PASSWORD"), slices.Max(levels)*100)
	default:
		if *traceRatio > 0 {
			stop := benchTracing(*traceRatio)
			defer stop()
		}
		b, err = newBenchEnv(ctx, slices.Max(levels)*100, *dedup, !*metricsOn)
	}
	if err != nil {
		return err
	}
	defer b.close()
	if *watchers > 0 {
		return benchWatch(ctx, b, *watchers, *watchWrites, *dur, *cpuprofile, stdout)
	}
	value := strings.Repeat("v", 100)
	var seq atomic.Int64
	update := func(g, i int) error {
		opts := []client.Option{client.Expiration(time.Hour)}
		if *requestIDs {
			opts = append(opts, client.RequestID("bench-"+strconv.FormatInt(seq.Add(1), 36)))
		}
		return b.user.Attr.Update(ctx, "k"+strconv.Itoa(g), value, opts...)
	}
	if *interval > 0 {
		return b.timeline(ctx, stdout, levels[0], *dur, *interval, *checkDecay, *requestIDs, update)
	}
	many := func(size int) func(g, i int) error {
		return func(g, i int) error {
			items := make([]client.Item, size)
			for j := range items {
				items[j] = client.Item{Name: "k" + strconv.Itoa((g*100+j)%(len(b.names))), Value: value}
			}
			opts := []client.Option{client.Expiration(time.Hour)}
			if *requestIDs {
				opts = append(opts, client.RequestID("bench-"+strconv.FormatInt(seq.Add(1), 36)))
			}
			return b.user.Attr.UpdateMany(ctx, items, opts...)
		}
	}
	get := func(g, i int) error {
		_, err := b.user.Attr.Get(ctx, "k"+strconv.Itoa(g))
		return err
	}
	rawPut := func(g, i int) error {
		subj := events.KVSubject(benchRawBucket, "k"+strconv.Itoa(g))
		_, err := b.js.PublishMsg(ctx, &nats.Msg{Subject: subj, Data: []byte(value)}, jetstream.WithMsgTTL(time.Hour))
		return err
	}
	rawGet := func(g, i int) error {
		_, err := b.rawKV.Get(ctx, "k"+strconv.Itoa(g))
		return err
	}
	echo := func(g, i int) error {
		// Within the internal account: the client account may send only attrd's requests.
		_, err := b.rawConn.RequestWithContext(ctx, "attrd-bench.echo", []byte(value))
		return err
	}
	fmt.Fprintf(stdout, "attrd bench: %s per measurement, %d CPUs; value 100 bytes, TTL 1h, request ids %v; %s\n", *dur, nprocs(), *requestIDs, b.where)
	for _, n := range levels {
		if err := rawPut(0, 0); err != nil { // the raw keys exist before they are read
			return err
		}
		for g := 0; g < n; g++ {
			if err := rawPut(g, 0); err != nil {
				return err
			}
		}
		ops := []struct {
			name, short string
			op          func(g, i int) error
			base        int // index of the operation it is compared with, or -1
			against     string
		}{{"raw KV put (TTL)", "put", rawPut, -1, ""},
			{"attrd update", "update", update, 0, "%.0f%% of raw put, p50 %.1fx"},
			{"raw KV get", "get-raw", rawGet, -1, ""},
			{"attrd get", "get", get, 2, "%.0f%% of raw get, p50 %.1fx"},
			{"attrd update_many 10", "many10", many(10), 1, "one call costs %.1f updates"},
			{"attrd update_many 100", "many100", many(100), 1, "one call costs %.1f updates"},
			{"echo request", "echo", echo, 0, "%.0f%% of raw put, p50 %.1fx"}}
		run := make([]bool, len(ops))
		for i, o := range ops {
			run[i] = *only == "" || slices.Contains(strings.Split(*only, ","), o.short)
		}
		// All alternate in short rounds, so that all see the same machine: on a shared
		// machine the load of the moment moves absolute numbers a lot.
		res := make([]result, len(ops))
		b0, e0 := b.stats()
		rounds := max(int(*dur/(500*time.Millisecond)), 1)
		if err := profile(*cpuprofile); err != nil {
			return err
		}
		for r := 0; r < rounds; r++ {
			for i, o := range ops {
				if run[i] {
					res[i].add(measure(ctx, n, *dur/time.Duration(rounds), o.op))
				}
			}
		}
		if *cpuprofile != "" {
			pprof.StopCPUProfile()
		}
		b1, e1 := b.stats()
		for i := range res {
			if !run[i] {
				continue
			}
			res[i].finish()
			if res[i].err != nil {
				return fmt.Errorf("bench %s at %d: %w", ops[i].name, n, res[i].err)
			}
		}
		if b1 > b0 {
			fmt.Fprintf(stdout, "\nconcurrency %d (%.1f events per projector batch)\n", n, float64(e1-e0)/float64(b1-b0))
		} else {
			fmt.Fprintf(stdout, "\nconcurrency %d\n", n)
		}
		fmt.Fprintf(stdout, "  %-22s %10s %9s %9s  %s\n", "operation", "op/s", "p50", "p99", "against")
		for i, r := range res {
			if !run[i] {
				continue
			}
			note := ""
			switch o := ops[i]; {
			case o.base < 0 || !run[o.base]:
			case o.base == 1: // a batch against single updates
				note = fmt.Sprintf(o.against, res[1].rate/r.rate)
			default:
				bs := res[o.base]
				note = fmt.Sprintf(o.against, 100*r.rate/bs.rate, float64(r.p50)/float64(bs.p50))
			}
			fmt.Fprintf(stdout, "  %-22s %10.0f %9s %9s  %s\n", ops[i].name, r.rate, r.p50, r.p99, note)
		}
	}
	return nil
}

// timeline runs updates alone at concurrency n for total, printing every interval's
// throughput, then a raw KV put interval for scale.
func (b *benchEnv) timeline(ctx context.Context, stdout *os.File, n int, total, interval time.Duration, check, rids bool, op func(g, i int) error) error {
	fmt.Fprintf(stdout, "attrd bench: updates at concurrency %d for %s, request ids %v, %d CPUs\n", n, total, rids, nprocs())
	var rates []float64
	for t := time.Duration(0); t < total; t += interval {
		r := measure(ctx, n, interval, op)
		r.finish()
		if r.err != nil {
			return r.err
		}
		rates = append(rates, r.rate)
		fmt.Fprintf(stdout, "  %6s  %9.0f op/s  p50 %9s  p99 %9s\n", (t + interval).Round(time.Second), r.rate, r.p50, r.p99)
	}
	if len(rates) == 0 {
		return errors.New("no interval ran")
	}
	first, last := rates[0], rates[len(rates)-1]
	fmt.Fprintf(stdout, "last interval: %.0f%% of the first\n", 100*last/first)
	if check && last < 0.9*first {
		return fmt.Errorf("throughput decayed: the last interval ran at %.0f%% of the first (want at least 90%%)", 100*last/first)
	}
	return nil
}

// benchEnv is the benchmark's server, clients and raw bucket.
type benchEnv struct {
	where string // what is measured, for the heading
	// dial connects to attrd's internal account (the raw baseline, the echo).
	dial     func(name string) (*nats.Conn, error)
	dir      string
	srv      *Server
	child    *benchChild
	rawConn  *nats.Conn
	cliConn  *nats.Conn
	echoConn *nats.Conn
	echoSub  *nats.Subscription
	js       jetstream.JetStream
	rawKV    jetstream.KeyValue
	sess     *client.Session
	user     *client.User
	names    []string
}

// stats returns the projector's batches and events folded when it runs in this
// process (zero otherwise).
func (b *benchEnv) stats() (batches, events uint64) {
	if b.srv == nil {
		return 0, 0
	}
	return b.srv.Projector().Stats()
}

// newBenchEnv runs attrd in this process, on an embedded server in a temp dir.
func newBenchEnv(ctx context.Context, keys int, dedup time.Duration, noMetrics bool) (*benchEnv, error) {
	b := &benchEnv{where: "attrd and the raw operations in this process"}
	var err error
	if b.dir, err = os.MkdirTemp("", "attrd-bench-"); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			b.close()
		}
	}()
	if b.srv, err = Start(ctx, Config{DataDir: b.dir, HTTPAddr: "127.0.0.1:0", NATSAddr: "127.0.0.1:0", AdminUsername: "admin",
		AdminPassword: "bench", Password: api.PasswordParams{Time: 1, MemoryK: 64, Threads: 1},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Limits: api.Limits{MaxAttrsPerUser: -1}, DedupWindow: dedup, NoMetrics: noMetrics,
		Watch: api.WatchConfig{PerUser: -1, PerInstance: -1}}); err != nil { // update_many needs 100 names a writer
		return nil, err
	}
	b.dial = func(name string) (*nats.Conn, error) { return b.srv.InternalConn(name) }
	if b.rawConn, err = b.dial("attrd-bench-raw"); err != nil { // the raw bucket lives where attrd's does
		return nil, err
	}
	if b.cliConn, err = nats.Connect(b.srv.ClientURL()); err != nil {
		return nil, err
	}
	if err := b.setup(ctx, "admin", "bench", keys); err != nil {
		return nil, err
	}
	ok = true
	return b, nil
}

// setup creates the raw bucket (on rawConn, attrd's internal account), logs the
// super-user in (on cliConn, as a client), creates the attributes the measurements
// update and starts the echo responder.
func (b *benchEnv) setup(ctx context.Context, admin, password string, keys int) error {
	var err error
	b.js, _ = jetstream.New(b.rawConn)
	if b.rawKV, err = b.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: benchRawBucket, History: 1, LimitMarkerTTL: 5 * time.Minute,
		Replicas: b.replicas(ctx)}); err != nil {
		return fmt.Errorf("the raw bucket: %w", err)
	}
	if b.sess, err = client.New(b.cliConn, "CRM").Login(ctx, admin, password); err != nil {
		return fmt.Errorf("log in as %s: %w", admin, err)
	}
	if b.user, err = b.sess.User(ctx); err != nil {
		return err
	}
	items := make([]client.Item, keys)
	for i := range items {
		items[i] = client.Item{Name: "k" + strconv.Itoa(i), Value: 0}
		b.names = append(b.names, items[i].Name)
	}
	for i := 0; i < len(items); i += 1000 {
		if err := b.user.Attr.SetMany(ctx, items[i:min(i+1000, len(items))]); err != nil {
			return fmt.Errorf("create the attributes: %w", err)
		}
	}
	// The request/reply hop alone: an echo responder on a connection of attrd's
	// account, dispatching concurrently as attrd's API does (in this process, or here
	// beside a child or running attrd).
	if b.echoConn, err = b.dial("attrd-bench-echo"); err != nil {
		return err
	}
	if b.echoSub, err = b.echoConn.Subscribe("attrd-bench.echo", func(m *nats.Msg) { go m.Respond(m.Data) }); err != nil {
		return err
	}
	return b.echoSub.SetPendingLimits(-1, -1)
}

func (b *benchEnv) close() {
	if b.js != nil && b.srv == nil {
		// On a running attrd, the raw bucket is the benchmark's own: remove it.
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = b.js.DeleteKeyValue(dctx, benchRawBucket)
		cancel()
	}
	for _, nc := range []*nats.Conn{b.rawConn, b.cliConn, b.echoConn} {
		if nc != nil {
			nc.Close()
		}
	}
	if b.srv != nil {
		b.srv.Close()
	}
	if b.child != nil {
		b.child.stop()
	}
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
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

// profile starts a CPU profile into path when asked (one per concurrency; the last one
// written is kept).
func profile(path string) error {
	if path == "" {
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	return pprof.StartCPUProfile(f)
}

func nprocs() int { return runtime.GOMAXPROCS(0) }
