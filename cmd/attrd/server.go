package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/api/natsapi"
	"github.com/attrd/attrd/api/rest"
	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
	"github.com/attrd/attrd/projector"
)

// Config is everything `attrd serve` is configured with.
type Config struct {
	DataDir     string
	HTTPAddr    string
	NATSAddr    string // embedded server's client listener
	NATSURL     string // an existing NATS server instead of the embedded one
	Replicas    int    // of the stream and the bucket on NATSURL (default 3)
	Apps        []string
	CORSOrigins []string
	SessionTTL  time.Duration
	// SessionMaxLifetime caps a session however often it is renewed (default 24h).
	SessionMaxLifetime time.Duration
	// TrustedProxies may name the client in X-Forwarded-For.
	TrustedProxies []netip.Prefix
	// PasswordConcurrency bounds password hashes at once (default: half the cores).
	PasswordConcurrency int
	// LoginsPerAddress bounds the password checks in flight from one address
	// (default api.DefaultLoginsPerAddress).
	LoginsPerAddress int
	// Watch bounds watches (api.WatchConfig; zero values: its defaults).
	Watch api.WatchConfig
	// HistoryTimeout bounds one history request's read of the log (default 30s).
	HistoryTimeout  time.Duration
	KeyFile         string
	AdminUsername   string
	AdminPassword   string
	DedupWindow     time.Duration
	HistoryMaxAge   time.Duration // 0: keep every event
	HistoryMaxBytes int64         // 0: no limit
	DecisionTimeout time.Duration
	Password        api.PasswordParams
	Logger          *slog.Logger
	// OnDecision sees every decision of the live projector (tests).
	OnDecision func(events.Decision)
	// ProjectorHooks let tests slow down or stop the projector between steps.
	ProjectorHooks projector.Hooks
	// Limits bound values, items and bodies (zero: the contract's defaults).
	Limits api.Limits
	// MetricsAddr, if set, serves /metrics on its own listener (host:port) instead of
	// the HTTP port's.
	MetricsAddr string
	// NoMetrics turns the metrics off (benchmarks measure what they cost).
	NoMetrics bool
	// NATSConnectTimeout is how long Start waits for an external NATS and its
	// JetStream (default 3m).
	NATSConnectTimeout time.Duration
	// ChangeReplicas lets Start change the replicas of an existing stream (--replicas
	// given explicitly); otherwise a mismatch is refused.
	ChangeReplicas bool
	// Partitions is the number of partitions of a new deployment (0: the default); an
	// existing deployment keeps its own, and another number is refused.
	Partitions int
	// LeaseTTL bounds how long a dead instance keeps the projector (default
	// projector.DefaultLeaseTTL, 2 s).
	LeaseTTL time.Duration
	// HTTPReadHeaderTimeout bounds how long a client may take to send its headers
	// (default 5s).
	HTTPReadHeaderTimeout time.Duration
	// Stderr receives the one-time admin password notice.
	Stderr *os.File
	// ClientUsers are the services' NATS users on the embedded server; without them
	// clients connect without credentials, which only a loopback listener allows.
	ClientUsers []embedded.ClientUser
	// NATSOptions authenticate to an external NATS (--nats-url): creds, nkey,
	// user/password, TLS.
	NATSOptions []nats.Option
	// TLSCert and TLSKey serve HTTPS instead of HTTP.
	TLSCert, TLSKey string
}

// Server is a running attrd: NATS (embedded or not), the projector, the NATS request
// API and the HTTP server.
type Server struct {
	cfg     Config
	log     *slog.Logger
	ns      *server.Server
	apiConn *nats.Conn
	prjConn *nats.Conn
	// histConn reads the log for history requests, so that a large read never queues
	// other requests' traffic behind it on the API's connection.
	histConn *nats.Conn
	parts    *projector.Partitions // the partitions this instance folds
	svc      *api.Service
	natsAPI  *natsapi.Server
	httpSrv  *http.Server
	httpLn   net.Listener

	// metrics is this instance's Prometheus registry, served at /metrics (on the HTTP
	// port, or on its own listener with Config.MetricsAddr).
	metrics    *prometheus.Registry
	metricsSrv *http.Server
	metricsLn  net.Listener

	ready     *readiness
	instance  string // this process's name in logs and in the projector lease
	prjCancel context.CancelFunc
	prjDone   chan struct{}
	// natsOpts connect to NATS as attrd itself: the internal account's in-process user
	// on the embedded server, the configured credentials on an external one.
	natsOpts  []nats.Option
	closeOnce sync.Once
	// conns are every connection this instance opened as itself (tests cut them all to
	// play a kill -9).
	connsMu sync.Mutex
	conns   []*nats.Conn
}

// ClientURL is the NATS URL clients use.
func (s *Server) ClientURL() string {
	if s.ns != nil {
		return s.ns.ClientURL()
	}
	return s.cfg.NATSURL
}

// InternalConn connects to NATS as attrd itself (the internal account).
func (s *Server) InternalConn(name string, extra ...nats.Option) (*nats.Conn, error) {
	url := s.cfg.NATSURL
	if s.ns != nil {
		url = s.ns.ClientURL()
	}
	opts := append([]nats.Option{nats.Name(name), nats.MaxReconnects(-1)}, s.natsOpts...)
	return nats.Connect(url, append(opts, extra...)...)
}

// ensureStore creates or checks the stream and buckets, waiting for NATS and JetStream
// to answer (a log line per attempt) for up to the connect timeout. A refusal that
// waiting cannot cure (a replicas mismatch) ends it at once.
func (s *Server) ensureStore(ctx context.Context, js jetstream.JetStream, store events.StoreConfig) error {
	wait := s.cfg.NATSConnectTimeout
	if wait <= 0 {
		wait = 3 * time.Minute
	}
	deadline := time.Now().Add(wait)
	pause := 250 * time.Millisecond
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, _, err := events.EnsureStore(actx, js, store)
		cancel()
		if err == nil || errors.Is(err, events.ErrReplicasMismatch) || errors.Is(err, events.ErrPartitionsMismatch) {
			return err
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			return fmt.Errorf("NATS did not get ready within %s: %w", wait, err)
		}
		s.log.Warn("waiting for NATS and JetStream", "attempt", attempt, "err", err, "retry_in", pause)
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			return ctx.Err()
		}
		pause = min(2*pause, 5*time.Second)
	}
}

// HTTPAddr is the HTTP listener's address.
func (s *Server) HTTPAddr() string { return s.httpLn.Addr().String() }

// Service returns the API service.
func (s *Server) Service() *api.Service { return s.svc }

// Projector returns the projector of partition 0 when this instance runs it (nil
// otherwise): on a deployment of one partition, the projector.
func (s *Server) Projector() *projector.Projector { return s.Projectors()[0] }

// Projectors returns the projectors this instance runs, by partition.
func (s *Server) Projectors() map[int]*projector.Projector {
	if s.parts == nil {
		return nil
	}
	return s.parts.Running()
}

// Start runs attrd until Close.
func Start(ctx context.Context, cfg Config) (srv *Server, err error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Server{cfg: cfg, log: log, prjDone: make(chan struct{})}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	url := cfg.NATSURL
	replicas := cfg.Replicas
	if replicas <= 0 {
		replicas = 3
	}
	s.natsOpts = cfg.NATSOptions
	if url == "" {
		replicas = 1
		if len(cfg.ClientUsers) == 0 && cfg.NATSAddr != "" && !embedded.IsLoopback(cfg.NATSAddr) {
			return nil, fmt.Errorf("the NATS client listener %s is not on loopback: give services their own users with --client-users", cfg.NATSAddr)
		}
		accts := &embedded.Accounts{InternalPassword: embedded.NewSecret(), OperatorPassword: embedded.NewSecret(), ClientUsers: cfg.ClientUsers}
		if s.ns, err = embedded.Start(embedded.Options{DataDir: filepath.Join(cfg.DataDir, "nats"), Addr: cfg.NATSAddr, Logger: log, Accounts: accts}); err != nil {
			return nil, err
		}
		url = s.ns.ClientURL()
		// attrd's own connections: in-process, as the internal account's user whose
		// password lives only in this process. The operator tools get a credential
		// of their own in the data dir.
		s.natsOpts = []nats.Option{nats.InProcessServer(s.ns), nats.UserInfo(embedded.InternalUser, accts.InternalPassword)}
		if err := writeCredential(credentialFile(cfg.DataDir), accts.OperatorPassword); err != nil {
			return nil, fmt.Errorf("write the operator credential: %w", err)
		}
	}
	keys, err := keyring(cfg, log)
	if err != nil {
		return nil, err
	}
	// An external NATS may not be up yet (attrd started first, a rolling restart): the
	// connections retry in the background, and ensureStore waits for JetStream.
	connect := func(name string) (*nats.Conn, error) {
		nc, err := s.InternalConn(name, nats.RetryOnFailedConnect(true))
		if err == nil {
			s.connsMu.Lock()
			s.conns = append(s.conns, nc)
			s.connsMu.Unlock()
		}
		return nc, err
	}
	// The projector and the API have a connection each, so neither waits behind the
	// other's traffic in one socket.
	if s.prjConn, err = connect("attrd-projector"); err != nil {
		return nil, fmt.Errorf("connect to NATS at %s: %w", url, err)
	}
	if s.apiConn, err = connect("attrd-api"); err != nil {
		return nil, fmt.Errorf("connect to NATS at %s: %w", url, err)
	}
	if s.histConn, err = connect("attrd-history"); err != nil {
		return nil, fmt.Errorf("connect to NATS at %s: %w", url, err)
	}
	js, err := jetstream.New(s.prjConn)
	if err != nil {
		return nil, err
	}
	store := events.DefaultStoreConfig()
	store.Replicas = replicas
	if cfg.DedupWindow > 0 {
		store.DedupWindow = cfg.DedupWindow
	}
	store.MaxAge, store.MaxBytes = cfg.HistoryMaxAge, cfg.HistoryMaxBytes
	store.ChangeReplicas = cfg.ChangeReplicas
	store.Partitions = cfg.Partitions
	if err := s.ensureStore(ctx, js, store); err != nil {
		return nil, err
	}
	var reg prometheus.Registerer // nil: no metrics
	var pm *projector.Metrics
	if !cfg.NoMetrics {
		s.metrics = newRegistry(js, store.Bucket)
		reg, pm = s.metrics, projector.NewMetrics(s.metrics)
	}
	pcfg := projector.Config{Bucket: store.Bucket, Opener: opener(keys), Replies: true,
		Logger: log, Hooks: cfg.ProjectorHooks, OnDecision: cfg.OnDecision, Metrics: pm}
	if keys != nil {
		// One set of data keys for the projector and the API, following the keys
		// destroyed on other instances (a deletion elsewhere).
		if pcfg.DataKeys, err = events.OpenDataKeys(ctx, js, keys); err != nil {
			return nil, fmt.Errorf("data keys: %w", err)
		}
	}
	pctx, cancel := context.WithCancel(context.Background())
	s.prjCancel = cancel
	if pcfg.DataKeys != nil {
		if err := pcfg.DataKeys.Follow(pctx); err != nil {
			return nil, err
		}
	}
	s.instance = instanceName()
	if s.parts, err = projector.NewPartitions(ctx, s.prjConn, projector.PartitionsConfig{Projector: pcfg, Instance: s.instance,
		LeaseTTL: cfg.LeaseTTL, Dial: connect, Logger: log}); err != nil {
		return nil, err
	}
	go func() {
		defer close(s.prjDone)
		_ = s.parts.Run(pctx)
	}()
	// Wait for this instance's projectors when it takes the leases at once; when other
	// instances hold them, serve anyway: they decide the writes.
	sctx, scancel := context.WithTimeout(ctx, projector.DefaultLeaseTTL+time.Second)
	err = s.parts.Started(sctx)
	scancel()
	switch {
	case err == nil:
	case errors.Is(err, context.DeadlineExceeded):
		log.Info("other instances fold the log; this one serves requests and stands by", "instance", s.instance)
	default:
		return nil, fmt.Errorf("projector: %w", err)
	}

	apiJS, err := jetstream.New(s.apiConn)
	if err != nil {
		return nil, err
	}
	histJS, err := jetstream.New(s.histConn)
	if err != nil {
		return nil, err
	}
	histLog, err := newLog(ctx, histJS, keys)
	if err != nil {
		return nil, err
	}
	if s.svc, err = api.New(ctx, s.apiConn, api.Config{Bucket: store.Bucket, Apps: cfg.Apps, SessionTTL: cfg.SessionTTL,
		SessionMaxLifetime: cfg.SessionMaxLifetime, PasswordConcurrency: cfg.PasswordConcurrency, LoginsPerAddress: cfg.LoginsPerAddress, HistoryTimeout: cfg.HistoryTimeout,
		DecisionTimeout: cfg.DecisionTimeout, Keyring: keys, DataKeys: pcfg.DataKeys, Password: cfg.Password, Logger: log, Limits: cfg.Limits,
		History: histLog, Local: s.parts, Metrics: reg, Watch: cfg.Watch}); err != nil {
		return nil, err
	}
	ready := func() (bool, string) {
		if s.ready == nil {
			return false, "starting"
		}
		return s.ready.status()
	}
	if s.natsAPI, err = natsapi.StartWith(s.apiConn, s.svc, log, natsapi.Instance{Name: s.instance, Ready: ready}); err != nil {
		return nil, err
	}
	if err := s.bootstrap(ctx, log); err != nil {
		return nil, err
	}
	kvStream, err := apiJS.Stream(ctx, events.KVStream(store.Bucket))
	if err != nil {
		return nil, err
	}
	s.ready = newReadiness(apiJS, s.parts.Layout(), func(ctx context.Context, p int) (uint64, bool, error) {
		r, held, err := projector.Holder(ctx, kvStream, store.Bucket, events.PartitionName(p))
		return r.Applied, held, err
	}, s.apiConn, s.prjConn)
	s.ready.check(ctx)
	go s.ready.run(pctx)
	if s.httpLn, err = net.Listen("tcp", cfg.HTTPAddr); err != nil {
		return nil, fmt.Errorf("http listen: %w", err)
	}
	if err := s.serveMetrics(); err != nil {
		return nil, err
	}
	rht := cfg.HTTPReadHeaderTimeout
	if rht <= 0 {
		rht = 5 * time.Second
	}
	// Timeouts so that slow clients cannot hold connections: headers within rht, the
	// whole request within 30s, idle keep-alives 2 minutes.
	s.httpSrv = &http.Server{Handler: s.routes(), ReadHeaderTimeout: rht, ReadTimeout: 30 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10}
	serve := func() error { return s.httpSrv.Serve(s.httpLn) }
	if cfg.TLSCert != "" || cfg.TLSKey != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		s.httpSrv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		serve = func() error { return s.httpSrv.ServeTLS(s.httpLn, "", "") }
	}
	go func() {
		if err := serve(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http server stopped", "err", err)
		}
	}()
	log.Info("attrd serving", "nats", url, "http", s.HTTPAddr(), "apps", strings.Join(s.svc.Config().Apps, ","))
	return s, nil
}

// instanceName names this attrd process in logs and in the lease.
func instanceName() string {
	host, _ := os.Hostname()
	return host + "-" + strings.ToLower(events.NewID()[16:])
}

// keyring loads the encryption key file. On the embedded default with no key file
// given, it generates one in the data dir (mode 0600) and says so.
func keyring(cfg Config, log *slog.Logger) (*sealed.Keyring, error) {
	path := cfg.KeyFile
	if path == "" {
		if cfg.NATSURL != "" {
			log.Warn("no --encryption-key-file: encrypt:true will be refused")
			return nil, nil
		}
		path = filepath.Join(cfg.DataDir, "encryption.key")
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			if err := sealed.GenerateKeyFile(path); err != nil {
				return nil, fmt.Errorf("generate key file: %w", err)
			}
			log.Warn("generated an encryption key in the data dir; back it up, and keep it apart from the data in production (--encryption-key-file)", "path", path)
		}
	}
	return sealed.LoadKeyFile(path)
}

// bootstrap creates the first super-user when there are no users.
func (s *Server) bootstrap(ctx context.Context, log *slog.Logger) error {
	user, pw := s.cfg.AdminUsername, s.cfg.AdminPassword
	if user == "" {
		user = "admin"
	}
	created, pw, err := s.svc.EnsureAdmin(ctx, user, pw)
	if err != nil {
		return fmt.Errorf("create the first super-user: %w", err)
	}
	if created {
		log.Info("created the first super-user", "username", user)
		if s.cfg.AdminPassword == "" && s.cfg.Stderr != nil {
			fmt.Fprintf(s.cfg.Stderr, "\n  attrd: first start: super-user %q, password %s\n  (shown once; set ATTRD_ADMIN_USERNAME/ATTRD_ADMIN_PASSWORD to choose)\n\n", user, pw)
		}
	}
	return nil
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", rest.Handler(s.svc, rest.Config{CORSOrigins: s.cfg.CORSOrigins, Logger: s.log, TrustedProxies: s.cfg.TrustedProxies}))
	mux.HandleFunc("GET /livez", serveLive)
	mux.HandleFunc("GET /readyz", s.ready.serveReady)
	mux.HandleFunc("GET /healthz", s.ready.serveReady) // the older name of /readyz
	if s.cfg.MetricsAddr == "" && s.metrics != nil {
		mux.Handle("GET /metrics", metricsHandler(s.metrics))
	}
	return mux
}

// serveMetrics serves /metrics on its own listener when Config.MetricsAddr names one.
func (s *Server) serveMetrics() error {
	if s.cfg.MetricsAddr == "" || s.metrics == nil {
		return nil
	}
	ln, err := net.Listen("tcp", s.cfg.MetricsAddr)
	if err != nil {
		return fmt.Errorf("metrics listen: %w", err)
	}
	s.metricsLn = ln
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", metricsHandler(s.metrics))
	s.metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 30 * time.Second}
	go func() { _ = s.metricsSrv.Serve(ln) }()
	return nil
}

// MetricsAddr is the address /metrics is served on (the HTTP listener's unless
// Config.MetricsAddr names another).
func (s *Server) MetricsAddr() string {
	if s.metricsLn != nil {
		return s.metricsLn.Addr().String()
	}
	return s.httpLn.Addr().String()
}

// Close drains and stops everything: no new requests, requests in flight get their
// answers, then the projector stops between batches, then NATS.
func (s *Server) Close() error {
	var errs []error
	s.closeOnce.Do(func() {
		if s.svc != nil {
			s.svc.EndWatches() // before the HTTP server waits for its streams to end
		}
		if s.httpSrv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			errs = append(errs, s.httpSrv.Shutdown(ctx))
			cancel()
		}
		if s.metricsSrv != nil {
			errs = append(errs, s.metricsSrv.Close())
		}
		if s.natsAPI != nil {
			errs = append(errs, s.natsAPI.Stop())
		}
		if s.svc != nil {
			errs = append(errs, s.svc.Close())
		}
		if s.prjCancel != nil {
			s.prjCancel()
			<-s.prjDone
		}
		for _, nc := range []*nats.Conn{s.apiConn, s.prjConn, s.histConn} {
			if nc != nil {
				nc.Close()
			}
		}
		if s.ns != nil {
			s.ns.Shutdown()
			s.ns.WaitForShutdown()
		}
	})
	return errors.Join(errs...)
}
