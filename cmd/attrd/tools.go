package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
	"github.com/attrd/attrd/projector"
)

// toolFlags are the flags of the operator commands that reach a running attrd's NATS
// as attrd itself (user create, history, replay).
type toolFlags struct {
	url     *string
	keyFile *string
	auth    *natsAuth
}

// addToolFlags defines --nats-url and, with keys, --encryption-key-file.
func addToolFlags(fs *flag.FlagSet, keys bool) toolFlags {
	t := toolFlags{url: fs.String("nats-url", env("ATTRD_NATS_URL", "nats://"+env("ATTRD_NATS_ADDR", "127.0.0.1:4222")),
		"the NATS of the running attrd (ATTRD_NATS_URL)")}
	t.auth = addNATSAuthFlags(fs, "creds", credentialFile(env("ATTRD_DATA_DIR", "./attrd-data")))
	if keys {
		t.keyFile = fs.String("encryption-key-file", env("ATTRD_ENCRYPTION_KEY_FILE",
			filepath.Join(env("ATTRD_DATA_DIR", "./attrd-data"), "encryption.key")),
			"the encryption key file, for encrypted values (ATTRD_ENCRYPTION_KEY_FILE)")
	}
	return t
}

// connect connects to the NATS given by --nats-url.
// The tools read and write attrd's stream and bucket, which only the internal account
// reaches: they need its credential (the data dir's internal.creds on the embedded
// server, the deployment's credentials on a cluster).
func (t toolFlags) connect(name string) (*nats.Conn, jetstream.JetStream, error) {
	opts, err := t.auth.options()
	if err != nil {
		return nil, nil, err
	}
	// A connection outside the internal account is refused JetStream's API by the
	// permissions of the client account: the server says so asynchronously.
	denied := make(chan error, 1)
	onErr := nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		if errors.Is(err, nats.ErrPermissionViolation) {
			select {
			case denied <- err:
			default:
			}
		}
	})
	nc, err := nats.Connect(*t.url, append([]nats.Option{nats.Name(name), onErr}, opts...)...)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to %s: %w", *t.url, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	// Check at once, so that a connection without the credential fails clearly rather
	// than in the middle of the command.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		select {
		case <-denied:
			cancel()
		case <-ctx.Done():
		}
	}()
	if _, err := js.Stream(ctx, events.StreamName); err != nil {
		nc.Close()
		if errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) || errors.Is(err, jetstream.ErrJetStreamNotEnabled) ||
			errors.Is(err, context.Canceled) {
			return nil, nil, fmt.Errorf("this connection is not attrd's internal account: give its credential with --creds (on the embedded server: %s, readable only by attrd's operators)", t.auth.creds)
		}
		return nil, nil, fmt.Errorf("the event stream at %s: %w", *t.url, err)
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
// openUserLog connects as an operator's tool named name and returns the id of user (an
// id or a username, "" refused) and a reader of the log with the key file's keys.
func (t toolFlags) openUserLog(ctx context.Context, name, user string, stderr *os.File) (*nats.Conn, string, *projector.Log, *sealed.Keyring, error) {
	if user == "" {
		return nil, "", nil, nil, errors.New("--user is required")
	}
	nc, js, keys, err := t.open(name, stderr)
	if err != nil {
		return nil, "", nil, nil, err
	}
	uid, err := resolveUser(ctx, js, user)
	if err == nil {
		var log *projector.Log
		if log, err = newLog(ctx, js, keys); err == nil {
			return nc, uid, log, keys, nil
		}
	}
	nc.Close()
	return nil, "", nil, nil, err
}

// newLog returns a reader of the event log: with the key file, it opens encrypted
// values and what is personal in events (a deleted user's stays sealed).
func newLog(ctx context.Context, js jetstream.JetStream, keys *sealed.Keyring) (*projector.Log, error) {
	log := projector.NewLog(js, opener(keys))
	if keys == nil {
		return log, nil
	}
	dk, err := events.OpenDataKeys(ctx, js, keys)
	if err != nil {
		return nil, fmt.Errorf("data keys: %w", err)
	}
	return log.WithDataKeys(dk), nil
}

func opener(keys *sealed.Keyring) projector.Opener {
	if keys == nil {
		return nil
	}
	return keys
}
