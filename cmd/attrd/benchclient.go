package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/attrd/attrd/events"
)

// benchRawBucket is the bucket of the raw KV baseline, beside attrd's in its account.
const benchRawBucket = "bench_raw"

// replicas returns the replicas of attrd's bucket, so that the raw baseline is
// replicated alike (1 on the embedded server, 3 on a cluster).
func (b *benchEnv) replicas(ctx context.Context) int {
	st, err := b.js.Stream(ctx, events.KVStream(events.DefaultBucket))
	if err != nil {
		return 1
	}
	return st.CachedInfo().Config.Replicas
}

// newExternalBenchEnv measures a running attrd as its clients see it: over TCP from
// this process. The raw baseline and the echo responder use attrd's internal account
// (the operator credential, --creds); attrd's operations go through the client
// account, as a service's would, logged in as admin.
func newExternalBenchEnv(ctx context.Context, tools toolFlags, admin, password string, keys int) (*benchEnv, error) {
	if password == "" {
		return nil, errors.New("set ATTRD_ADMIN_PASSWORD: the benchmark logs in as a super-user (--admin-user)")
	}
	b := &benchEnv{where: "a running attrd at " + *tools.url + ", measured over TCP from this process"}
	ok := false
	defer func() {
		if !ok {
			b.close()
		}
	}()
	b.dial = func(name string) (*nats.Conn, error) {
		nc, _, err := tools.connect(name)
		return nc, err
	}
	var err error
	if b.rawConn, err = b.dial("attrd-bench-raw"); err != nil {
		return nil, err
	}
	if b.cliConn, err = nats.Connect(*tools.url, nats.Name("attrd-bench-client")); err != nil {
		return nil, err
	}
	// A running attrd caps a user's attributes (10,000 by default): stay under it.
	if err := b.setup(ctx, admin, password, min(keys, 9000)); err != nil {
		return nil, err
	}
	ok = true
	return b, nil
}

// newChildBenchEnv starts `attrd serve` (this binary) as a child process on a temp dir
// and loopback ports, and measures it over TCP as newExternalBenchEnv does.
func newChildBenchEnv(ctx context.Context, keys int, dedup time.Duration) (*benchEnv, error) {
	dir, err := os.MkdirTemp("", "attrd-bench-")
	if err != nil {
		return nil, err
	}
	c, err := startChild(ctx, dir, dedup)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	url := "nats://" + c.natsAddr
	creds := credentialFile(filepath.Join(dir, "data"))
	tools := toolFlags{url: &url, auth: &natsAuth{creds: creds}}
	b, err := newExternalBenchEnv(ctx, tools, "admin", "bench", keys)
	if err != nil {
		c.stop()
		os.RemoveAll(dir)
		return nil, err
	}
	b.where = "attrd serve in a child process (embedded NATS), measured over TCP from this process"
	b.child, b.dir = c, dir
	return b, nil
}

// benchChild is an `attrd serve` started by the benchmark.
type benchChild struct {
	cmd      *exec.Cmd
	natsAddr string
	httpAddr string
	done     chan error
}

// startChild starts the child and waits until it is ready (its /readyz answers 200).
func startChild(ctx context.Context, dir string, dedup time.Duration) (*benchChild, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	natsAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	httpAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "attrd.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(exe, "serve", "--data-dir", filepath.Join(dir, "data"), "--nats-addr", natsAddr, "--http-addr", httpAddr,
		"--max-attrs-per-user", "-1", "--dedup-window", dedup.String(), "--log-level", "warn",
		"--watches-per-user", "-1", "--watches-per-instance", "-1")
	cmd.Env = append(os.Environ(), "ATTRD_ADMIN_USERNAME=admin", "ATTRD_ADMIN_PASSWORD=bench")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &benchChild{cmd: cmd, natsAddr: natsAddr, httpAddr: httpAddr, done: make(chan error, 1)}
	go func() { c.done <- cmd.Wait() }()
	// The operator tools' credential is written in the data dir at every start, before
	// readiness.
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		select {
		case err := <-c.done:
			return nil, fmt.Errorf("attrd serve ended at start (%v): see %s", err, logf.Name())
		default:
		}
		if resp, err := http.Get("http://" + httpAddr + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			c.stop()
			return nil, fmt.Errorf("attrd serve not ready within a minute: see %s", logf.Name())
		}
	}
	return c, nil
}

// stop ends the child cleanly (SIGTERM), or kills it after 10 s.
func (c *benchChild) stop() {
	_ = c.cmd.Process.Signal(os.Interrupt)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}

// freeAddr returns a loopback address with a port free at the moment.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return "127.0.0.1:" + strconv.Itoa(ln.Addr().(*net.TCPAddr).Port), nil
}
