package main

// Network partitions (issues 17 and 21): three nats-server processes, each in a Linux
// network namespace of its own, one attrd instance connected to each node only, and
// clients on every node; a cut silently drops the traffic between one node and the
// others (nftables inside the node's namespace) while the node, its attrd instance
// and its clients keep running and connected. Needs root, iproute2 and nftables.
// Not in .ci/run while issue 17's divergence after a heal is open. The quick scenario:
//
//	go test -count=1 -run TestNetworkPartitions -v ./cmd/attrd/
//
// all of them with
//
//	ATTRD_NETSPLIT=all go test -run TestNetworkPartitions -v -timeout 30m ./cmd/attrd/
//
// ATTRD_TEST_LOG=info shows the instances' logs, ATTRD_NETSPLIT_ATTEMPTS=1 every write
// attempt with its outcome.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// netCluster is three nats-server processes in network namespaces of their own,
// reached from this process (the root namespace) through a veth pair each.
type netCluster struct {
	t            *testing.T
	name         string // prefix of namespaces and interfaces
	subnet       string // 10.N: node i is 10.N.i.2, its veth's root side 10.N.i.1
	dir          string
	ns           []string
	procs        []*exec.Cmd
	intPW, cliPW string
	forward      string // the root namespace's ip_forward before the test
	logs         *netLogs
}

// needNetns skips the test unless this machine can make namespaces and cuts.
func needNetns(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network partitions need root (ip netns, nft)")
	}
	for _, bin := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("network partitions need %s (apt-get install iproute2 nftables)", bin)
		}
	}
}

// natsServerBinary builds nats-server, the version go.mod names, once per machine.
func natsServerBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(os.TempDir(), "attrd-test-nats-server-"+server.VERSION)
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	tmp := bin + ".tmp" + strconv.Itoa(os.Getpid())
	cmd := exec.Command("go", "build", "-o", tmp, "github.com/nats-io/nats-server/v2")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build nats-server: %v\n%s", err, out)
	}
	if err := os.Rename(tmp, bin); err != nil {
		t.Fatal(err)
	}
	return bin
}

// sh runs a command and fails the test if it fails.
func sh(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// startNetCluster makes the namespaces and starts the nodes, on the shipped node
// configuration (deploy/nats/cluster.conf) with its addresses and store replaced.
func startNetCluster(t *testing.T) *netCluster {
	needNetns(t)
	bin := natsServerBinary(t)
	pid := os.Getpid()
	c := &netCluster{t: t, logs: &netLogs{}, name: fmt.Sprintf("anp%d", pid%100000), subnet: fmt.Sprintf("10.%d", 200+pid%50), dir: t.TempDir(),
		intPW: embeddedSecret(), cliPW: embeddedSecret()}
	fw, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	c.forward = strings.TrimSpace(string(fw))
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.teardown)
	conf, err := os.ReadFile(filepath.Join("..", "..", "deploy", "nats", "cluster.conf"))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		ns, veth := fmt.Sprintf("%s-n%d", c.name, i), fmt.Sprintf("%s%d", c.name, i)
		c.ns = append(c.ns, ns)
		_ = exec.Command("ip", "netns", "del", ns).Run() // left over from a killed run
		_ = exec.Command("ip", "link", "del", veth).Run()
		sh(t, "ip", "netns", "add", ns)
		sh(t, "ip", "link", "add", veth, "type", "veth", "peer", "name", veth+"p")
		sh(t, "ip", "link", "set", veth+"p", "netns", ns)
		sh(t, "ip", "addr", "add", c.rootSide(i)+"/24", "dev", veth)
		sh(t, "ip", "link", "set", veth, "up")
		sh(t, "ip", "netns", "exec", ns, "ip", "addr", "add", c.ip(i)+"/24", "dev", veth+"p")
		sh(t, "ip", "netns", "exec", ns, "ip", "link", "set", veth+"p", "up")
		sh(t, "ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
		sh(t, "ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", c.rootSide(i))
	}
	var routes []string
	for i := range 3 {
		routes = append(routes, "nats-route://"+c.ip(i)+":6222")
	}
	for i := range 3 {
		cfg := string(conf)
		cfg = strings.Replace(cfg, "listen: 0.0.0.0:4222", "listen: "+c.ip(i)+":4222", 1)
		cfg = strings.Replace(cfg, "http: 0.0.0.0:8222", "http: "+c.ip(i)+":8222", 1)
		cfg = strings.Replace(cfg, "listen: 0.0.0.0:6222", "listen: "+c.ip(i)+":6222", 1)
		cfg = strings.Replace(cfg, "store_dir: /data", fmt.Sprintf("store_dir: %q", filepath.Join(c.dir, fmt.Sprint(i))), 1)
		// The harness's own system user: it moves the meta group's leader.
		cfg = strings.Replace(cfg, "accounts {", "system_account: SYS\naccounts {\n  SYS { users: [ { user: sys, password: $ATTRD_NATS_PASSWORD } ] }", 1)
		for j := range 3 {
			cfg = strings.Replace(cfg, fmt.Sprintf("nats-route://nats%d:6222", j+1), routes[j], 1)
		}
		path := filepath.Join(c.dir, fmt.Sprintf("n%d.conf", i))
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		logf, err := os.Create(filepath.Join(c.dir, fmt.Sprintf("n%d.log", i)))
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("ip", "netns", "exec", c.ns[i], bin, "-c", path)
		cmd.Env = append(os.Environ(), fmt.Sprintf("NODE_NAME=n%d", i), "ATTRD_NATS_PASSWORD="+c.intPW, "ATTRD_CLIENT_PASSWORD="+c.cliPW)
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		c.procs = append(c.procs, cmd)
	}
	// Ready when JetStream answers through every node.
	for i := range 3 {
		deadline := time.Now().Add(time.Minute)
		for {
			nc, err := nats.Connect(c.url(i), nats.UserInfo("attrd", c.intPW))
			if err == nil {
				js, _ := jetstream.New(nc)
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				_, err = js.AccountInfo(ctx)
				cancel()
				nc.Close()
				if err == nil {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %d not ready: %v (log: %s)", i, err, filepath.Join(c.dir, fmt.Sprintf("n%d.log", i)))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return c
}

// embeddedSecret is a random password.
func embeddedSecret() string { return events.NewID() }

func (c *netCluster) ip(i int) string       { return fmt.Sprintf("%s.%d.2", c.subnet, i) }
func (c *netCluster) rootSide(i int) string { return fmt.Sprintf("%s.%d.1", c.subnet, i) }
func (c *netCluster) url(i int) string      { return "nats://" + c.ip(i) + ":4222" }

// teardown stops the nodes and removes the namespaces (their veths and rules go
// with them), and puts ip_forward back.
func (c *netCluster) teardown() {
	for _, p := range c.procs {
		_ = p.Process.Kill()
		_ = p.Wait()
	}
	for i, ns := range c.ns {
		_ = exec.Command("ip", "netns", "del", ns).Run()
		_ = exec.Command("ip", "link", "del", fmt.Sprintf("%s%d", c.name, i)).Run()
	}
	if c.forward != "" {
		_ = os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte(c.forward), 0o644)
	}
}

// cut makes node i stop hearing the other nodes and, unless oneWay, stop being heard
// by them: packets between them are dropped silently. Clients and attrd keep their
// connections to it.
func (c *netCluster) cut(i int, oneWay bool) {
	c.t.Helper()
	var others []string
	for j := range 3 {
		if j != i {
			others = append(others, c.ip(j))
		}
	}
	set := "{ " + strings.Join(others, ", ") + " }"
	rules := "table inet attrdcut {\n  chain in { type filter hook input priority 0; ip saddr " + set + " drop; }\n"
	if !oneWay {
		rules += "  chain out { type filter hook output priority 0; ip daddr " + set + " drop; }\n"
	}
	rules += "}\n"
	cmd := exec.Command("ip", "netns", "exec", c.ns[i], "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		c.t.Fatalf("cut node %d: %v\n%s", i, err, out)
	}
}

// heal lifts every cut of node i.
func (c *netCluster) heal(i int) {
	_ = exec.Command("ip", "netns", "exec", c.ns[i], "nft", "delete", "table", "inet", "attrdcut").Run()
}

// leaders returns the node leading each of attrd's streams, as the nodes report it
// (their monitoring endpoint).
func (c *netCluster) leaders() map[string]int {
	out := map[string]int{}
	for i := range 3 {
		jsz := c.jsz(i, "accounts=true&streams=true")
		if jsz == nil {
			continue
		}
		if jsz.Meta != nil && jsz.Meta.Leader != "" {
			if n, ok := nodeOf(jsz.Meta.Leader); ok {
				out[metaGroup] = n
			}
		}
		for _, a := range jsz.AccountDetails {
			for _, sd := range a.Streams {
				if sd.Cluster != nil && sd.Cluster.Leader != "" {
					if n, ok := nodeOf(sd.Cluster.Leader); ok {
						out[sd.Name] = n
					}
				}
			}
		}
	}
	return out
}

// nodeOf returns the node a server named nK is (ok false for another name).
func nodeOf(server string) (int, bool) {
	n, err := strconv.Atoi(strings.TrimPrefix(server, "n"))
	return n, err == nil
}

// jsz returns node i's JetStream monitoring report with query, nil if it gave none.
func (c *netCluster) jsz(i int, query string) *server.JSInfo {
	resp, err := http.Get("http://" + c.ip(i) + ":8222/jsz?" + query)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var jsz server.JSInfo
	if json.NewDecoder(resp.Body).Decode(&jsz) != nil {
		return nil
	}
	return &jsz
}

// consumers returns the node of each consumer of the event stream, by name (an R1
// consumer lives on one node).
func (c *netCluster) consumers() map[string]int {
	out := map[string]int{}
	for i := range 3 {
		jsz := c.jsz(i, "accounts=true&streams=true&consumers=true")
		if jsz == nil {
			continue
		}
		for _, a := range jsz.AccountDetails {
			for _, sd := range a.Streams {
				if sd.Name != events.StreamName {
					continue
				}
				for _, ci := range sd.Consumer {
					if ci.Cluster != nil && ci.Cluster.Leader != "" {
						if n, ok := nodeOf(ci.Cluster.Leader); ok {
							out[ci.Name] = n
						}
					}
				}
			}
		}
	}
	return out
}

// consumerOff returns the node of the projector's consumer once it is on a node other
// than node: while it is on node, it deletes it (the run ends, and the next creates
// one, placed anew).
func (r *netRun) consumerOff(t *testing.T, node int) int {
	t.Helper()
	nc, err := nats.Connect(r.c.url(node), nats.UserInfo("attrd", r.c.intPW))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		cs := r.c.consumers()
		if len(cs) != 1 {
			continue // a run starting or ending
		}
		for name, n := range cs {
			if n != node {
				return n
			}
			if st, err := js.Stream(context.Background(), events.StreamName); err == nil {
				_ = st.DeleteConsumer(context.Background(), name)
			}
		}
	}
	t.Fatalf("the projector's consumer stayed on node %d", node)
	return 0
}

// sees reports what node i's monitoring endpoint shows: whether it knows the
// meta group's leader, and each stream's leader (true when it names one).
func (c *netCluster) sees(i int) map[string]bool {
	out := map[string]bool{}
	jsz := c.jsz(i, "accounts=true&streams=true")
	if jsz == nil {
		return out
	}
	out["meta leader"] = jsz.Meta != nil && jsz.Meta.Leader != ""
	for _, a := range jsz.AccountDetails {
		for _, sd := range a.Streams {
			out[sd.Name+" leader"] = sd.Cluster != nil && sd.Cluster.Leader != ""
		}
	}
	return out
}

// instance starts attrd in this process, connected to node i only; mods configure
// it further.
func (c *netCluster) instance(t *testing.T, i int, mods ...func(*Config)) *Server {
	return mustStart(t, func(cfg *Config) {
		defer func() {
			for _, m := range mods {
				m(cfg)
			}
		}()
		cfg.NATSURL, cfg.Replicas = c.url(i), 3
		cfg.NATSOptions = []nats.Option{nats.UserInfo("attrd", c.intPW), nats.ReconnectWait(100 * time.Millisecond)}
		cfg.NATSConnectTimeout = time.Minute
		cfg.AdminUsername, cfg.AdminPassword = "admin", adminPassword
		// ATTRD_TEST_LOG=info (or debug) shows the instances' logs; else the
		// records of note are kept for a failed bound's evidence.
		var level slog.Level
		if level.UnmarshalText([]byte(os.Getenv("ATTRD_TEST_LOG"))) == nil {
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("node", i)
		} else {
			cfg.Logger = slog.New(c.logs.handler(i))
		}
	})
}

// client connects a service to node i (the client account's user).
func (c *netCluster) client(t *testing.T, i int) *nats.Conn {
	nc, err := nats.Connect(c.url(i), nats.UserInfo("svc", c.cliPW), nats.CustomInboxPrefix("_INBOX_svc"),
		nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// registers drives clients on every node over a few shared attributes of one user:
// sets, creates, updates, deletes (writes carry request ids and are retried as the
// same request on E008004, up to writeFor) and reads, all recorded for the
// linearizability check, and every write's outcome by node, for the outages.
type registers struct {
	ops   opLog
	ust   string
	uid   string
	keys  []string
	stop  chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	acked [3][]time.Time // acknowledged writes, by the node of the client
	// attempts logs every write attempt's outcome (evidence for the outages).
	attempts []attempt
	errs     []string
	errored  atomic.Int64 // answers of 500
}

// attempt is one write attempt's outcome, as the outages' evidence shows it.
type attempt struct {
	sent time.Time
	node int
	line string
}

// logAttempts logs node i's write attempts sent in [from, to].
func (r *registers) logAttempts(t *testing.T, i int, from, to time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.attempts {
		if a.node == i && !a.sent.Before(from) && !a.sent.After(to) {
			t.Log(a.line)
		}
	}
}

// writeFor is how long a write is retried before its outcome counts as unknown.
const writeFor = 10 * time.Second

func (r *registers) start(c *netCluster, t *testing.T, perNode int) {
	r.stop = make(chan struct{})
	for i := range 3 {
		for k := range perNode {
			nc := c.client(t, i)
			client := i*perNode + k
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				r.run(nc, i, client)
			}()
		}
	}
}

func (r *registers) finish() {
	select {
	case <-r.stop:
	default:
		close(r.stop)
	}
	r.wg.Wait()
}

// request sends a body once and returns the reply's fields (nil: no reply).
func request(nc *nats.Conn, op string, body map[string]any) (map[string]any, bool) {
	b, _ := json.Marshal(body)
	rep, err := nc.Request("attrd."+op, b, 3*time.Second)
	if err != nil {
		return nil, false
	}
	var out map[string]any
	if json.Unmarshal(rep.Data, &out) != nil {
		return nil, false
	}
	return out, rep.Header.Get("Nats-Service-Error-Code") == "500"
}

func (r *registers) run(nc *nats.Conn, node, client int) {
	rng := rand.New(rand.NewPCG(uint64(client), 17))
	for n := int64(1); ; n++ {
		select {
		case <-r.stop:
			return
		default:
		}
		name := r.keys[rng.IntN(len(r.keys))]
		in := attrOp{Key: r.uid + "/" + name, Value: int64(client)*1_000_000 + n}
		body := map[string]any{"ust": r.ust, "current_app": "CRM", "name": name}
		switch p := rng.IntN(10); {
		case p < 4:
			in.Kind = "get"
		case p < 6:
			in.Kind = "set"
			if rng.IntN(4) == 0 {
				in.TTL = 2
			}
		case p < 7:
			in.Kind = "create"
		case p < 9:
			in.Kind = "update"
		default:
			in.Kind = "delete"
		}
		if in.Kind != "get" && in.Kind != "delete" {
			body["value"] = in.Value
		}
		if in.TTL > 0 {
			body["expiration"] = in.TTL
		}
		if in.Kind != "get" {
			body["request_id"] = fmt.Sprintf("c%d-%d", client, n)
		}
		in.Call = time.Now().UnixNano()
		var out attrOut
		for {
			sent := time.Now()
			rep, internal := request(nc, "user.attr."+in.Kind, body)
			if in.Kind != "get" {
				what := "no answer"
				if rep != nil {
					what = fmt.Sprint(rep["status"], " ", subStatus(rep))
				}
				r.mu.Lock()
				r.attempts = append(r.attempts, attempt{sent, node, fmt.Sprintf("%s client %d node %d %s %s (%s)", sent.Format("15:04:05.000"), client, node, in.Kind, what, time.Since(sent).Round(time.Millisecond))})
				r.mu.Unlock()
			}
			if internal {
				r.errored.Add(1)
				r.note("%s: 500", in.Kind)
			}
			code := subStatus(rep)
			if rep != nil && code != string(events.CodeOutcomeUnknown) && !internal {
				in.Ret = time.Now().UnixNano()
				if in.Kind == "get" {
					in.Call = sent.UnixNano() // the attempt answered; a refused read read nothing
				}
				out.OK = rep["status"] == "ok"
				out.Code = code
				if v, ok := rep["value"].(float64); ok && rep["found"] == true {
					out.Found, out.Value = true, int64(v)
				}
				break
			}
			if in.Kind == "get" {
				out.Unknown = true // nothing to record: refused, or no answer
				break
			}
			if time.Since(time.Unix(0, in.Call)) > writeFor {
				in.Ret, out.Unknown = time.Now().UnixNano(), true
				break
			}
			select {
			case <-r.stop:
				in.Ret, out.Unknown = time.Now().UnixNano(), true
			case <-time.After(50 * time.Millisecond):
				continue
			}
			break
		}
		if in.Kind == "get" && out.Unknown {
			continue
		}
		r.ops.add(client, in, out)
		if in.Kind != "get" && !out.Unknown {
			r.mu.Lock()
			r.acked[node] = append(r.acked[node], time.Unix(0, in.Ret))
			r.mu.Unlock()
		}
	}
}

func (r *registers) note(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.errs) < 20 {
		r.errs = append(r.errs, fmt.Sprintf(format, args...))
	}
}

// outage is how long writes through node i's clients (i < 0: any node's) stopped in
// [from, to]: the longest stretch in it without an acknowledged write (to the first
// write after from, or from the last before to).
func (r *registers) outage(i int, from, to time.Time) time.Duration {
	_, d := r.longestGap(i, from, to)
	return d
}

// longestGap is outage's stretch: when it began, and how long it lasted.
func (r *registers) longestGap(i int, from, to time.Time) (time.Time, time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return longestGap(r.acked[:], i, from, to)
}

// firstWrite is when the first write through node i's clients was acknowledged after
// from (zero: none).
func (r *registers) firstWrite(i int, from time.Time) time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return firstAfter(r.acked[i], from)
}

// netRun is one scenario's cluster, instances and load.
type netRun struct {
	c     *netCluster
	insts []*Server
	load  *registers
	// raw is the raw NATS baseline's load, groups the probe of attrd's own groups
	// (netraw_test.go).
	raw, groups *probeLoad
	// appliedAtCut is the most any projector had folded 2 s into a cut (timeline).
	appliedAtCut uint64
}

// startNetRun starts the cluster, an instance on every node, a user with a few
// attributes, and the load.
func startNetRun(t *testing.T, mods ...func(*Config)) *netRun {
	c := startNetCluster(t)
	r := &netRun{c: c}
	for i := range 3 {
		r.insts = append(r.insts, c.instance(t, i, mods...))
	}
	cl := client.New(c.client(t, 0), "CRM")
	admin := mustLogin(t, cl, "admin", adminPassword)
	uid, err := admin.CreateUser(ctxT(t), "registers", "pw", false)
	if err != nil {
		t.Fatal(err)
	}
	sess := mustLogin(t, cl, "registers", "pw")
	r.load = &registers{ust: sess.UST, uid: uid, keys: []string{"a", "b", "c", "d", "e", "f"}}
	r.load.start(c, t, 4)
	r.raw = startRawLoad(t, c, 4)
	r.groups = startGroupsProbe(t, c)
	return r
}

// holderNode returns the node of the instance holding the lease of partition 0.
func (r *netRun) holderNode(t *testing.T) int {
	h := holders(t, r.insts[0], 1)[0]
	for i, s := range r.insts {
		if s.instance == h {
			return i
		}
	}
	t.Fatalf("no instance holds the lease (holder %q)", h)
	return 0
}

// verify stops the load and checks the run: linearizable, no 500, the projection
// equal to a replay of the log.
func (r *netRun) verify(t *testing.T) {
	t.Helper()
	r.load.finish()
	r.raw.finish()
	r.groups.finish()
	for _, e := range r.load.errs {
		t.Log(e)
	}
	if n := r.load.errored.Load(); n != 0 {
		t.Errorf("%d answers of 500", n)
	}
	linear := r.load.ops.check(t)
	dumped := false
	defer func() {
		// A check that stopped the test (a partition not folded to its end) leaves
		// the instances' and servers' logs as the evidence.
		if t.Failed() && !dumped {
			r.c.logs.dumpAll(t)
		}
	}()
	if equal := replayEqualsLiveReporting(t, r.insts[0], t.Error); !linear || !equal {
		// Which node holds what: each instance's view of the bucket, and the
		// instances' logs of note since the load began.
		for i, inst := range r.insts {
			js, _ := jetstream.New(inst.apiConn)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if diffs, _, err := diffOf(ctx, js); err == nil {
				t.Logf("through node %d: %d differences", i, len(diffs))
			} else {
				t.Logf("through node %d: %v", i, err)
			}
			cancel()
		}
		r.c.logs.dumpAll(t)
		dumped = true
	}
}

// ciMode is ATTRD_NETSPLIT_CI=1, how .ci/run runs the quick scenario: what every run
// must prove is checked (every operation linearizable, no answer of 500, the
// projection equal to a replay of the log), and issue 21's time bounds, which hang on
// nats-server's randomised election timeouts (4–9 s), are logged, not failed.
func ciMode() bool { return os.Getenv("ATTRD_NETSPLIT_CI") == "1" }

// liveness reports a missed time bound of issue 21 (writes resuming after a cut or a
// heal): an error, or, in CI mode, a log line.
func liveness(t *testing.T, format string, args ...any) {
	t.Helper()
	if ciMode() {
		t.Logf("bound missed (not checked in CI): "+format, args...)
		return
	}
	t.Errorf(format, args...)
}

// metaCutBound bounds the majority side's outage when the node cut off led only the
// meta group: a request in flight at the cut waits out the client's 3 s, then goes on.
const metaCutBound = 4 * time.Second

// healSlow bounds how soon the healed node writes again when the heal caused an
// election: nats-server's longest election timeout (9 s), a catch-up, and room.
const healSlow = 12 * time.Second

// reportCut measures a cut of node cut from cutAt to healAt: the longest write
// outage through each node during it and after the heal, each beside the raw NATS
// baseline's in the same stretch; it checks issue 21's bounds (the majority side
// within 10 s of the cut, every node within 5 s of the heal), or attrd within
// natsAllowance of NATS's own outage (natsVerdict).
func (r *netRun) reportCut(t *testing.T, name string, cut int, cutAt, healAt time.Time) {
	t.Helper()
	// Give the heal its 5 s (and then some) before judging it, watching what the
	// healed node sees meanwhile; up to healSlow when it has not written by then.
	seen := map[string]string{}
	for d := time.Since(healAt); d < 6*time.Second || d < healSlow && r.load.firstWrite(cut, healAt).IsZero(); d = time.Since(healAt) {
		for what, ok := range r.c.sees(cut) {
			if _, was := seen[what]; ok && !was {
				seen[what] = time.Since(healAt).Round(10 * time.Millisecond).String()
			}
		}
		if f := r.load.firstWrite(cut, healAt); !f.IsZero() {
			if _, was := seen["writes"]; !was {
				seen["writes"] = f.Sub(healAt).Round(10 * time.Millisecond).String()
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("after the heal of node %d: %v", cut, seen)
	now := time.Now()
	for i := range 3 {
		side := "majority"
		if i == cut {
			side = "cut off"
		}
		// During the cut, and after the heal: attrd's longest outage and, beside it,
		// NATS's own through the same node in the same stretch (netraw_test.go).
		during := r.load.outage(i, cutAt, healAt)
		_, rawDuring := r.raw.longestGap(i, cutAt, healAt)
		_, natsDuring := r.groups.longestGap(i, cutAt, healAt)
		afterHeal := r.load.outage(i, healAt, now)
		_, rawAfterHeal := r.raw.longestGap(i, healAt, now)
		_, natsAfterHeal := r.groups.longestGap(i, healAt, now)
		t.Logf("%s: node %d (%s): longest write outage during the cut %s (attrd's groups %s, raw NATS %s); first write after the heal %s (raw NATS %s); longest outage in the %s after it %s (attrd's groups %s, raw NATS %s)",
			name, i, side, during.Round(time.Millisecond), natsDuring.Round(time.Millisecond), rawDuring.Round(time.Millisecond),
			sinceOr(r.load.firstWrite(i, healAt), healAt), sinceOr(r.raw.firstWrite(i, healAt), healAt),
			now.Sub(healAt).Round(time.Second), afterHeal.Round(time.Millisecond), natsAfterHeal.Round(time.Millisecond), rawAfterHeal.Round(time.Millisecond))
		if i != cut {
			if ok, why := natsVerdict(during, natsDuring, 10*time.Second); !ok {
				liveness(t, "%s: writes through node %d (majority side) stopped for %s during the cut, bound 10 s (%s)", name, i, during.Round(time.Millisecond), why)
			} else if why != "" {
				t.Logf("%s: node %d during the cut: %s", name, i, why)
			}
		}
		ok, why := natsVerdict(afterHeal, natsAfterHeal, 5*time.Second)
		if ok {
			if why != "" {
				t.Logf("%s: node %d after the heal: %s", name, i, why)
			}
			continue
		}
		if i == cut && afterHeal <= healSlow && os.Getenv("ATTRD_NETSPLIT_STRICT") == "" && r.c.electedAgain(cut, healAt, healAt.Add(6*time.Second)) {
			// The healed node made a Raft group elect again (nats-server 2.15: a node
			// back from a cut can depose the meta group's or a stream's leader with the
			// terms it raised while cut off; the group then has no leader until the
			// election ends, up to its 9 s timeout), and the baseline's groups drew
			// shorter election timeouts.
			t.Logf("%s: node %d wrote again %s after the heal: later than issue 21's 5 s, after an election the heal caused (bound %s; %s)",
				name, i, afterHeal.Round(time.Millisecond), healSlow, why)
			continue
		}
		liveness(t, "%s: writes through node %d stopped for %s after the heal, bound 5 s (%s); its attempts and its instance's log:", name, i, afterHeal.Round(time.Millisecond), why)
		r.load.logAttempts(t, i, healAt.Add(-time.Second), healAt.Add(6*time.Second))
		r.c.logs.dump(t, i, healAt.Add(-time.Second), healAt.Add(6*time.Second))
		r.c.serverLog(t, i, healAt.Add(-time.Second), healAt.Add(6*time.Second))
	}
}

// sinceOr says how long after from t was ("none" when t is zero).
func sinceOr(t, from time.Time) string {
	if t.IsZero() {
		return "none"
	}
	return t.Sub(from).Round(time.Millisecond).String()
}

// TestNetworkPartitions runs the scenarios: the quick one (the node leading the bucket
// and the event stream cut off both ways) always, all of them with ATTRD_NETSPLIT=all,
// those whose name contains it with another value (ATTRD_NETSPLIT=holder).
// Its bounds are times, which the race detector's slowdown would stretch: under -race
// it skips.
func TestNetworkPartitions(t *testing.T) {
	if raceDetector {
		t.Skip("timing bounds: run without -race")
	}
	needNetns(t)
	scenarios := []struct {
		name  string
		quick bool
		run   func(t *testing.T, r *netRun)
		// config, if set, configures the scenario's instances.
		config func(*Config)
	}{
		{"leader cut off", true, func(t *testing.T, r *netRun) {
			l := r.c.leaders()
			n, ok := l[events.KVStream(events.DefaultBucket)]
			if !ok {
				t.Fatalf("no leader of the bucket: %v", l)
			}
			r.moveLeader(t, events.StreamName, n)
			if os.Getenv("ATTRD_NETSPLIT_META") == "away" {
				r.moveMeta(t, (n+1)%3)
			} else if os.Getenv("ATTRD_NETSPLIT_META") == "cut" {
				r.moveMeta(t, n)
			}
			t.Logf("leaders before the cut: %v", r.c.leaders())
			r.alignRaw(t)
			cutAt := time.Now()
			r.c.cut(n, false)
			r.timeline(t, cutAt, 15*time.Second, n)
			r.c.heal(n)
			r.reportCut(t, "leader cut off", n, cutAt, time.Now())
		}, nil},
		{"lease holder's node cut off", false, func(t *testing.T, r *netRun) {
			n := r.holderNode(t)
			r.alignRaw(t)
			cutAt := time.Now()
			r.c.cut(n, false)
			time.Sleep(15 * time.Second)
			r.c.heal(n)
			r.reportCut(t, "lease holder's node cut off", n, cutAt, time.Now())
		}, nil},
		{"meta leader cut off", false, func(t *testing.T, r *netRun) {
			// The meta group's leader alone on the cut node: the streams' leaders and
			// the lease holder's node elsewhere. No group a write needs loses its leader.
			h := r.holderNode(t)
			m := (h + 1) % 3
			r.moveMeta(t, m)
			r.moveLeader(t, events.KVStream(events.DefaultBucket), h)
			r.moveLeader(t, events.StreamName, h)
			t.Logf("leaders before the cut: %v; the lease holder's node %d", r.c.leaders(), h)
			r.alignRaw(t)
			cutAt := time.Now()
			r.c.cut(m, false)
			time.Sleep(15 * time.Second)
			healAt := time.Now()
			r.c.heal(m)
			// Writes need no meta leader (the meta group elects in 4–9 s): the
			// majority side goes on, but for a moment.
			for i := range 3 {
				if began, d := r.load.longestGap(i, cutAt, healAt); i != m && d > metaCutBound {
					liveness(t, "meta leader cut off: writes through node %d stopped for %s from %s, bound %s; its attempts and log:",
						i, d.Round(time.Millisecond), began.Format("15:04:05.000"), metaCutBound)
					r.load.logAttempts(t, i, began, began.Add(d))
					r.c.logs.dump(t, i, began, began.Add(d))
				}
			}
			r.reportCut(t, "meta leader cut off", m, cutAt, healAt)
		}, nil},
		{"consumer's node cut off", false, func(t *testing.T, r *netRun) {
			// The projector's consumer and the meta group's leader on the cut node, the
			// streams' leaders and the lease holder on another: the run loses its
			// consumer and no new one can be created until the meta group elects.
			h := r.holderNode(t)
			c := r.consumerOff(t, h)
			r.moveMeta(t, c)
			r.moveLeader(t, events.KVStream(events.DefaultBucket), h)
			r.moveLeader(t, events.StreamName, h)
			t.Logf("leaders before the cut: %v; the lease holder's node %d, the consumer's %d", r.c.leaders(), h, c)
			r.alignRaw(t)
			cutAt := time.Now()
			r.c.cut(c, false)
			time.Sleep(15 * time.Second)
			healAt := time.Now()
			r.c.heal(c)
			t.Logf("the lease holder's instance during the cut:")
			r.c.logs.dump(t, h, cutAt, healAt)
			r.reportCut(t, "consumer's node cut off", c, cutAt, healAt)
		}, func(c *Config) {
			// A run puts its consumer on its own server (projector/placement.go),
			// unless it cannot: left where the server put it, as then.
			c.ProjectorHooks.ConsumerAnywhere = true
		}},
		{"one-way cut of the leader", false, func(t *testing.T, r *netRun) {
			n := r.c.leaders()[events.KVStream(events.DefaultBucket)]
			r.moveLeader(t, events.StreamName, n)
			r.alignRaw(t)
			cutAt := time.Now()
			r.c.cut(n, true) // it hears nobody; the others hear it
			time.Sleep(15 * time.Second)
			r.c.heal(n)
			r.reportCut(t, "one-way cut of the leader", n, cutAt, time.Now())
		}, nil},
		{"flapping", false, func(t *testing.T, r *netRun) {
			rng := rand.New(rand.NewPCG(7, 7))
			r.alignRaw(t)
			start, cut := time.Now(), -1
			var cuts []string
			for time.Since(start) < time.Minute {
				if cut >= 0 {
					r.c.heal(cut)
				}
				cut = rng.IntN(3)
				r.c.cut(cut, false)
				cuts = append(cuts, fmt.Sprintf("%s n%d", time.Now().Format("15:04:05.000"), cut))
				time.Sleep(3 * time.Second)
			}
			r.c.heal(cut)
			// Some node is always on a majority side: the longest stretch without an
			// acknowledged write through any node is the majority side's outage.
			began, worst := r.load.longestGap(-1, start, time.Now())
			_, rawWorst := r.raw.longestGap(-1, start, time.Now())
			// NATS's own part of attrd's stretch: the time in it when attrd's groups
			// took no write (flapping leaves them a few seconds between outages).
			natsThen := r.groups.downWithin(began, began.Add(worst))
			t.Logf("flapping: the longest stretch without a write through any node %s, from %s (attrd's groups took none for %s of it; raw NATS's longest stretch %s); cuts: %s",
				worst.Round(time.Millisecond), began.Format("15:04:05.000"), natsThen.Round(time.Millisecond),
				rawWorst.Round(time.Millisecond), strings.Join(cuts, ", "))
			if ok, why := natsVerdict(worst, natsThen, 10*time.Second); ok && why != "" {
				t.Logf("flapping: %s", why)
			} else if !ok {
				liveness(t, "flapping: writes stopped everywhere for %s, bound 10 s (%s); the nodes' logs then:", worst.Round(time.Millisecond), why)
				t.Logf("attrd's groups took writes %s", r.groups.spans(began.Add(-5*time.Second), began.Add(worst+time.Second)))
				for i := range 3 {
					r.c.logs.dump(t, i, began, began.Add(worst))
					r.c.serverLines(t, i, began, began.Add(worst), "leader")
				}
			}
			r.reportCut(t, "flapping, the last cut", cut, time.Now().Add(-3*time.Second), time.Now())
		}, nil},
	}
	// ATTRD_NETSPLIT=all runs every scenario; another value, those whose name has it.
	pick := os.Getenv("ATTRD_NETSPLIT")
	for _, sc := range scenarios {
		if !(pick == "" && sc.quick || pick == "all" || pick != "" && strings.Contains(sc.name, pick)) {
			continue
		}
		t.Run(sc.name, func(t *testing.T) {
			var mods []func(*Config)
			if sc.config != nil {
				mods = append(mods, sc.config)
			}
			r := startNetRun(t, mods...)
			time.Sleep(3 * time.Second) // load before the cut
			sc.run(t, r)
			r.verify(t)
		})
	}
}

// timeline waits d, logging when the majority side gets new leaders and a new lease
// holder, and when each node first writes again (evidence for the outages).
func (r *netRun) timeline(t *testing.T, from time.Time, d time.Duration, cut int) {
	seen := map[string]string{}
	holderAtCut := ""
	time.Sleep(2 * time.Second) // what was in flight at the cut
	for _, inst := range r.insts {
		for _, p := range inst.Projectors() {
			r.appliedAtCut = max(r.appliedAtCut, p.Applied())
		}
	}
	for time.Since(from) < d {
		l := map[string]int{}
		for i := range 3 {
			if i == cut {
				continue
			}
			jsz := r.c.jsz(i, "accounts=true&streams=true")
			if jsz == nil {
				continue
			}
			for _, a := range jsz.AccountDetails {
				for _, sd := range a.Streams {
					if sd.Cluster != nil && sd.Cluster.Leader != "" && sd.Cluster.Leader != fmt.Sprintf("n%d", cut) {
						l[sd.Name], _ = nodeOf(sd.Cluster.Leader)
					}
				}
			}
		}
		for name, n := range l {
			if _, ok := seen[name]; !ok {
				seen[name] = fmt.Sprintf("%s: leader n%d", time.Since(from).Round(10*time.Millisecond), n)
			}
		}
		if _, ok := seen["lease free"]; !ok {
			probe := r.insts[(cut+1)%3]
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			js, _ := jetstream.New(probe.apiConn)
			if kvs, err := js.Stream(ctx, events.KVStream(events.DefaultBucket)); err == nil {
				if rec, held, err := projector.Holder(ctx, kvs, events.DefaultBucket, "0"); err == nil {
					switch {
					case holderAtCut == "" && held:
						holderAtCut = rec.Owner
					case !held || rec.Owner != holderAtCut:
						seen["lease free"] = time.Since(from).Round(10 * time.Millisecond).String()
					}
				}
			}
			cancel()
		}
		for i, inst := range r.insts {
			key := fmt.Sprintf("instance %d folds", i)
			if _, ok := seen[key]; !ok {
				for _, p := range inst.Projectors() {
					if p.Applied() > r.appliedAtCut {
						seen[key] = time.Since(from).Round(10 * time.Millisecond).String()
					}
				}
			}
		}
		for i := range 3 {
			key := fmt.Sprintf("node %d writes", i)
			if _, ok := seen[key]; !ok {
				if f := r.load.firstWrite(i, from.Add(500*time.Millisecond)); !f.IsZero() {
					seen[key] = f.Sub(from).Round(10 * time.Millisecond).String()
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("after the cut of node %d at %s: %v", cut, from.Format("15:04:05.000"), seen)
	if os.Getenv("ATTRD_NETSPLIT_ATTEMPTS") != "" {
		for i := range 3 {
			r.load.logAttempts(t, i, from, from.Add(d))
		}
	}
}

// metaGroup names the meta group in leaders' map.
const metaGroup = "meta"

// moveMeta asks the meta group's leader to step down in favour of node n, until n
// leads it (the system account's request).
func (r *netRun) moveMeta(t *testing.T, n int) {
	t.Helper()
	r.moveGroup(t, metaGroup, "sys", "$JS.API.META.LEADER.STEPDOWN", n)
}

// moveLeader asks stream's leader to step down in favour of node n, until n leads it.
func (r *netRun) moveLeader(t *testing.T, stream string, n int) {
	t.Helper()
	r.moveGroup(t, stream, "attrd", "$JS.API.STREAM.LEADER.STEPDOWN."+stream, n)
}

// moveGroup sends a Raft group's step-down request (as user, to subject) preferring
// node n, until n leads the group as leaders names it.
func (r *netRun) moveGroup(t *testing.T, group, user, subject string, n int) {
	t.Helper()
	nc, err := nats.Connect(r.c.url(n), nats.UserInfo(user, r.c.intPW))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	for deadline := time.Now().Add(30 * time.Second); r.c.leaders()[group] != n; time.Sleep(500 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s would not move its leader to node %d: %v", group, n, r.c.leaders())
		}
		req := fmt.Sprintf(`{"placement":{"preferred":"n%d"}}`, n)
		if _, err := nc.Request(subject, []byte(req), 5*time.Second); err != nil && !errors.Is(err, nats.ErrTimeout) {
			t.Logf("step down %s: %v", group, err)
		}
	}
}
