package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events/sealed"
	"github.com/attrd/attrd/projector"
)

// toolFlags are the flags of the operator commands that reach a running attrd's NATS
// as attrd itself (user create, history, replay).
type toolFlags struct {
	url     *string
	keyFile *string
}

// addToolFlags defines --nats-url and, with keys, --encryption-key-file.
func addToolFlags(fs *flag.FlagSet, keys bool) toolFlags {
	t := toolFlags{url: fs.String("nats-url", env("ATTRD_NATS_URL", "nats://"+env("ATTRD_NATS_ADDR", "127.0.0.1:4222")),
		"the NATS of the running attrd (ATTRD_NATS_URL)")}
	if keys {
		t.keyFile = fs.String("encryption-key-file", env("ATTRD_ENCRYPTION_KEY_FILE",
			filepath.Join(env("ATTRD_DATA_DIR", "./attrd-data"), "encryption.key")),
			"the encryption key file, for encrypted values (ATTRD_ENCRYPTION_KEY_FILE)")
	}
	return t
}

// connect connects to the NATS given by --nats-url.
func (t toolFlags) connect(name string) (*nats.Conn, jetstream.JetStream, error) {
	nc, err := nats.Connect(*t.url, nats.Name(name))
	if err != nil {
		return nil, nil, fmt.Errorf("connect to %s: %w", *t.url, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}

// open connects and loads the key file (see keys).
func (t toolFlags) open(name string, w io.Writer) (*nats.Conn, jetstream.JetStream, *sealed.Keyring, error) {
	nc, js, err := t.connect(name)
	if err != nil {
		return nil, nil, nil, err
	}
	keys, err := t.keys(w)
	if err != nil {
		nc.Close()
		return nil, nil, nil, err
	}
	return nc, js, keys, nil
}

// keys loads the key file; a missing one is nil keys and a notice on w.
func (t toolFlags) keys(w io.Writer) (*sealed.Keyring, error) {
	keys, err := sealed.LoadKeyFile(*t.keyFile)
	if errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(w, "attrd: no key file at %s: encrypted values stay sealed\n", *t.keyFile)
		return nil, nil
	}
	return keys, err
}

// opener is keys as a projector.Opener, nil (not a nil *Keyring) when there are none.
func opener(keys *sealed.Keyring) projector.Opener {
	if keys == nil {
		return nil
	}
	return keys
}
