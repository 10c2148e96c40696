package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// The NATS baselines of the network partition scenarios: in the same cluster, under
// the same cuts, clients on every node write with nothing of attrd's, each write
// with the attrd clients' 3 s timeout and tried again until acknowledged. Their
// outages are what NATS itself costs; attrd's are judged against them (issue 21:
// "where a bound comes from NATS itself, say which").
//
//   - The raw baseline does what an attrd write is built on: an append to an R3
//     stream, then a put to an R3 KV bucket, of their own.
//   - The groups probe writes to attrd's own two groups: the event stream (an empty
//     decision record of no user, which every reader of the log skips) and the
//     bucket (a heartbeat key, as attrd's quorum heartbeat).
//     Which groups draw the longer elections after a cut is chance: this one says
//     whether attrd's groups could take a write at all.

// Names of the raw baseline's stream and bucket, in attrd's account.
const (
	rawStream = "RAW_BASELINE"
	rawBucket = "raw_baseline"
)

// probeLoad drives a baseline's clients and records, by node, when each of their
// writes (all of its steps) was acknowledged.
type probeLoad struct {
	stop  chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	acked [3][]time.Time
}

// probeStep is one step of a baseline's write, by client name.
type probeStep func(ctx context.Context, js jetstream.JetStream, name string) error

// probePace is how long a baseline's client waits between two writes: 40 a second
// each, a resolution far finer than the outages measured, and a load that leaves
// attrd's alone.
const probePace = 25 * time.Millisecond

// startProbes starts perNode clients on every node, each writing steps in turn.
func startProbes(t *testing.T, c *netCluster, perNode int, steps ...probeStep) *probeLoad {
	t.Helper()
	l := &probeLoad{stop: make(chan struct{})}
	for i := range 3 {
		for k := range perNode {
			js := c.rawJS(t, i)
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				l.run(js, i, fmt.Sprintf("n%d-%d", i, k), steps)
			}()
		}
	}
	return l
}

// startRawLoad creates the raw baseline's stream and bucket (R3, file storage, as
// attrd's) and starts perNode clients on every node.
func startRawLoad(t *testing.T, c *netCluster, perNode int) *probeLoad {
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
	data := make([]byte, 200)
	return startProbes(t, c, perNode,
		func(ctx context.Context, js jetstream.JetStream, name string) error {
			_, err := js.Publish(ctx, "raw."+name, data)
			return err
		},
		func(ctx context.Context, js jetstream.JetStream, name string) error {
			_, err := js.Publish(ctx, "$KV."+rawBucket+"."+name, data)
			return err
		})
}

// startGroupsProbe starts a client on every node that asks attrd's event stream and
// bucket whether they take writes, storing nothing in the event stream.
func startGroupsProbe(t *testing.T, c *netCluster) *probeLoad {
	t.Helper()
	return startProbes(t, c, 1,
		func(ctx context.Context, js jetstream.JetStream, name string) error {
			// An empty decision record of no user: every reader of the log skips it
			// (not an event subject; no decision in it). A leader that only believes
			// it leads would answer a refused append (an expected sequence) too: the
			// probe must be committed to say the stream takes writes.
			_, err := js.Publish(ctx, events.EventsPrefix+".PROBE"+strings.ReplaceAll(name, "-", "")+".decision", nil)
			return err
		},
		func(ctx context.Context, js jetstream.JetStream, name string) error {
			_, err := events.Barrier(js, events.KVSubject(events.DefaultBucket, events.HeartbeatKey("probe-"+name)), nil)(ctx)
			return err
		})
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

// run writes until stopped: each step tried again until it is acknowledged; a write
// counts when all are.
func (l *probeLoad) run(js jetstream.JetStream, node int, name string, steps []probeStep) {
	for {
		for _, step := range steps {
			for {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				err := step(ctx, js, name)
				cancel()
				if err == nil {
					break
				}
				select {
				case <-l.stop:
					return
				case <-time.After(50 * time.Millisecond):
				}
			}
		}
		l.mu.Lock()
		l.acked[node] = append(l.acked[node], time.Now())
		l.mu.Unlock()
		select {
		case <-l.stop:
			return
		case <-time.After(probePace):
		}
	}
}

// finish stops the clients.
func (l *probeLoad) finish() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

// longestGap is the longest stretch in [from, to] without a write acknowledged
// through node i's clients (i < 0: any node's): when it began, and how long it lasted.
func (l *probeLoad) longestGap(i int, from, to time.Time) (time.Time, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return longestGap(l.acked[:], i, from, to)
}

// downWithin is how long, all told, no write was acknowledged through any node in
// [from, to]: the sum of the pauses over probeDown between writes (or the stretch's
// ends): NATS's own part of an outage of attrd's in that stretch.
func (l *probeLoad) downWithin(from, to time.Time) time.Duration {
	l.mu.Lock()
	ts := append([]time.Time{from}, timesIn(l.acked[:], -1, from, to)...)
	l.mu.Unlock()
	ts = append(ts, to)
	var down time.Duration
	for k := 1; k < len(ts); k++ {
		if d := ts[k].Sub(ts[k-1]); d > probeDown {
			down += d
		}
	}
	return down
}

// probeDown is a pause between the probes' writes that counts as NATS taking none:
// ten times their pace.
const probeDown = 10 * probePace

// spans says when writes through any node went on in [from, to]: stretches in which
// no two writes were more than 500 ms apart ("15:04:05.000–15:04:06.200").
func (l *probeLoad) spans(from, to time.Time) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return spansOf(l.acked[:], from, to)
}

// firstWrite is when the first write through node i's clients was acknowledged after
// from (zero: none).
func (l *probeLoad) firstWrite(i int, from time.Time) time.Time {
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

// natsVerdict judges an outage d of attrd's against its bound and NATS's own outage
// in the same stretch (the groups probe's: attrd's groups took no write then): ok
// when d is within the bound, or within natsAllowance of NATS's; why says which, and
// is empty when d is within the bound.
func natsVerdict(d, nats, bound time.Duration) (ok bool, why string) {
	switch {
	case d <= bound:
		return true, ""
	case d <= nats+natsAllowance:
		return true, fmt.Sprintf("over the %s bound, within %s of NATS (attrd's groups took no write for %s; attrd's part %s)",
			bound, natsAllowance, nats.Round(time.Millisecond), max(d-nats, 0).Round(time.Millisecond))
	}
	return false, fmt.Sprintf("attrd's groups took no write for %s, attrd's part %s: more than %s", nats.Round(time.Millisecond),
		(d - nats).Round(time.Millisecond), natsAllowance)
}

// natsAllowance is how much longer than NATS's own outage attrd's may be: a lease's
// hand-over (its 2 s TTL, the margin, the others' poll and the new run's start: about
// 3 s), what an instance cut off while holding a partition leaves the others to wait
// once the bucket takes writes again.
const natsAllowance = 3 * time.Second

// longestGap is the longest stretch in [from, to] without a time of acked (by node;
// i < 0: all nodes'): when it began, and how long it lasted.
func longestGap(acked [][]time.Time, i int, from, to time.Time) (time.Time, time.Duration) {
	last, worst, began := from, time.Duration(0), from
	for _, t := range timesIn(acked, i, from, to) {
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

// spansOf says when the times of acked (every node's) fell in [from, to] no more than
// 500 ms apart.
func spansOf(acked [][]time.Time, from, to time.Time) string {
	ts := timesIn(acked, -1, from, to)
	var out []string
	for k := 0; k < len(ts); {
		j := k
		for j+1 < len(ts) && ts[j+1].Sub(ts[j]) <= 500*time.Millisecond {
			j++
		}
		out = append(out, ts[k].Format("15:04:05.000")+"–"+ts[j].Format("15:04:05.000"))
		k = j + 1
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ", ")
}

// timesIn returns the times of acked by node i (i < 0: every node's) in [from, to],
// in order.
func timesIn(acked [][]time.Time, i int, from, to time.Time) []time.Time {
	var ts []time.Time
	for n, a := range acked {
		for _, t := range a {
			if (i < 0 || n == i) && !t.Before(from) && !t.After(to) {
				ts = append(ts, t)
			}
		}
	}
	slices.SortFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
	return ts
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
