package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/api/natsapi"
)

// benchWatch measures watches (issue 20): the time from a write's ok to its change
// reaching 1, 100 and up to n watchers of the written attribute; the memory an open
// watch costs the server; and update throughput against a raw KV put, without
// watchers and with n idle ones (watching other users' attributes). The watchers are
// raw NATS watches on one wildcard subscription of this process, so that the client
// side costs little beside the server measured.
func benchWatch(ctx context.Context, b *benchEnv, n, writes int, dur time.Duration, cpuprofile string, stdout *os.File) error {
	fmt.Fprintf(stdout, "attrd bench --watchers %d: %s\n", n, b.where)
	ws, err := newWatchSwarm(b)
	if err != nil {
		return err
	}
	defer ws.close()
	// Throughput without watchers first, with the raw put beside it.
	base := b.updateAgainstRaw(ctx, dur)
	fmt.Fprintf(stdout, "\nupdates at concurrency 64, no watchers: %s\n", base)

	// Latency to 1, 100, ..., n watchers of the written attribute.
	for _, level := range []int{1, 100, 1000, 10_000, n} {
		if level > n || level <= ws.open {
			continue
		}
		if err := ws.watch(ctx, b.sess.UST, "", "w", level-ws.open); err != nil {
			return err
		}
		if level == n && os.Getenv("ATTRD_WATCH_PROFILE") != "" {
			if err := profile(os.Getenv("ATTRD_WATCH_PROFILE")); err != nil {
				return err
			}
		}
		all, each, err := ws.latency(ctx, b.user, writes)
		if level == n && os.Getenv("ATTRD_WATCH_PROFILE") != "" {
			pprof.StopCPUProfile()
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%6d watchers: from a write's ok to its change at every watcher p50 %s p99 %s; at each watcher p50 %s p99 %s (%d writes, one at a time)\n",
			level, pct(all, 50), pct(all, 99), pct(each, 50), pct(each, 99), writes)
	}
	ws.stopAll()

	// Memory per watch, and throughput with n idle watchers (each user of a hundred
	// watched n/100 times, none of them written).
	users, err := b.benchUsers(ctx, 100)
	if err != nil {
		return err
	}
	before, err := b.serverHeap(ctx)
	if err != nil {
		return err
	}
	for i := 0; i < n; i += n / len(users) {
		if err := ws.watch(ctx, b.sess.UST, users[(i*len(users))/n], "", min(n/len(users), n-i)); err != nil {
			return err
		}
	}
	after, err := b.serverHeap(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "\n%d idle watchers open: %s\n", ws.open, heapDelta(before, after, ws.open))
	if err := profile(cpuprofile); err != nil {
		return err
	}
	idle := b.updateAgainstRaw(ctx, dur)
	if cpuprofile != "" {
		pprof.StopCPUProfile()
	}
	fmt.Fprintf(stdout, "updates at concurrency 64, %d idle watchers: %s\n", ws.open, idle)
	fmt.Fprintf(stdout, "updates with the idle watchers: %.0f%% of those without (each against its own raw put: %.1f%% then %.1f%% of raw)\n",
		100*idle.attrd/base.attrd, 100*base.attrd/base.raw, 100*idle.attrd/idle.raw)
	return nil
}

// pct returns the p-th percentile of ds, sorted.
func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	return ds[min(len(ds)*p/100, len(ds)-1)].Round(10 * time.Microsecond)
}

// throughput is an update measurement beside its raw put.
type throughput struct{ attrd, raw float64 }

func (t throughput) String() string {
	return fmt.Sprintf("attrd %.0f/s, raw KV put %.0f/s (%.1f%%)", t.attrd, t.raw, 100*t.attrd/t.raw)
}

// updateAgainstRaw alternates updates and raw puts at concurrency 64 in short rounds.
func (b *benchEnv) updateAgainstRaw(ctx context.Context, dur time.Duration) throughput {
	value := strings.Repeat("v", 100)
	update := func(g, i int) error { return b.user.Attr.Update(ctx, "k"+strconv.Itoa(g), value) }
	raw := func(g, i int) error {
		_, err := b.js.Publish(ctx, "$KV."+benchRawBucket+".k"+strconv.Itoa(g), []byte(value))
		return err
	}
	var u, r result
	rounds := max(int(dur/(500*time.Millisecond)), 1)
	for range rounds {
		u.add(measure(ctx, 64, dur/time.Duration(rounds), update))
		r.add(measure(ctx, 64, dur/time.Duration(rounds), raw))
	}
	u.finish()
	r.finish()
	return throughput{u.rate, r.rate}
}

// benchUsers creates n users for the idle watchers.
func (b *benchEnv) benchUsers(ctx context.Context, n int) ([]string, error) {
	var ids []string
	for i := range n {
		id, err := b.sess.CreateUser(ctx, fmt.Sprintf("watched-%d-%d", time.Now().UnixNano(), i), "pw-"+strconv.Itoa(i), false)
		if err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, nil
}

// serverHeap reads the server's memory in use, heap and goroutine stacks: in this
// process, after a collection; of a child, its /metrics, the least of a few samples
// (collections come and go).
func (b *benchEnv) serverHeap(ctx context.Context) (uint64, error) {
	if b.child == nil {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc + ms.StackInuse, nil
	}
	least := uint64(0)
	for range 5 {
		heap, err := metricValue(ctx, "http://"+b.child.httpAddr+"/metrics", "go_memstats_heap_inuse_bytes")
		if err != nil {
			return 0, err
		}
		stacks, err := metricValue(ctx, "http://"+b.child.httpAddr+"/metrics", "go_memstats_stack_inuse_bytes")
		if err != nil {
			return 0, err
		}
		v := heap + stacks
		if least == 0 || uint64(v) < least {
			least = uint64(v)
		}
		time.Sleep(300 * time.Millisecond)
	}
	return least, nil
}

// heapDelta describes the heap grown by n watches.
func heapDelta(before, after uint64, n int) string {
	if after < before {
		return fmt.Sprintf("server heap and stacks %d MB before, %d MB after (no growth seen)", before>>20, after>>20)
	}
	return fmt.Sprintf("server heap and stacks %d MB before, %d MB after: %.1f KB per watch", before>>20, after>>20, float64(after-before)/float64(n)/1024)
}

// metricValue reads one sample of a Prometheus text exposition.
func metricValue(ctx context.Context, url, name string) (float64, error) {
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 2 && f[0] == name {
			return strconv.ParseFloat(f[1], 64)
		}
	}
	return 0, fmt.Errorf("%s: no %s", url, name)
}

// watchSwarm is many raw watches on one subscription: the reply subject of watch i is
// prefix.i.
type watchSwarm struct {
	nc     *nats.Conn
	sub    *nats.Subscription
	prefix string
	open   int

	done    chan struct{}
	mu      sync.Mutex
	ready   int
	ids     []string
	renew   string
	arrived map[string][]time.Time // by the value written
}

func newWatchSwarm(b *benchEnv) (*watchSwarm, error) {
	ws := &watchSwarm{nc: b.cliConn, prefix: b.cliConn.NewRespInbox(), arrived: map[string][]time.Time{}, done: make(chan struct{})}
	var err error
	if ws.sub, err = ws.nc.Subscribe(ws.prefix+".*", ws.onMsg); err != nil {
		return nil, err
	}
	go ws.renewals()
	return ws, ws.sub.SetPendingLimits(-1, -1)
}

// renewals renews every open watch every 20 s, as a client must (natsapi/watch.go).
func (ws *watchSwarm) renewals() {
	t := time.NewTicker(20 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ws.done:
			return
		case <-t.C:
		}
		ws.mu.Lock()
		ids, renew := slices.Clone(ws.ids), ws.renew
		ws.mu.Unlock()
		for _, id := range ids {
			_ = ws.nc.Publish(renew, []byte(`{"watch_id":"`+id+`"}`))
		}
	}
}

func (ws *watchSwarm) onMsg(m *nats.Msg) {
	now := time.Now()
	var msg struct {
		Type    string `json:"type"`
		Status  string `json:"status"`
		WatchID string `json:"watch_id"`
		Renew   string `json:"renew_subject"`
		Attrs   []struct {
			Value json.RawMessage `json:"value"`
		} `json:"attrs"`
	}
	if json.Unmarshal(m.Data, &msg) != nil {
		return
	}
	ws.mu.Lock()
	defer ws.mu.Unlock()
	switch {
	case msg.Type == "ready" && msg.Status == "ok":
		ws.ready++
		ws.ids = append(ws.ids, msg.WatchID)
		ws.renew = msg.Renew
	case msg.Type == "change" && len(msg.Attrs) > 0:
		v := string(msg.Attrs[0].Value)
		ws.arrived[v] = append(ws.arrived[v], now)
	}
}

// watch opens k more watches of the caller's attributes (uid ""), or of user uid's,
// on the attribute name ("": all), and waits until they are ready.
func (ws *watchSwarm) watch(ctx context.Context, ust, uid, name string, k int) error {
	body := map[string]any{"current_app": "CRM", "ust": ust}
	if uid != "" {
		body["user_id"] = uid
	}
	if name != "" {
		body["name"] = name
	}
	data, _ := json.Marshal(body)
	want := ws.open + k
	for i := ws.open; i < want; i++ {
		if err := ws.nc.PublishRequest(natsapi.Subject("user.attr.watch"), ws.prefix+"."+strconv.Itoa(i), data); err != nil {
			return err
		}
		if i%500 == 499 {
			if err := ws.wait(ctx, i+1-250); err != nil { // a few hundred in flight at most
				return err
			}
		}
	}
	ws.open = want
	return ws.wait(ctx, want)
}

// wait waits until n watches are ready.
func (ws *watchSwarm) wait(ctx context.Context, n int) error {
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		ws.mu.Lock()
		ready := ws.ready
		ws.mu.Unlock()
		if ready >= n {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("only %d of %d watches opened (see the limits: --watches-per-user, --watches-per-instance)", ready, n)
		}
	}
}

// latency writes the watched attribute `writes` times, one at a time, and returns,
// per write, the time from its ok until every open watch had its change, and, per
// delivery, the time from the ok to it (0 when it came before the ok).
func (ws *watchSwarm) latency(ctx context.Context, u *client.User, writes int) (all, each []time.Duration, err error) {
	for j := range writes {
		v := strconv.Itoa(int(time.Now().UnixNano())) + "-" + strconv.Itoa(j)
		if err := u.Attr.Set(ctx, "w", v); err != nil {
			return nil, nil, err
		}
		ok := time.Now()
		key := strconv.Quote(v)
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Microsecond) {
			ws.mu.Lock()
			got := ws.arrived[key]
			ws.mu.Unlock()
			if len(got) >= ws.open {
				last := ok
				for _, t := range got {
					each = append(each, max(t.Sub(ok), 0))
					if t.After(last) {
						last = t
					}
				}
				all = append(all, last.Sub(ok))
				break
			}
			if time.Now().After(deadline) {
				return nil, nil, fmt.Errorf("write %d reached %d of %d watchers in 10 s", j, len(got), ws.open)
			}
		}
		ws.mu.Lock()
		delete(ws.arrived, key)
		ws.mu.Unlock()
	}
	slices.Sort(all)
	slices.Sort(each)
	return all, each, nil
}

// stopAll stops every open watch (a stop on each one's renewal subject).
func (ws *watchSwarm) stopAll() {
	ws.mu.Lock()
	ids, renew := ws.ids, ws.renew
	ws.ids, ws.ready = nil, 0
	ws.mu.Unlock()
	for _, id := range ids {
		_ = ws.nc.Publish(renew, []byte(`{"watch_id":"`+id+`","stop":true}`))
	}
	_ = ws.nc.Flush()
	ws.open = 0
}

func (ws *watchSwarm) close() {
	close(ws.done)
	ws.stopAll()
	_ = ws.sub.Unsubscribe()
}
