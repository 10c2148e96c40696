package events

import (
	"context"

	"github.com/nats-io/nats.go/jetstream"
)

// FollowKV calls fn with every change of kv's keys under filters (none: all) from now
// on, in a goroutine of its own, until ctx ends. The KV watcher is an ordered
// consumer: it recreates itself after a disconnect (changes meanwhile may be missed:
// callers bound what that costs, a cache by its entries' age).
func FollowKV(ctx context.Context, kv jetstream.KeyValue, filters []string, fn func(jetstream.KeyValueEntry)) error {
	var w jetstream.KeyWatcher
	var err error
	if len(filters) == 0 {
		w, err = kv.WatchAll(ctx, jetstream.UpdatesOnly())
	} else {
		w, err = kv.WatchFiltered(ctx, filters, jetstream.UpdatesOnly())
	}
	if err != nil {
		return err
	}
	go func() {
		defer w.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case e, ok := <-w.Updates():
				if !ok {
					return
				}
				if e != nil {
					fn(e)
				}
			}
		}
	}()
	return nil
}
