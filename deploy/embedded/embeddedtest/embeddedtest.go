// Package embeddedtest starts embedded NATS servers for tests, as httptest does HTTP
// servers: on loopback, stopped and disconnected when the test ends.
package embeddedtest

import (
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/attrd/attrd/deploy/embedded"
)

// Start starts an embedded server with o (its DataDir a fresh temporary directory
// unless set) and connects to it.
func Start(t testing.TB, o embedded.Options) (*server.Server, *nats.Conn) {
	t.Helper()
	if o.DataDir == "" && !o.NoJetStream {
		o.DataDir = t.TempDir()
	}
	ns, err := embedded.Start(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return ns, nc
}
