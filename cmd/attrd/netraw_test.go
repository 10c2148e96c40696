package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// The raw NATS baseline of the network partition scenarios: in the same cluster,
// under the same cuts, clients on every node do what an attrd write is built on, with
// nothing of attrd's: an append to an R3 stream, then a put to an R3 KV bucket, each
// with the attrd clients' 3 s timeout. Its outages are what NATS itself costs; attrd's
// are judged against them (issue 21: "where a bound comes from NATS itself, say
// which").

// Names of the baseline's stream and bucket, in attrd's account.
const (
	rawStream = "RAW_BASELINE"
	rawBucket = "raw_baseline"
)

// rawLoad drives the baseline's clients and records, by node, when each of their
// writes (the append and the put) was acknowledged.
type rawLoad struct {
	stop  chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	acked [3][]time.Time
}

// startRawLoad creates the baseline's stream and bucket (R3, file storage, as
// attrd's) and starts perNode clients on every node.
func startRawLoad(t *testing.T, c *netCluster, perNode int) *rawLoad {
	t.Helper()
	js := c.rawJS(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: rawStream, Subjects: []string{"raw.>"},
		Replicas: 3, Storage: jetstream.FileStorage, MaxMsgs: 100_000}); err != nil {
		t.Fatalf("baseline stream: %v", err)
	}
	if _, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: rawBucket, Replicas: 3, Storage: jetstream.FileStorage}); err != nil {
		t.Fatalf("baseline bucket: %v", err)
	}
	l := &rawLoad{stop: make(chan struct{})}
	for i := range 3 {
		for k := range perNode {
			js := c.rawJS(t, i)
			kv, err := js.KeyValue(ctx, rawBucket)
			if err != nil {
				t.Fatal(err)
			}
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				l.run(js, kv, i, fmt.Sprintf("n%d-%d", i, k))
			}()
		}
	}
	return l
}

// rawJS connects to node i as attrd does (its account, its user).
func (c *netCluster) rawJS(t *testing.T, i int) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(c.url(i), nats.UserInfo("attrd", c.intPW), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// run writes until stopped: an append, then a put, each tried again until it is
// acknowledged; a write counts when both are.
func (l *rawLoad) run(js jetstream.JetStream, kv jetstream.KeyValue, node int, name string) {
	data := make([]byte, 200)
	try := func(f func(ctx context.Context) error) bool {
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			err := f(ctx)
			cancel()
			if err == nil {
				return true
			}
			select {
			case <-l.stop:
				return false
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	for {
		select {
		case <-l.stop:
			return
		default:
		}
		if !try(func(ctx context.Context) error { _, err := js.Publish(ctx, "raw."+name, data); return err }) ||
			!try(func(ctx context.Context) error { _, err := kv.Put(ctx, name, data); return err }) {
			return
		}
		l.mu.Lock()
		l.acked[node] = append(l.acked[node], time.Now())
		l.mu.Unlock()
	}
}

// finish stops the clients.
func (l *rawLoad) finish() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

// longestGap is the longest stretch in [from, to] without a write acknowledged
// through node i's clients (i < 0: any node's): when it began, and how long it lasted.
func (l *rawLoad) longestGap(i int, from, to time.Time) (time.Time, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return longestGap(l.acked[:], i, from, to)
}

// gapOver is the longest stretch without a write acknowledged through any node that
// overlaps [from, to], measured whole (from the last write before it to the first
// after it, or to now): NATS's own outage during one of attrd's.
func (l *rawLoad) gapOver(from, to time.Time) time.Duration {
	l.mu.Lock()
	var ts []time.Time
	for _, a := range l.acked {
		ts = append(ts, a...)
	}
	l.mu.Unlock()
	slices.SortFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
	ts = append(ts, time.Now())
	worst := time.Duration(0)
	for k := 1; k < len(ts); k++ {
		if a, b := ts[k-1], ts[k]; a.Before(to) && b.After(from) {
			worst = max(worst, b.Sub(a))
		}
	}
	return worst
}

// firstWrite is when the first write through node i's clients was acknowledged after
// from (zero: none).
func (l *rawLoad) firstWrite(i int, from time.Time) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return firstAfter(l.acked[i], from)
}

// alignRaw moves the baseline's leaders to the nodes leading attrd's: the stream's to
// the event stream's, the bucket's to attrd's bucket's, so that a cut of a leader's
// node costs both alike.
func (r *netRun) alignRaw(t *testing.T) {
	t.Helper()
	l := r.c.leaders()
	for raw, own := range map[string]string{rawStream: events.StreamName, events.KVStream(rawBucket): events.KVStream(events.DefaultBucket)} {
		if n, ok := l[own]; ok {
			r.moveLeader(t, raw, n)
		}
	}
}

// rawVerdict returns how much of attrd's outage the raw baseline explains: ok when
// attrd's outage d is within bound, or within rawAllowance of the baseline's outage
// raw in the same stretch when that is over the bound itself (NATS's part).
func rawVerdict(d, raw, bound time.Duration) (ok bool, why string) {
	switch {
	case d <= bound:
		return true, ""
	case raw > bound && d <= raw+rawAllowance:
		return true, fmt.Sprintf("over the %s bound, as NATS itself was (raw NATS writes stopped for %s; attrd's part %s, allowed %s)",
			bound, raw.Round(time.Millisecond), (d - raw).Round(time.Millisecond), rawAllowance)
	case raw > bound:
		return false, fmt.Sprintf("raw NATS writes stopped for %s, attrd's %s: more than %s over NATS", raw.Round(time.Millisecond), d.Round(time.Millisecond), rawAllowance)
	}
	return false, fmt.Sprintf("raw NATS writes stopped for %s only", raw.Round(time.Millisecond))
}

// rawAllowance is how much longer than NATS's own outage attrd's may be: a lease TTL
// (the default 3 s), what an instance cut off with the last holder leaves the others
// to wait once the bucket takes writes again.
const rawAllowance = 3 * time.Second

// longestGap is the longest stretch in [from, to] without a time of acked (by node;
// i < 0: all nodes'): when it began, and how long it lasted.
func longestGap(acked [][]time.Time, i int, from, to time.Time) (time.Time, time.Duration) {
	var ts []time.Time
	for n, a := range acked {
		if i < 0 || n == i {
			ts = append(ts, a...)
		}
	}
	slices.SortFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
	last, worst, began := from, time.Duration(0), from
	for _, t := range ts {
		if t.Before(from) {
			continue
		}
		if t.After(to) {
			break
		}
		if t.Sub(last) > worst {
			worst, began = t.Sub(last), last
		}
		last = t
	}
	if to.Sub(last) > worst {
		worst, began = to.Sub(last), last
	}
	return began, worst
}

// firstAfter is the earliest of ts after from (zero: none).
func firstAfter(ts []time.Time, from time.Time) time.Time {
	var first time.Time
	for _, t := range ts {
		if t.After(from) && (first.IsZero() || t.Before(first)) {
			first = t
		}
	}
	return first
}
