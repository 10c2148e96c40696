package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// benchReplay appends n events (1,000 users with two sessions each; creates, updates,
// sets and deletes of user and session attributes, some refused), restarts the
// embedded server so that the log is read from its file store, and measures the fold
// of the whole log in memory (what replay --verify does) and a rebuild into a fresh
// bucket (replay --into).
func benchReplay(ctx context.Context, n int, stdout io.Writer) error {
	dir, err := os.MkdirTemp("", "attrd-bench-replay-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	start := func() (*nats.Conn, jetstream.JetStream, func(), error) {
		ns, err := embedded.Start(embedded.Options{DataDir: dir, Logger: quiet})
		if err != nil {
			return nil, nil, nil, err
		}
		nc, err := nats.Connect(ns.ClientURL(), nats.InProcessServer(ns))
		if err != nil {
			ns.Shutdown()
			return nil, nil, nil, err
		}
		js, _ := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192))
		return nc, js, func() { nc.Close(); ns.Shutdown(); ns.WaitForShutdown() }, nil
	}
	_, js, stop, err := start()
	if err != nil {
		return err
	}
	if _, _, err := events.EnsureStore(ctx, js, events.DefaultStoreConfig()); err != nil {
		stop()
		return err
	}
	t0 := time.Now()
	if err := appendSynthetic(ctx, js, n); err != nil {
		stop()
		return err
	}
	fmt.Fprintf(stdout, "appended %d events in %s\n", n, time.Since(t0).Round(time.Millisecond))
	stop()

	_, js, stop, err = start()
	if err != nil {
		return err
	}
	defer stop()
	log := projector.NewLog(js, nil)
	m := projector.NewMemory()
	var folded int
	t0 = time.Now()
	if err := log.FoldAll(ctx, m, func(events.Entry) { folded++ }); err != nil {
		return err
	}
	el := time.Since(t0)
	fmt.Fprintf(stdout, "fold (replay --verify's work): %d events in %s: %.0f events/s\n", folded, el.Round(time.Millisecond), float64(folded)/el.Seconds())

	store := events.DefaultStoreConfig()
	store.Bucket = "rebuilt_" + events.DefaultBucket
	if _, err := events.EnsureBucket(ctx, js, store); err != nil {
		return err
	}
	t0 = time.Now()
	m = projector.NewMemory()
	if err := log.FoldAll(ctx, m, nil); err != nil {
		return err
	}
	last, _, err := log.Last(ctx)
	if err != nil {
		return err
	}
	keys := m.Len()
	if err := projector.Write(ctx, js, store.Bucket, m, last, nil); err != nil {
		return err
	}
	el = time.Since(t0)
	fmt.Fprintf(stdout, "rebuild (replay --into): %d events, %d keys written, in %s: %.0f events/s\n", folded, keys, el.Round(time.Millisecond), float64(folded)/el.Seconds())
	return nil
}

// appendSynthetic publishes n events as attrd would, pipelined.
func appendSynthetic(ctx context.Context, js jetstream.JetStream, n int) error {
	const users = 1000
	now := time.Now()
	uids := make([]string, users)
	sids := make([][2]string, users)
	var futs []jetstream.PubAckFuture
	publish := func(ev *events.Event) error {
		ev.ID, ev.Version = events.NewID(), events.SchemaVersion
		data, err := events.Encode(ev)
		if err != nil {
			return err
		}
		f, err := js.PublishMsgAsync(&nats.Msg{Subject: events.Layout{}.Subject(ev), Data: data})
		if err != nil {
			return err
		}
		if futs = append(futs, f); len(futs) == 4096 {
			err = events.AwaitAcks(ctx, futs)
			futs = futs[:0]
		}
		return err
	}
	ts := now.UnixNano()
	count := 0
	for i := 0; i < users && count < n; i++ {
		uids[i] = events.NewID()
		ts++
		if err := publish(&events.Event{Type: events.UserCreated, Time: ts, UserID: uids[i], App: "CRM",
			User: &events.UserData{Username: "user" + strconv.Itoa(i), PasswordHash: "x", Approved: true}}); err != nil {
			return err
		}
		count++
		for j := 0; j < 2 && count < n; j++ {
			sids[i][j] = events.SessionID(events.NewID())
			ts++
			if err := publish(&events.Event{Type: events.SessionCreated, Time: ts, UserID: uids[i], SessionID: sids[i][j],
				ExpiresAt: now.Add(24 * time.Hour).UnixNano(), App: "CRM", RemoteAddr: "192.0.2.1"}); err != nil {
				return err
			}
			count++
		}
	}
	types := []events.Type{events.AttrCreated, events.AttrUpdated, events.AttrSet, events.AttrSet, events.AttrUpdated, events.AttrDeleted}
	for i := 0; count < n; i++ {
		u := i % users
		sid := ""
		if i%3 == 0 {
			sid = sids[u][i%2]
		}
		ts++
		ev := &events.Event{Type: types[i%len(types)], Time: ts, UserID: uids[u], SessionID: sid, Actor: uids[u],
			ActorSession: sids[u][0], App: "CRM", RemoteAddr: "192.0.2.1", CID: "bench"}
		ev.Attrs = []events.AttrItem{{Name: "attr" + strconv.Itoa(i%20), Value: []byte(`{"n":` + strconv.Itoa(i) + `,"s":"some value"}`)}}
		if ev.Type == events.AttrDeleted {
			ev.Attrs[0].Value = nil
		}
		if err := publish(ev); err != nil {
			return err
		}
		count++
	}
	return events.AwaitAcks(ctx, futs)
}
