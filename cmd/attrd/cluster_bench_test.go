package main

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
)

// TestMeasureInstancesOnACluster measures updates (c=16, 100-byte values) through one
// attrd on the embedded default, one on a 3-node cluster (R3) and two on it, with raw R3
// KV puts with a TTL beside them. A measurement, not a check: it runs only with
// ATTRD_CLUSTER_BENCH set to the time per measurement, for example
// ATTRD_CLUSTER_BENCH=5s go test -run TestMeasureInstancesOnACluster -v ./cmd/attrd/
func TestMeasureInstancesOnACluster(t *testing.T) {
	d, err := time.ParseDuration(os.Getenv("ATTRD_CLUSTER_BENCH"))
	if err != nil || d <= 0 {
		t.Skip("set ATTRD_CLUSTER_BENCH to a duration to measure")
	}
	const conc = 16
	value := strings.Repeat("v", 100)
	ctx := context.Background()
	updates := func(s *Server) result {
		sess := mustLogin(t, mustClient(t, s), "admin", adminPassword)
		u, _ := sess.User(ctx)
		for g := 0; g < conc; g++ {
			if err := u.Attr.Set(ctx, "k"+strconv.Itoa(g), value); err != nil {
				t.Fatal(err)
			}
		}
		r := measure(ctx, conc, d, func(g, i int) error {
			return u.Attr.Update(ctx, "k"+strconv.Itoa(g), value, client.Expiration(time.Hour))
		})
		r.finish()
		if r.err != nil {
			t.Fatal(r.err)
		}
		return r
	}
	row := func(name string, r result) {
		t.Logf("%-36s %9.0f op/s  p50 %8s  p99 %8s", name, r.rate, r.p50, r.p99)
	}
	row("embedded, one instance", updates(mustStart(t, nil)))

	cl := startNATSCluster(t)
	a := cl.instance(t)
	nc, err := nats.Connect(cl.urls(), nats.UserInfo(embedded.OperatorUser, cl.accts.OperatorPassword))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	rawKV, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "bench_raw", History: 1, Replicas: 3, LimitMarkerTTL: 5 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	raw := measure(ctx, conc, d, func(g, i int) error {
		_, err := js.PublishMsg(ctx, &nats.Msg{Subject: events.KVSubject("bench_raw", "k"+strconv.Itoa(g)), Data: []byte(value)}, jetstream.WithMsgTTL(time.Hour))
		return err
	})
	raw.finish()
	row("cluster R3, raw KV put with TTL", raw)
	// The cost of reading from the leader (what attrd does on R3, for read-your-writes)
	// against direct gets answered by any replica.
	direct := measure(ctx, conc, d, func(g, i int) error {
		_, err := rawKV.Get(ctx, "k"+strconv.Itoa(g))
		return err
	})
	direct.finish()
	row("cluster R3, raw KV get, any replica", direct)
	leader := measure(ctx, conc, d, func(g, i int) error {
		req := []byte(`{"last_by_subj":"` + events.KVSubject("bench_raw", "k"+strconv.Itoa(g)) + `"}`)
		_, err := nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET.KV_bench_raw", req)
		return err
	})
	leader.finish()
	row("cluster R3, raw KV get, leader", leader)
	row("cluster R3, one instance", updates(a))
	cl.instance(t)
	row("cluster R3, two instances", updates(a))
	sess := mustLogin(t, mustClient(t, a), "admin", adminPassword)
	u, _ := sess.User(ctx)
	gets := measure(ctx, conc, d, func(g, i int) error {
		_, err := u.Attr.Get(ctx, "k"+strconv.Itoa(g))
		return err
	})
	gets.finish()
	row("cluster R3, attrd get (leader reads)", gets)
}
