package main

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
)

// benchStorage stores n attributes of 200-byte values through attrd (create_many of
// 1000) and the same n keys in a raw KV bucket, and prints the bytes each takes in its
// stream per live key, the event log's bytes per event, and the heap of this process
// (the embedded server's included) after each, once the server's block caches expired.
func benchStorage(ctx context.Context, n int, stdout *os.File) error {
	b, err := newBenchEnv(ctx, 1, 2*time.Minute, false)
	if err != nil {
		return err
	}
	defer b.close()
	value := strings.Repeat("v", 198) // a 200-byte JSON string
	heap := func() uint64 {
		// The server caches a stream's recent blocks for 10 s after their last use:
		// what stays is measured after they expire.
		time.Sleep(11 * time.Second)
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse
	}
	streamBytes := func(name string) (uint64, uint64, error) {
		st, err := b.js.Stream(ctx, name)
		if err != nil {
			return 0, 0, err
		}
		info, err := st.Info(ctx)
		if err != nil {
			return 0, 0, err
		}
		return info.State.Bytes, info.State.Msgs, nil
	}
	h0 := heap()
	kv0, _, err := streamBytes(events.KVStream(events.DefaultBucket))
	if err != nil {
		return err
	}
	ev0, evn0, err := streamBytes(events.StreamName)
	if err != nil {
		return err
	}
	for i := 0; i < n; i += 1000 {
		items := make([]client.Item, 0, 1000)
		for j := i; j < min(i+1000, n); j++ {
			items = append(items, client.Item{Name: "s" + strconv.Itoa(j), Value: value})
		}
		if err := b.user.Attr.CreateMany(ctx, items); err != nil {
			return err
		}
	}
	h1 := heap()
	kv1, _, err := streamBytes(events.KVStream(events.DefaultBucket))
	if err != nil {
		return err
	}
	ev1, evn1, err := streamBytes(events.StreamName)
	if err != nil {
		return err
	}
	raw := []byte(`"` + value + `"`)
	futs := make([]jetstream.PubAckFuture, 0, 1000)
	r0, _, err := streamBytes("KV_bench_raw")
	if err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		f, err := b.js.PublishMsgAsync(&nats.Msg{Subject: events.KVSubject("bench_raw", "s"+strconv.Itoa(i)), Data: raw})
		if err != nil {
			return err
		}
		if futs = append(futs, f); len(futs) == cap(futs) {
			if err := events.AwaitAcks(ctx, futs); err != nil {
				return err
			}
			futs = futs[:0]
		}
	}
	if err := events.AwaitAcks(ctx, futs); err != nil {
		return err
	}
	h2 := heap()
	r1, _, err := streamBytes("KV_bench_raw")
	if err != nil {
		return err
	}
	perAttr := float64(kv1-kv0) / float64(n)
	perRaw := float64(r1-r0) / float64(n)
	fmt.Fprintf(stdout, "%d attributes of 200-byte values\n", n)
	fmt.Fprintf(stdout, "  attrd bucket: %.0f bytes per live attribute; raw KV: %.0f bytes per key (%.2fx)\n", perAttr, perRaw, perAttr/perRaw)
	fmt.Fprintf(stdout, "  event log: %.0f bytes per event (%d events of 1000 items: %.0f bytes per item)\n",
		float64(ev1-ev0)/float64(max(evn1-evn0, 1)), evn1-evn0, float64(ev1-ev0)/float64(n))
	fmt.Fprintf(stdout, "  heap of the process: +%.0f bytes per attribute through attrd, +%.0f per raw key\n",
		float64(int64(h1)-int64(h0))/float64(n), float64(int64(h2)-int64(h1))/float64(n))
	return nil
}
