package main

import (
	"cmp"
	"context"
	"fmt"
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
	"github.com/attrd/attrd/events/leaderread"
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
	// What a read index is built on (api/readindex.go): a put (the barrier), then a
	// multi-last direct get taken from a copy holding it; unshared here, one each.
	snaps, err := leaderread.NewSnapshots(nc)
	if err != nil {
		t.Fatal(err)
	}
	defer snaps.Close()
	barrier := events.KVSubject("bench_raw", "barrier")
	indexed := measure(ctx, conc, d, func(g, i int) error {
		ack, err := js.PublishMsg(ctx, &nats.Msg{Subject: barrier, Data: []byte("b")})
		if err != nil {
			return err
		}
		_, err = snaps.Last(ctx, "KV_bench_raw", barrier, []string{events.KVSubject("bench_raw", "k"+strconv.Itoa(g))}, ack.Sequence)
		return err
	})
	indexed.finish()
	row("cluster R3, raw put + indexed get", indexed)
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
	row("cluster R3, attrd get (read index)", gets)
}

// TestMeasurePartitionsOnACluster measures updates on a 3-node cluster (R3) with 1, 4
// and 16 partitions, one and two instances, at c=64 and c=256: each writer updates an
// attribute of a user of its own, logged in as that user (users spread over the
// partitions), with raw R3 KV puts with a TTL beside them at the same concurrency. A
// measurement, not a check: ATTRD_CLUSTER_BENCH=4s go test -run
// TestMeasurePartitionsOnACluster -v -timeout 30m ./cmd/attrd/ (ATTRD_BENCH_PARTITIONS
// and ATTRD_BENCH_CONC choose other lists).
func TestMeasurePartitionsOnACluster(t *testing.T) {
	d, err := time.ParseDuration(os.Getenv("ATTRD_CLUSTER_BENCH"))
	if err != nil || d <= 0 {
		t.Skip("set ATTRD_CLUSTER_BENCH to a duration to measure")
	}
	ints := func(env, def string) []int {
		var out []int
		for _, s := range list(cmp.Or(os.Getenv(env), def)) {
			n, err := strconv.Atoi(s)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, n)
		}
		return out
	}
	parts, concs := ints("ATTRD_BENCH_PARTITIONS", "1,4,16"), ints("ATTRD_BENCH_CONC", "64,256")
	value := strings.Repeat("v", 100)
	ctx := context.Background()
	const users = 64
	for _, n := range parts {
		cl := startNATSCluster(t)
		a := cl.instance(t, func(c *Config) { c.Partitions = n })
		admin := mustLogin(t, mustClient(t, a), "admin", adminPassword)
		own := make([]*client.User, users)
		for i := range own {
			name := fmt.Sprintf("bench-%d", i)
			if _, err := admin.CreateUser(ctx, name, "pw", false); err != nil {
				t.Fatal(err)
			}
			s := mustLogin(t, mustClient(t, a), name, "pw")
			if own[i], err = s.User(ctx); err != nil {
				t.Fatal(err)
			}
			if err := own[i].Attr.Set(ctx, "k", value); err != nil {
				t.Fatal(err)
			}
		}
		nc, err := nats.Connect(cl.urls(), nats.UserInfo(embedded.OperatorUser, cl.accts.OperatorPassword))
		if err != nil {
			t.Fatal(err)
		}
		js, _ := jetstream.New(nc)
		if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "bench_raw", History: 1, Replicas: 3, LimitMarkerTTL: 5 * time.Minute}); err != nil {
			t.Fatal(err)
		}
		insts := []*Server{a}
		for inst := 1; inst <= 2; inst++ {
			if inst == 2 {
				b := cl.instance(t, func(c *Config) { c.Partitions = n })
				insts = append(insts, b)
				waitHolders(t, a, n, 10*time.Second, "the second instance takes its share", func(h []string) bool {
					return n == 1 || count(h)[b.instance] == n/2
				})
			}
			for _, conc := range concs {
				raw := measure(ctx, conc, d/2, func(g, i int) error {
					_, err := js.PublishMsg(ctx, &nats.Msg{Subject: events.KVSubject("bench_raw", "k"+strconv.Itoa(g)), Data: []byte(value)}, jetstream.WithMsgTTL(time.Hour))
					return err
				})
				raw.finish()
				up := measure(ctx, conc, d, func(g, i int) error {
					return own[g%users].Attr.Update(ctx, "k", value, client.Expiration(time.Hour))
				})
				up.finish()
				if up.err != nil || raw.err != nil {
					t.Fatal(up.err, raw.err)
				}
				t.Logf("partitions %2d, instances %d, c=%3d: updates %6.0f/s (p50 %8s), raw R3 puts %6.0f/s: %.2f", n, inst, conc,
					up.rate, up.p50, raw.rate, up.rate/raw.rate)
			}
		}
		nc.Close()
		for _, s := range insts {
			s.Close()
		}
		cl.stopAll()
	}
}
