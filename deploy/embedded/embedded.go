// Package embedded runs the nats-server that attrd's default deployment embeds: one
// server with JetStream on a local data dir. The service, its tests and its benchmark
// all use it, so they run on the same configuration.
package embedded

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Options configure the embedded server.
type Options struct {
	// DataDir holds the JetStream store (DataDir/jetstream).
	DataDir string
	// Addr is the client listener, host:port; port 0 or -1 picks a free one.
	Addr string
	// Logger receives the server's warnings and errors; nil discards them.
	Logger *slog.Logger
	// MaxPayload is the largest message (default 8 MiB: large batches make large
	// intent records).
	MaxPayload int32
	// Name is the server's name (default attrd-embedded); cluster nodes need their own.
	Name string
	// Cluster, if set, makes the server a node of a NATS cluster (tests of several
	// nodes in one process).
	Cluster *Cluster
	// Accounts, if set, separates an internal account (JetStream, attrd) from the
	// client account (the request subjects only). nil: one global account, for tests
	// of the projector alone.
	Accounts *Accounts
	// NoJetStream starts a plain NATS server: for tests whose own responders play the
	// JetStream servers (DataDir is then unused).
	NoJetStream bool
}

// Cluster is a node's cluster configuration.
type Cluster struct {
	Name   string   // the cluster's name
	Addr   string   // this node's route listener, host:port
	Routes []string // every node's route URL (nats-route://host:port), this one's included
}

// Start starts a server and waits until it accepts connections. A JetStream that
// fails to start is an error here, not a silent hang: the server's Fatalf reaches our
// logger, and ReadyForConnections is checked.
func Start(o Options) (*server.Server, error) {
	host, port := "127.0.0.1", -1
	if o.Addr != "" {
		h, n, err := hostPort("nats addr", o.Addr)
		if err != nil {
			return nil, err
		}
		host, port = h, n
		if port == 0 {
			port = -1
		}
	}
	name := o.Name
	if name == "" {
		name = "attrd-embedded"
	}
	opts := &server.Options{
		ServerName: name,
		Host:       host,
		Port:       port,
		JetStream:  !o.NoJetStream,
		StoreDir:   filepath.Join(o.DataDir),
		NoSigs:     true,
		MaxPayload: o.MaxPayload,
	}
	if opts.MaxPayload == 0 {
		opts.MaxPayload = 8 << 20
	}
	if c := o.Cluster; c != nil {
		h, port, err := hostPort("cluster addr", c.Addr)
		if err != nil {
			return nil, err
		}
		opts.Cluster = server.ClusterOpts{Name: c.Name, Host: h, Port: port}
		opts.Routes = server.RoutesFromStr(strings.Join(c.Routes, ","))
	}
	if o.Accounts != nil {
		if err := o.Accounts.configure(opts); err != nil {
			return nil, fmt.Errorf("embedded nats accounts: %w", err)
		}
		moved, err := migrateGlobalStore(opts.StoreDir)
		if err != nil {
			return nil, fmt.Errorf("embedded nats: move the store to the internal account: %w", err)
		}
		if moved && o.Logger != nil {
			o.Logger.Warn("moved the JetStream store of the global account to the internal account", "account", InternalAccount)
		}
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	fatal := make(chan string, 1)
	ns.SetLoggerV2(&logAdapter{log: o.Logger, fatal: fatal}, false, false, false)
	ns.Start()
	if !ns.ReadyForConnections(30 * time.Second) {
		ns.Shutdown()
		select {
		case msg := <-fatal:
			return nil, fmt.Errorf("embedded nats: %s", msg)
		default:
			return nil, errors.New("embedded nats: not ready after 30s")
		}
	}
	if o.Accounts != nil {
		if err := enableJetStream(ns); err != nil {
			ns.Shutdown()
			return nil, fmt.Errorf("embedded nats: JetStream for the internal account: %w", err)
		}
	}
	return ns, nil
}

// logAdapter routes the server's log into slog, and records a fatal error instead of
// exiting the process.
type logAdapter struct {
	log   *slog.Logger
	fatal chan string
}

func (l *logAdapter) Noticef(format string, v ...any) {}
func (l *logAdapter) Debugf(format string, v ...any)  {}
func (l *logAdapter) Tracef(format string, v ...any)  {}
func (l *logAdapter) Warnf(format string, v ...any) {
	if l.log != nil {
		l.log.Warn("nats-server: " + fmt.Sprintf(format, v...))
	}
}
func (l *logAdapter) Errorf(format string, v ...any) {
	if l.log != nil {
		l.log.Error("nats-server: " + fmt.Sprintf(format, v...))
	}
}
func (l *logAdapter) Fatalf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	if l.log != nil {
		l.log.Error("nats-server fatal: " + msg)
	}
	select {
	case l.fatal <- msg:
	default:
	}
}

// hostPort splits a listen address into its host and port.
func hostPort(what, addr string) (string, int, error) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("%s %q: %w", what, addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		return "", 0, fmt.Errorf("%s %q: bad port", what, addr)
	}
	return h, n, nil
}
