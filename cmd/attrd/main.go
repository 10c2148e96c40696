// Command attrd runs and operates the attribute service.
//
//	attrd serve                          run the service (embedded NATS by default)
//	attrd user create --username U       create a user (password from stdin)
//	attrd bench                          measure attrd against raw KV puts
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/attrd/attrd/api"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

const usage = `usage:
  attrd serve [flags]                       run the service
  attrd user create --username U [--super-user] [--nats-url URL]
                                            create a user; the password is read from stdin
  attrd history --user U [--attr NAME | --session ID] [--since T] [--until T] [--types T,…] [--json] [--decrypt]
  attrd history --user U --at T [--session ID]
                                            a user's events with their decisions, or the
                                            attributes as they were at time T
  attrd replay --into PREFIX | --verify [--nats-url URL]
                                            rebuild the projection from the log into fresh
                                            buckets, or compare a rebuild with the live one
  attrd user export --user U                everything attrd holds of a user, as JSON
  attrd keys rotate --encryption-key-file F re-wrap every user's data key with F's first key
  attrd import --from sqlite:PATH|postgres://… [--zato-secret-key-file F] [--dry-run]
                                            bring a Zato SSO database's users and attributes in
  attrd probe URL                           exit 0 if URL answers 200 (container health checks)
  attrd status [--json]                     is the deployment healthy, and why (exit 1 if not)
  attrd bench [--duration D] [--conc 1,16,64,256]
                                            raw KV puts vs attrd updates, in one process
Run "attrd <command> -h" for a command's flags.
`

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr *os.File) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "serve":
		err = serve(ctx, args[1:], stderr)
	case "user":
		err = userCmd(ctx, args[1:], stdin, stdout, stderr)
	case "bench":
		err = bench(ctx, args[1:], stdout)
	case "replay":
		err = replayCmd(ctx, args[1:], stdout, stderr)
	case "history":
		err = historyCmd(ctx, args[1:], stdout, stderr)
	case "keys":
		err = keysCmd(ctx, args[1:], stdout, stderr)
	case "import":
		err = importCmd(ctx, args[1:], stdout, stderr)
	case "probe":
		err = probeCmd(ctx, args[1:], stdout)
	case "status":
		err = statusCmd(ctx, args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "attrd: unknown command %q\n%s", args[0], usage)
		return 2
	}
	if err == flag.ErrHelp {
		return 0
	}
	if errors.Is(err, errDifferences) {
		return 1
	}
	if err != nil {
		fmt.Fprintf(stderr, "attrd: %v\n", err)
		return 1
	}
	return 0
}

// list splits a comma-separated flag value.
func list(v string) []string {
	var out []string
	for _, a := range strings.Split(v, ",") {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	return out
}

// env returns the environment variable's value, or def.
func env(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

func envInt(name string, def int64) int64 {
	if v, ok := os.LookupEnv(name); ok {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			return n
		}
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, ok := os.LookupEnv(name); ok {
		if d, err := time.ParseDuration(v); err == nil {
			return d
		}
	}
	return def
}

func serve(ctx context.Context, args []string, stderr *os.File) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var cfg Config
	var apps, origins, proxies, clientUsers string
	fs.StringVar(&cfg.DataDir, "data-dir", env("ATTRD_DATA_DIR", "./attrd-data"), "data directory of the embedded NATS server and the generated key (ATTRD_DATA_DIR)")
	fs.StringVar(&cfg.HTTPAddr, "http-addr", env("ATTRD_HTTP_ADDR", "127.0.0.1:17010"), "HTTP listen address (ATTRD_HTTP_ADDR)")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", env("ATTRD_METRICS_ADDR", ""), "serve /metrics on this address instead of the HTTP port's (ATTRD_METRICS_ADDR)")
	fs.StringVar(&cfg.NATSAddr, "nats-addr", env("ATTRD_NATS_ADDR", "127.0.0.1:4222"), "embedded NATS server's client address (ATTRD_NATS_ADDR)")
	fs.StringVar(&cfg.NATSURL, "nats-url", env("ATTRD_NATS_URL", ""), "use this NATS server instead of the embedded one (ATTRD_NATS_URL)")
	fs.IntVar(&cfg.Partitions, "partitions", int(envInt("ATTRD_PARTITIONS", 0)), "partitions of the event log, each folded by one instance at a time; chosen when the deployment is created and kept (0: the default for a new one, whatever an existing one has) (ATTRD_PARTITIONS)")
	fs.IntVar(&cfg.Replicas, "replicas", int(envInt("ATTRD_REPLICAS", 3)), "replicas of the stream and bucket on --nats-url (ATTRD_REPLICAS)")
	fs.StringVar(&apps, "apps", env("ATTRD_APPS", "CRM"), "comma-separated applications accepted as current_app (ATTRD_APPS)")
	fs.StringVar(&origins, "cors-origins", env("ATTRD_CORS_ORIGINS", ""), "comma-separated origins browsers may call from; * for any, without credentials (ATTRD_CORS_ORIGINS)")
	fs.DurationVar(&cfg.SessionTTL, "session-ttl", envDuration("ATTRD_SESSION_TTL", 60*time.Minute), "session lifetime (ATTRD_SESSION_TTL)")
	fs.DurationVar(&cfg.SessionMaxLifetime, "session-max-lifetime", envDuration("ATTRD_SESSION_MAX_LIFETIME", 24*time.Hour), "a session ends this long after its login, however often renewed (ATTRD_SESSION_MAX_LIFETIME)")
	fs.IntVar(&cfg.PasswordConcurrency, "password-concurrency", int(envInt("ATTRD_PASSWORD_CONCURRENCY", int64(api.DefaultPasswordConcurrency))), "password hashes computed at once; more wait briefly, then get E008004 (ATTRD_PASSWORD_CONCURRENCY)")
	fs.IntVar(&cfg.Watch.PerUser, "watches-per-user", int(envInt("ATTRD_WATCHES_PER_USER", api.DefaultWatchesPerUser)), "watches one user may have open on an instance; -1: no bound (ATTRD_WATCHES_PER_USER)")
	fs.IntVar(&cfg.Watch.PerInstance, "watches-per-instance", int(envInt("ATTRD_WATCHES_PER_INSTANCE", api.DefaultWatchesPerInstance)), "watches open on an instance at most; -1: no bound (ATTRD_WATCHES_PER_INSTANCE)")
	fs.IntVar(&cfg.Watch.Buffer, "watch-buffer", int(envInt("ATTRD_WATCH_BUFFER", api.DefaultWatchBuffer)), "changes that may wait for one watch's client before it is cut off as too slow (ATTRD_WATCH_BUFFER)")
	fs.IntVar(&cfg.LoginsPerAddress, "logins-per-address", int(envInt("ATTRD_LOGINS_PER_ADDRESS", api.DefaultLoginsPerAddress)), "password checks in flight from one remote address; more are refused as failed logins (ATTRD_LOGINS_PER_ADDRESS)")
	fs.StringVar(&proxies, "trusted-proxies", env("ATTRD_TRUSTED_PROXIES", ""), "comma-separated CIDRs of reverse proxies whose X-Forwarded-For is believed (ATTRD_TRUSTED_PROXIES)")
	fs.StringVar(&cfg.KeyFile, "encryption-key-file", env("ATTRD_ENCRYPTION_KEY_FILE", ""), "encryption key file (ATTRD_ENCRYPTION_KEY_FILE)")
	fs.DurationVar(&cfg.DedupWindow, "dedup-window", envDuration("ATTRD_DEDUP_WINDOW", 2*time.Minute), "how long a request id is remembered (ATTRD_DEDUP_WINDOW)")
	fs.DurationVar(&cfg.DecisionTimeout, "decision-timeout", envDuration("ATTRD_DECISION_TIMEOUT", 5*time.Second), "wait for a write's decision before answering E008004 (ATTRD_DECISION_TIMEOUT)")
	fs.DurationVar(&cfg.HistoryMaxAge, "history-max-age", envDuration("ATTRD_HISTORY_MAX_AGE", 0), "drop events older than this from the log; 0 keeps all (ATTRD_HISTORY_MAX_AGE)")
	fs.Int64Var(&cfg.HistoryMaxBytes, "history-max-bytes", envInt("ATTRD_HISTORY_MAX_BYTES", 0), "drop the oldest events beyond this size; 0 is no limit (ATTRD_HISTORY_MAX_BYTES)")
	fs.IntVar(&cfg.Limits.MaxValueBytes, "max-value-bytes", int(envInt("ATTRD_MAX_VALUE_BYTES", 64<<10)), "largest value, as encoded JSON (ATTRD_MAX_VALUE_BYTES)")
	fs.IntVar(&cfg.Limits.MaxItems, "max-items", int(envInt("ATTRD_MAX_ITEMS", 1000)), "most items in one request (ATTRD_MAX_ITEMS)")
	fs.IntVar(&cfg.Limits.MaxBodyBytes, "max-body-bytes", int(envInt("ATTRD_MAX_BODY_BYTES", 1<<20)), "largest request body (ATTRD_MAX_BODY_BYTES)")
	fs.IntVar(&cfg.Limits.MaxDepth, "max-depth", int(envInt("ATTRD_MAX_DEPTH", api.DefaultMaxDepth)), "deepest nesting of a value (ATTRD_MAX_DEPTH)")
	fs.IntVar(&cfg.Limits.MaxAttrsPerUser, "max-attrs-per-user", int(envInt("ATTRD_MAX_ATTRS_PER_USER", api.DefaultMaxAttrsPerUser)), "live attributes one user may hold; -1: no cap (ATTRD_MAX_ATTRS_PER_USER)")
	fs.IntVar(&cfg.Limits.MaxAttrsPerSession, "max-attrs-per-session", int(envInt("ATTRD_MAX_ATTRS_PER_SESSION", api.DefaultMaxAttrsPerSession)), "live attributes one session may hold; -1: no cap (ATTRD_MAX_ATTRS_PER_SESSION)")
	fs.IntVar(&cfg.Limits.MaxSessionsPerUser, "max-sessions-per-user", int(envInt("ATTRD_MAX_SESSIONS_PER_USER", api.DefaultMaxSessionsPerUser)), "live sessions one user may hold; -1: no cap (ATTRD_MAX_SESSIONS_PER_USER)")
	fs.IntVar(&cfg.Limits.MaxReplyBytes, "max-reply-bytes", int(envInt("ATTRD_MAX_REPLY_BYTES", api.DefaultMaxReplyBytes)), "largest reply; bigger listings are paged or refused (ATTRD_MAX_REPLY_BYTES)")
	fs.DurationVar(&cfg.HistoryTimeout, "history-timeout", envDuration("ATTRD_HISTORY_TIMEOUT", 30*time.Second), "longest a history request may read the log (ATTRD_HISTORY_TIMEOUT)")
	fs.StringVar(&clientUsers, "client-users", env("ATTRD_CLIENT_USERS", ""), "JSON file of the services' NATS users on the embedded server ([{\"name\":…,\"password\"|\"nkey\":…}]); required when --nats-addr is not on loopback (ATTRD_CLIENT_USERS)")
	fs.StringVar(&cfg.TLSCert, "tls-cert", env("ATTRD_TLS_CERT", ""), "serve HTTPS with this certificate (ATTRD_TLS_CERT)")
	fs.StringVar(&cfg.TLSKey, "tls-key", env("ATTRD_TLS_KEY", ""), "the key of --tls-cert (ATTRD_TLS_KEY)")
	natsAuth := addNATSAuthFlags(fs, "nats-creds", "")
	fs.DurationVar(&cfg.NATSConnectTimeout, "nats-connect-timeout", envDuration("ATTRD_NATS_CONNECT_TIMEOUT", 3*time.Minute), "how long to wait for --nats-url and its JetStream at start (ATTRD_NATS_CONNECT_TIMEOUT)")
	level := fs.String("log-level", env("ATTRD_LOG_LEVEL", "info"), "debug, info, warn or error (ATTRD_LOG_LEVEL)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg.Apps, cfg.CORSOrigins = list(apps), list(origins)
	_, replicasFromEnv := os.LookupEnv("ATTRD_REPLICAS")
	cfg.ChangeReplicas = replicasFromEnv
	fs.Visit(func(f *flag.Flag) { cfg.ChangeReplicas = cfg.ChangeReplicas || f.Name == "replicas" })
	if clientUsers != "" {
		b, err := os.ReadFile(clientUsers)
		if err != nil {
			return fmt.Errorf("--client-users: %w", err)
		}
		if err := json.Unmarshal(b, &cfg.ClientUsers); err != nil {
			return fmt.Errorf("--client-users %s: %w", clientUsers, err)
		}
	}
	var err error
	if cfg.NATSOptions, err = natsAuth.options(); err != nil {
		return err
	}
	for _, p := range list(proxies) {
		pfx, err := netip.ParsePrefix(p)
		if err != nil {
			if a, aerr := netip.ParseAddr(p); aerr == nil {
				pfx, err = a.Prefix(a.BitLen())
			}
		}
		if err != nil {
			return fmt.Errorf("--trusted-proxies: %q is not a CIDR or an address", p)
		}
		cfg.TrustedProxies = append(cfg.TrustedProxies, pfx)
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	cfg.AdminUsername = os.Getenv("ATTRD_ADMIN_USERNAME")
	cfg.AdminPassword = os.Getenv("ATTRD_ADMIN_PASSWORD")
	cfg.Stderr = stderr
	stopTracing, err := setupTracing(ctx)
	if err != nil {
		return fmt.Errorf("tracing: %w", err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = stopTracing(sctx) // flush the spans of the last requests
	}()
	srv, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	<-ctx.Done()
	cfg.Logger.Info("stopping: draining requests")
	return srv.Close()
}
