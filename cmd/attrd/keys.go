package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// keysCmd is `attrd keys rotate`: after a new key is put first in the key file (the
// old ones after it), it wraps every user's data key again with the new one. The key
// file then only needs the new key for what attrd writes from this version on (data
// keys wrap every value and everything personal); it says how many values of the
// projection, written by an earlier attrd, are still sealed with another key of the
// file, which must stay until they are written again.
func keysCmd(ctx context.Context, args []string, stdout, stderr *os.File) error {
	if len(args) == 0 || args[0] != "rotate" {
		return errors.New("usage: attrd keys rotate --encryption-key-file F [--nats-url URL]")
	}
	fs := flag.NewFlagSet("keys rotate", flag.ContinueOnError)
	tool := addToolFlags(fs, true)
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	nc, js, keys, err := tool.open("attrd-keys", stderr)
	if err != nil {
		return err
	}
	defer nc.Close()
	if keys == nil {
		return errors.New("--encryption-key-file is required: its first key is the new one")
	}
	dk, err := events.OpenDataKeys(ctx, js, keys)
	if err != nil {
		return err
	}
	if dk == nil {
		return errors.New("this deployment has no data keys (made before attrd kept them): nothing to rotate")
	}
	r, err := dk.Rotate(ctx, 0)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "re-wrapped %d data keys with key %s (%d were already, %d users deleted)\n", r.Rewrapped, keys.Primary(), r.Current, r.Erased)
	older, err := valuesSealedWithOtherKeys(ctx, js, keys.Primary())
	if err != nil {
		return err
	}
	if len(older) == 0 {
		fmt.Fprintf(stdout, "every key of the file but %s can now be removed from it\n", keys.Primary())
		return nil
	}
	for id, n := range older {
		fmt.Fprintf(stdout, "%d values in the projection, written by an earlier attrd, are sealed with key %s: keep it in the file until they are written again\n", n, id)
	}
	return nil
}

// valuesSealedWithOtherKeys counts, by key id, the encrypted values of the projection
// sealed with a key of the ring other than primary (written by an attrd before values
// were sealed with data keys).
func valuesSealedWithOtherKeys(ctx context.Context, js jetstream.JetStream, primary string) (map[string]int, error) {
	kv, err := js.KeyValue(ctx, events.DefaultBucket)
	if err != nil {
		return nil, err
	}
	w, err := kv.Watch(ctx, "a.>", jetstream.IgnoreDeletes())
	if err != nil {
		return nil, err
	}
	defer w.Stop()
	out := map[string]int{}
	for e := range w.Updates() {
		if e == nil {
			break
		}
		rec, err := events.DecodeRecord(e.Key(), e.Value())
		a, ok := rec.(*events.AttrRecord)
		if err != nil || !ok || !a.Encrypted {
			continue
		}
		if id, err := sealed.KeyID(a.Value); err == nil && id != primary {
			out[id]++
		}
	}
	return out, nil
}
