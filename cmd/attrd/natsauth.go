package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/attrd/attrd/deploy/embedded"
)

// natsAuth is how attrd (serve on --nats-url) and the operator tools authenticate to
// NATS, the standard ways: a creds file (JWT and nkey seed, or attrd's own
// user/password credential file), an nkey seed file, a user and password (the password
// from the environment or a file, never on the command line), and TLS.
type natsAuth struct {
	creds, nkey, user, password, passwordFile string
	tlsCA, tlsCert, tlsKey                    string
}

// addNATSAuthFlags defines the flags, each with its environment variable. prefix is
// "nats-" for serve (whose --creds would be ambiguous) and "" for the tools.
func addNATSAuthFlags(fs *flag.FlagSet, credsFlag, credsDefault string) *natsAuth {
	a := &natsAuth{}
	fs.StringVar(&a.creds, credsFlag, env("ATTRD_NATS_CREDS", credsDefault), "NATS credentials: a .creds file (JWT and nkey), or attrd's internal credential file (ATTRD_NATS_CREDS)")
	fs.StringVar(&a.nkey, "nats-nkey", env("ATTRD_NATS_NKEY", ""), "file holding an nkey seed to authenticate with (ATTRD_NATS_NKEY)")
	fs.StringVar(&a.user, "nats-user", env("ATTRD_NATS_USER", ""), "NATS user; its password from ATTRD_NATS_PASSWORD or --nats-password-file (ATTRD_NATS_USER)")
	fs.StringVar(&a.passwordFile, "nats-password-file", env("ATTRD_NATS_PASSWORD_FILE", ""), "file holding the NATS password (ATTRD_NATS_PASSWORD_FILE)")
	fs.StringVar(&a.tlsCA, "nats-tls-ca", env("ATTRD_NATS_TLS_CA", ""), "CA certificate(s) to verify the NATS servers with (ATTRD_NATS_TLS_CA)")
	fs.StringVar(&a.tlsCert, "nats-tls-cert", env("ATTRD_NATS_TLS_CERT", ""), "client certificate for NATS TLS (ATTRD_NATS_TLS_CERT)")
	fs.StringVar(&a.tlsKey, "nats-tls-key", env("ATTRD_NATS_TLS_KEY", ""), "client key for NATS TLS (ATTRD_NATS_TLS_KEY)")
	a.password = os.Getenv("ATTRD_NATS_PASSWORD")
	return a
}

// options turns the flags into nats.Options. A creds file that does not exist is no
// credential (the data-dir default is optional); any other problem is an error.
func (a *natsAuth) options() ([]nats.Option, error) {
	var opts []nats.Option
	if a.creds != "" {
		o, err := credsOption(a.creds)
		if err != nil {
			return nil, err
		}
		opts = append(opts, o...)
	}
	if a.nkey != "" {
		o, err := nats.NkeyOptionFromSeed(a.nkey)
		if err != nil {
			return nil, fmt.Errorf("--nats-nkey: %w", err)
		}
		opts = append(opts, o)
	}
	if a.user != "" {
		pw := a.password
		if a.passwordFile != "" {
			b, err := os.ReadFile(a.passwordFile)
			if err != nil {
				return nil, fmt.Errorf("--nats-password-file: %w", err)
			}
			pw = strings.TrimRight(string(b), "\r\n")
		}
		opts = append(opts, nats.UserInfo(a.user, pw))
	}
	if a.tlsCA != "" {
		opts = append(opts, nats.RootCAs(a.tlsCA))
	}
	if (a.tlsCert == "") != (a.tlsKey == "") {
		return nil, errors.New("--nats-tls-cert and --nats-tls-key go together")
	}
	if a.tlsCert != "" {
		opts = append(opts, nats.ClientCert(a.tlsCert, a.tlsKey))
	}
	return opts, nil
}

// credsOption reads a credential file: a NATS .creds file (JWT and seed), or attrd's
// internal credential file (lines "user NAME" and "password SECRET").
func credsOption(path string) ([]nats.Option, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("credentials: %w", err)
	}
	if bytes.Contains(b, []byte("BEGIN NATS USER JWT")) {
		return []nats.Option{nats.UserCredentials(path)}, nil
	}
	var user, pw string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, _ := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		switch k {
		case "user":
			user = strings.TrimSpace(v)
		case "password":
			pw = strings.TrimSpace(v)
		}
	}
	if user == "" || pw == "" {
		return nil, fmt.Errorf("credentials %s: neither a .creds file nor lines \"user …\" and \"password …\"", path)
	}
	return []nats.Option{nats.UserInfo(user, pw)}, nil
}

// credentialFile is where serve writes the operator tools' credential to the embedded
// server's internal account.
func credentialFile(dataDir string) string { return filepath.Join(dataDir, "internal.creds") }

// writeCredential writes the operator credential, mode 0600, atomically: a new
// password every start, so a copy that leaked stops working at the next restart.
func writeCredential(path, password string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp := path + ".tmp"
	content := fmt.Sprintf("# attrd's internal credential for the operator tools (attrd user create, history,\n"+
		"# replay). Whoever reads it reads and writes everything: keep it to attrd's operators.\nuser %s\npassword %s\n",
		embedded.OperatorUser, password)
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
