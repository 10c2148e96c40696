package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// benchBatch measures what JetStream's fast batch publish (server 2.14+, no nats.go
// client yet) would save the projector on a write of many keys: n keys with a TTL
// published async and every ack awaited, as the projector writes them now, against the
// same n keys as one fast batch, at each concurrency, in alternating rounds.
func benchBatch(ctx context.Context, n int, levels []int, dur time.Duration, stdout *os.File) error {
	b, err := newBenchEnv(ctx, 1, 2*time.Minute, false)
	if err != nil {
		return err
	}
	defer b.close()
	st, err := b.js.Stream(ctx, events.KVStream("bench_raw"))
	if err != nil {
		return err
	}
	cfg := st.CachedInfo().Config
	cfg.AllowBatchPublish = true
	if _, err := b.js.UpdateStream(ctx, cfg); err != nil {
		return fmt.Errorf("allow fast batches on the raw bucket: %w", err)
	}
	value := []byte(strings.Repeat("v", 100))
	msgs := func(g int) []*nats.Msg {
		out := make([]*nats.Msg, n)
		for j := range out {
			out[j] = &nats.Msg{Subject: events.KVSubject("bench_raw", fmt.Sprintf("b%d_%d", g, j)), Data: value,
				Header: nats.Header{jetstream.MsgTTLHeader: []string{"1h"}}}
		}
		return out
	}
	fmt.Fprintf(stdout, "attrd bench: %d keys a write, %s per measurement, %d CPUs\n", n, dur, nprocs())
	for _, c := range levels {
		batches := make([]*fastBatcher, c)
		for g := range batches {
			if batches[g], err = newFastBatcher(b.rawConn); err != nil {
				return err
			}
			defer batches[g].close()
		}
		async := func(g, i int) error {
			futs := make([]jetstream.PubAckFuture, 0, n)
			for _, m := range msgs(g) {
				f, err := b.js.PublishMsgAsync(m)
				if err != nil {
					return err
				}
				futs = append(futs, f)
			}
			return events.AwaitAcks(ctx, futs)
		}
		fast := func(g, i int) error { return batches[g].publish(ctx, msgs(g)) }
		var ra, rf result
		rounds := max(int(dur/(500*time.Millisecond)), 1)
		for r := 0; r < rounds; r++ {
			ra.add(measure(ctx, c, dur/time.Duration(rounds), async))
			rf.add(measure(ctx, c, dur/time.Duration(rounds), fast))
		}
		ra.finish()
		rf.finish()
		if err := errors.Join(ra.err, rf.err); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "\nconcurrency %d\n", c)
		fmt.Fprintf(stdout, "  %-34s %9.0f writes/s (%7.0f keys/s)  p50 %9s  p99 %9s\n", "async puts, every ack awaited", ra.rate, ra.rate*float64(n), ra.p50, ra.p99)
		fmt.Fprintf(stdout, "  %-34s %9.0f writes/s (%7.0f keys/s)  p50 %9s  p99 %9s  %.2fx\n", "one fast batch", rf.rate, rf.rate*float64(n), rf.p50, rf.p99, rf.rate/ra.rate)
	}
	return nil
}

// fastBatcher publishes fast batches, one at a time, with the protocol of nats-server
// 2.14+ (stream.go getFastBatch): each message's reply subject is
// <prefix>.<batch id>.<flow>.<gap mode>.<batch seq>.<op>.$FI, the server answers the
// first message with the flow window, then a flow ack every window, and the commit with
// a PubAck.
type fastBatcher struct {
	nc      *nats.Conn
	prefix  string
	sub     *nats.Subscription
	replies chan *nats.Msg
}

func newFastBatcher(nc *nats.Conn) (*fastBatcher, error) {
	f := &fastBatcher{nc: nc, prefix: nats.NewInbox(), replies: make(chan *nats.Msg, 256)}
	var err error
	f.sub, err = nc.ChanSubscribe(f.prefix+".>", f.replies)
	return f, err
}

func (f *fastBatcher) close() { _ = f.sub.Unsubscribe() }

// publish sends msgs as one batch ("gap: fail") and waits for its commit.
func (f *fastBatcher) publish(ctx context.Context, msgs []*nats.Msg) error {
	id := strings.ToLower(events.NewID())
	flow := strconv.Itoa(len(msgs))
	var acked, window uint64
	next := func() (map[string]any, error) {
		for {
			select {
			case m := <-f.replies:
				if !strings.HasPrefix(m.Subject, f.prefix+"."+id+".") {
					continue // a late reply of an earlier batch
				}
				var r map[string]any
				if err := json.Unmarshal(m.Data, &r); err != nil {
					return nil, err
				}
				if r["error"] != nil || r["type"] == "err" {
					return nil, fmt.Errorf("fast batch: %s", m.Data)
				}
				return r, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(5 * time.Second):
				return nil, errors.New("fast batch: no reply")
			}
		}
	}
	for i, m := range msgs {
		seq := uint64(i + 1)
		op := "1"
		switch {
		case i == 0:
			op = "0"
		case i == len(msgs)-1:
			op = "2"
		}
		for window > 0 && seq > acked+window {
			r, err := next()
			if err != nil {
				return err
			}
			if s, ok := r["seq"].(float64); ok && r["type"] == "ack" {
				acked, window = uint64(s), uint64(r["msgs"].(float64))
			}
		}
		m.Reply = fmt.Sprintf("%s.%s.%s.fail.%d.%s.$FI", f.prefix, id, flow, seq, op)
		if err := f.nc.PublishMsg(m); err != nil {
			return err
		}
		if i == 0 && len(msgs) > 1 {
			r, err := next() // the window
			if err != nil {
				return err
			}
			window = uint64(r["msgs"].(float64))
		}
	}
	for {
		r, err := next()
		if err != nil {
			return err
		}
		if _, ok := r["stream"]; ok {
			if c, _ := r["count"].(float64); int(c) != len(msgs) {
				return fmt.Errorf("fast batch committed %v of %d", r["count"], len(msgs))
			}
			return nil
		}
	}
}
