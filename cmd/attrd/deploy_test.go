package main

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
)

// TestTheShippedClusterConfigSeparatesTheAccounts runs one node of
// deploy/nats/cluster.conf (without its routes) and attrd on it with the internal
// user: the service user reaches attrd's requests and nothing of JetStream.
func TestTheShippedClusterConfigSeparatesTheAccounts(t *testing.T) {
	t.Setenv("NODE_NAME", "nats-test")
	t.Setenv("ATTRD_NATS_PASSWORD", "internal-secret")
	t.Setenv("ATTRD_CLIENT_PASSWORD", "client-secret")
	conf, err := filepath.Abs(filepath.Join("..", "..", "deploy", "nats", "cluster.conf"))
	if err != nil {
		t.Fatal(err)
	}
	opts, err := server.ProcessConfigFile(conf)
	if err != nil {
		t.Fatalf("deploy/nats/cluster.conf: %v", err)
	}
	// One node, on loopback, with a temp store.
	opts.Host, opts.Port, opts.HTTPPort = "127.0.0.1", -1, 0
	opts.Cluster, opts.Routes, opts.StoreDir, opts.NoSigs = server.ClusterOpts{}, nil, t.TempDir(), true
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("not ready")
	}
	s := mustStart(t, func(c *Config) {
		c.NATSURL, c.Replicas = ns.ClientURL(), 1
		c.NATSOptions = []nats.Option{nats.UserInfo("attrd", "internal-secret")}
	})
	svc, err := nats.Connect(ns.ClientURL(), nats.UserInfo("svc", "client-secret"), nats.CustomInboxPrefix("_INBOX_svc"))
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	sess := mustLogin(t, client.New(svc, "CRM"), "admin", adminPassword)
	if _, err := sess.User(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(svc)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := js.KeyValue(ctx, events.DefaultBucket); err == nil {
		t.Fatal("the service user opened the projection bucket")
	}
	s.ready.check(ctxT(t))
	if ok, why := s.ready.status(); !ok {
		t.Fatalf("attrd on the shipped config is not ready: %s", why)
	}
}
