package projector_test

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// startCluster starts three embedded nodes (n1, n2, n3) of one NATS cluster on
// loopback, with the event stream and bucket replicated on all three, and returns a
// connection to each node.
func startCluster(t *testing.T) []*nats.Conn {
	t.Helper()
	port := func() int {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().(*net.TCPAddr).Port
	}
	var routes []string
	routePorts := make([]int, 3)
	for i := range routePorts {
		routePorts[i] = port()
		routes = append(routes, "nats-route://127.0.0.1:"+strconv.Itoa(routePorts[i]))
	}
	nodes := make([]*server.Server, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nodes[i], errs[i] = embedded.Start(embedded.Options{Name: fmt.Sprintf("n%d", i+1), DataDir: t.TempDir(),
				Cluster: &embedded.Cluster{Name: "placement", Addr: "127.0.0.1:" + strconv.Itoa(routePorts[i]), Routes: routes}})
		}()
	}
	wg.Wait()
	conns := make([]*nats.Conn, 3)
	for i, ns := range nodes {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
		nc, err := nats.Connect(ns.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		conns[i] = nc
	}
	js, _ := jetstream.New(conns[0])
	store := events.DefaultStoreConfig()
	store.Replicas = 3
	// The cluster elects its meta leader first: stores are created once it has one.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, _, err := events.EnsureStore(ctx, js, store)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no store on the cluster: %v", err)
		}
	}
	return conns
}

// consumersOn returns the event stream's consumers and the server each lives on.
func consumersOn(t *testing.T, nc *nats.Conn) map[string]string {
	t.Helper()
	js, _ := jetstream.New(nc)
	st, err := js.Stream(context.Background(), events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	list := st.ListConsumers(context.Background())
	for ci := range list.Info() {
		if ci.Cluster == nil {
			t.Fatalf("consumer %s without cluster info", ci.Name)
		}
		out[ci.Name] = ci.Cluster.Leader
	}
	if err := list.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// runReady starts a run of cfg on nc and waits until it consumes; stop ends it.
func runReady(t *testing.T, nc *nats.Conn, cfg projector.Config) (stop func() error) {
	t.Helper()
	cfg.Bucket, cfg.Logger = events.DefaultBucket, quiet
	p, err := projector.New(nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	select {
	case <-p.Ready():
	case err := <-done:
		t.Fatalf("the run through %s ended: %v", nc.ConnectedServerName(), err)
	case <-time.After(30 * time.Second):
		t.Fatalf("the run through %s is not ready", nc.ConnectedServerName())
	}
	return func() error { cancel(); return <-done }
}

// TestARunPutsItsConsumerOnItsOwnServer: on a cluster, where nats-server puts an R1
// consumer on a random node of the stream, a run's consumer lives on the server its
// own connection is on, whichever that is, and none of the consumers it tried is
// left behind; with ConsumerAnywhere the run keeps the first one wherever it is.
func TestARunPutsItsConsumerOnItsOwnServer(t *testing.T) {
	conns := startCluster(t)
	for i, nc := range conns {
		own := nc.ConnectedServerName()
		// The tries alone bound it here (24: one miss in 17,000 runs), not the time
		// they take on a machine busy with other tests.
		stop := runReady(t, nc, projector.Config{Hooks: projector.Hooks{PlaceBudget: time.Minute}})
		on := consumersOn(t, nc)
		if len(on) != 1 {
			t.Fatalf("run through node %d: consumers %v, want its one", i, on)
		}
		for name, node := range on {
			if node != own {
				t.Errorf("run through %s: its consumer %s is on %s", own, name, node)
			}
		}
		if err := stop(); err != nil {
			t.Fatal(err)
		}
	}

	// With ConsumerAnywhere, one create: the consumer is wherever the server put it,
	// off the run's server two times in three. Runs until one is, to see it kept.
	for run := 0; ; run++ {
		if run == 30 {
			t.Fatal("30 runs with ConsumerAnywhere, every consumer on the run's own server")
		}
		nc := conns[run%3]
		stop := runReady(t, nc, projector.Config{Hooks: projector.Hooks{ConsumerAnywhere: true}})
		on := consumersOn(t, nc)
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		if len(on) != 1 {
			t.Fatalf("consumers %v, want the run's one", on)
		}
		off := false
		for _, node := range on {
			off = node != nc.ConnectedServerName()
		}
		if off {
			return
		}
	}
}
