package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/api/natsapi"
	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
)

// permissionErrors connects to url and collects the permission violations the server
// reports on the connection.
func permissionErrors(t *testing.T, url string, opts ...nats.Option) (*nats.Conn, <-chan error) {
	t.Helper()
	errs := make(chan error, 64)
	opts = append(opts, nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		if errors.Is(err, nats.ErrPermissionViolation) {
			select {
			case errs <- err:
			default:
			}
		}
	}))
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc, errs
}

func expectViolation(t *testing.T, errs <-chan error, what string) {
	t.Helper()
	select {
	case <-errs:
	case <-time.After(2 * time.Second):
		t.Fatalf("%s: no permission violation", what)
	}
}

func streamCount(t *testing.T, s *Server) uint64 {
	js, _ := jetstream.New(s.apiConn)
	st, err := js.Stream(context.Background(), events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// TestClientsReachOnlyTheRequestSubjects: from the client account (no credentials on
// the loopback default) every contract request and micro discovery work, and nothing
// else does: no KV read or write, no stream read, no forged event, no subscription to
// request subjects (other clients' passwords).
func TestClientsReachOnlyTheRequestSubjects(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	nc, errs := permissionErrors(t, f.srv.ClientURL())

	// The contract works.
	c := client.New(nc, "CRM")
	s := mustLogin(t, c, "alice", "alice-pw")
	u, _ := s.User(ctx)
	expectCode(t, u.Attr.Set(ctx, "ok", 1), noError)
	// micro discovery works across the accounts.
	rep, err := nc.Request("$SRV.INFO.attrd", nil, 2*time.Second)
	if err != nil || !strings.Contains(string(rep.Data), `"name":"attrd"`) {
		t.Fatalf("$SRV.INFO.attrd: %v %v", err, rep)
	}

	// JetStream is not there: no bucket, no stream.
	js, _ := jetstream.New(nc)
	jctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := js.KeyValue(jctx, events.DefaultBucket); err == nil {
		t.Fatal("the client account opened the projection bucket")
	}
	expectViolation(t, errs, "JetStream API")
	if _, err := js.Stream(jctx, events.StreamName); err == nil {
		t.Fatal("the client account opened the event stream")
	}
	// Publishing to a KV subject or an event subject is refused, and nothing is stored.
	before := streamCount(t, f.srv)
	kv := mustKV(t, f.srv)
	evData, _ := events.Encode(&events.Event{ID: events.NewID(), Type: events.AttrSet, Version: events.SchemaVersion,
		UserID: f.aliceID, Time: time.Now().UnixNano(), Attrs: []events.AttrItem{{Name: "forged", Value: []byte("1")}}})
	for _, subj := range []string{events.KVSubject(events.DefaultBucket, events.AttrKey(f.aliceID, "", "forged")),
		events.EventsPrefix + "." + f.aliceID + ".attr"} {
		if err := nc.Publish(subj, evData); err != nil {
			t.Fatal(err)
		}
		expectViolation(t, errs, "publish to "+subj)
	}
	nc.Flush()
	if _, err := kv.Get(ctx, events.AttrKey(f.aliceID, "", "forged")); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("a forged KV write landed: %v", err)
	}
	if after := streamCount(t, f.srv); after != before {
		t.Fatalf("the stream grew from %d to %d messages", before, after)
	}
	// Nobody can listen on the request subjects: other clients' logins carry passwords.
	sub, err := nc.SubscribeSync("attrd.user.>")
	if err != nil {
		t.Fatal(err)
	}
	expectViolation(t, errs, "subscribe to attrd.user.>")
	mustLogin(t, f.c, "alice", "alice-pw")
	if m, err := sub.NextMsg(300 * time.Millisecond); err == nil {
		t.Fatalf("a client saw another client's request: %q", m.Data)
	}
}

// TestClientUsersAreConfinedToTheirOwnInboxes: with --client-users, a service connects
// with its user and inbox prefix; another service cannot subscribe to its replies;
// anonymous clients are refused.
func TestClientUsersAreConfinedToTheirOwnInboxes(t *testing.T) {
	users := []embedded.ClientUser{{Name: "svc-a", Password: "a-secret"}, {Name: "svc-b", Password: "b-secret"}}
	srv := mustStart(t, func(c *Config) { c.ClientUsers = users })
	ctx := ctxT(t)
	if _, err := nats.Connect(srv.ClientURL()); err == nil {
		t.Fatal("an anonymous client connected although client users are configured")
	}
	a, _ := permissionErrors(t, srv.ClientURL(), nats.UserInfo("svc-a", "a-secret"), nats.CustomInboxPrefix(embedded.InboxPrefix("svc-a")))
	b, errsB := permissionErrors(t, srv.ClientURL(), nats.UserInfo("svc-b", "b-secret"), nats.CustomInboxPrefix(embedded.InboxPrefix("svc-b")))
	spy, err := b.SubscribeSync(embedded.InboxPrefix("svc-a") + ".>")
	if err != nil {
		t.Fatal(err)
	}
	expectViolation(t, errsB, "svc-b subscribing to svc-a's inbox")
	if _, err := b.SubscribeSync(">"); err != nil {
		t.Fatal(err)
	}
	expectViolation(t, errsB, "svc-b subscribing to everything")
	s := mustLogin(t, client.New(a, "CRM"), "admin", adminPassword)
	if _, err := s.User(ctx); err != nil {
		t.Fatalf("svc-a's requests: %v", err)
	}
	if m, err := spy.NextMsg(300 * time.Millisecond); err == nil {
		t.Fatalf("svc-b saw svc-a's reply: %q", m.Data)
	}
}

func TestANonLoopbackClientListenerNeedsClientUsers(t *testing.T) {
	_, err := Start(context.Background(), Config{DataDir: t.TempDir(), HTTPAddr: "127.0.0.1:0", NATSAddr: "0.0.0.0:0",
		Password: fastPasswords, Logger: testLogger()})
	if err == nil || !strings.Contains(err.Error(), "--client-users") {
		t.Fatalf("start on 0.0.0.0 without client users: %v", err)
	}
}

// TestTheInternalAccountIsOnlyForAttrd: the in-process user cannot connect over TCP,
// the operator credential is mode 0600, and the tools work with it only.
func TestTheInternalAccountIsOnlyForAttrd(t *testing.T) {
	dir := t.TempDir()
	f := newFixture(t, func(c *Config) { c.DataDir = dir })
	if _, err := nats.Connect(f.srv.ClientURL(), nats.UserInfo(embedded.InternalUser, "guess")); err == nil {
		t.Fatal("connected as the in-process user over TCP")
	}
	path := credentialFile(dir)
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("credential file %s: %v %v", path, st, err)
	}
	code, out := runCmd(t, "history", "--user", "alice", "--nats-url", f.srv.ClientURL(), "--creds", filepath.Join(t.TempDir(), "none"))
	if code == 0 || !strings.Contains(out, "--creds") {
		t.Fatalf("history without the credential: exit %d\n%s", code, out)
	}
	if code, out := runCmd(t, "history", "--user", "alice", "--nats-url", f.srv.ClientURL(), "--creds", path); code != 0 {
		t.Fatalf("history with the credential: exit %d\n%s", code, out)
	}
}

func TestEveryOperationIsAnImportedServiceSubjectAndNoneTwice(t *testing.T) {
	imported := append(slices.Clone(embedded.ServiceSubjects), embedded.WatchSubjects...)
	subjects := []string{natsapi.RenewSubjectPrefix + events.NewID()}
	for _, op := range append(api.Ops(), api.OpUserAttrWatch, api.OpSessionAttrWatch) {
		subjects = append(subjects, natsapi.Subject(op))
	}
	for _, subj := range subjects {
		var by []string
		for _, imp := range imported {
			if subjectMatches(imp, subj) {
				by = append(by, imp)
			}
		}
		if len(by) != 1 {
			t.Errorf("%s is imported by %v: exactly one import must match it", subj, by)
		}
		if strings.HasPrefix(subj, events.EventsPrefix+".") || strings.HasPrefix(subj, events.FeedPrefix+".") {
			t.Errorf("%s is under the event stream's or the feed's subjects", subj)
		}
	}
	for _, internal := range []string{events.FeedSubject(0), events.EventsPrefix + ".X.attr"} {
		for _, imp := range imported {
			if subjectMatches(imp, internal) {
				t.Errorf("the import %s reaches %s", imp, internal)
			}
		}
	}
	for _, w := range embedded.WatchSubjects {
		if !slices.ContainsFunc(subjects, func(s string) bool { return s == w }) {
			t.Errorf("the streamed import %s is no watch operation", w)
		}
	}
}

// subjectMatches reports whether a NATS subject filter (with * and >) matches subject.
func subjectMatches(filter, subject string) bool {
	f, s := strings.Split(filter, "."), strings.Split(subject, ".")
	for i, tok := range f {
		if tok == ">" {
			return len(s) > i
		}
		if i >= len(s) || tok != "*" && tok != s[i] {
			return false
		}
	}
	return len(f) == len(s)
}

// TestAStoreOfTheGlobalAccountMovesToTheInternalOne: data written before the two
// accounts is still there after the upgrade.
func TestAStoreOfTheGlobalAccountMovesToTheInternalOne(t *testing.T) {
	dir := t.TempDir()
	ns, err := embedded.Start(embedded.Options{DataDir: filepath.Join(dir, "nats")})
	if err != nil {
		t.Fatal(err)
	}
	nc, _ := nats.Connect(ns.ClientURL())
	js, _ := jetstream.New(nc)
	_, kv, err := events.EnsureStore(context.Background(), js, events.DefaultStoreConfig())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), "n.old", []byte("kept")); err != nil {
		t.Fatal(err)
	}
	nc.Close()
	ns.Shutdown()
	ns.WaitForShutdown()
	s := mustStart(t, func(c *Config) { c.DataDir = dir })
	e, err := mustKV(t, s).Get(context.Background(), "n.old")
	if err != nil || string(e.Value()) != "kept" {
		t.Fatalf("after the move: %v %v", e, err)
	}
}

// TestAttrdOnAnExternalNATSWithCredentials: a NATS server with the two-account layout
// stands for a cluster; attrd connects to its internal account with a user and
// password, and clients of the client account are served.
func TestAttrdOnAnExternalNATSWithCredentials(t *testing.T) {
	ns, accts := startAccountsNATS(t, "127.0.0.1:0")
	// Without credentials attrd lands in the client account and cannot start.
	short, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := Start(short, Config{DataDir: t.TempDir(), HTTPAddr: "127.0.0.1:0", NATSURL: ns.ClientURL(), Replicas: 1,
		Password: fastPasswords, Logger: testLogger()}); err == nil {
		t.Fatal("attrd started without credentials on a NATS with accounts")
	}
	s := mustStart(t, func(c *Config) {
		c.NATSURL, c.Replicas = ns.ClientURL(), 1
		c.NATSOptions = []nats.Option{nats.UserInfo(embedded.OperatorUser, accts.OperatorPassword)}
	})
	sess := mustLogin(t, mustClient(t, s), "admin", adminPassword)
	u, _ := sess.User(ctxT(t))
	expectCode(t, u.Attr.Set(ctxT(t), "over-tcp", 1), noError)
}

// TestHTTPSServesWithTheGivenCertificate: --tls-cert and --tls-key serve HTTPS.
func TestHTTPSServesWithTheGivenCertificate(t *testing.T) {
	dir := t.TempDir()
	certPEM, keyPEM := selfSigned(t)
	cert, key := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(cert, certPEM, 0o600)
	os.WriteFile(key, keyPEM, 0o600)
	s := mustStart(t, func(c *Config) { c.TLSCert, c.TLSKey = cert, key })
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := hc.Get("https://" + s.HTTPAddr() + "/livez")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS == nil {
		t.Fatalf("HTTPS /livez: %d %v", resp.StatusCode, resp.TLS)
	}
	if _, err := Start(ctxT(t), Config{DataDir: t.TempDir(), HTTPAddr: "127.0.0.1:0", NATSAddr: "127.0.0.1:0", TLSCert: cert,
		TLSKey: filepath.Join(dir, "missing.pem"), Password: fastPasswords, Logger: testLogger()}); err == nil {
		t.Fatal("started with a missing TLS key")
	}
}

// selfSigned makes a certificate for 127.0.0.1.
func selfSigned(t *testing.T) (certPEM, keyPEM []byte) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "attrd-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(k)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}

// TestBruteForceIsThrottledCheaplyAndSparesOthers: hundreds of wrong passwords for one
// username are refused, after the first few, without hashing (fast even with the real
// argon2id cost); another user's correct login is not slowed; the throttle holds after
// a restart; a success resets a username's count.
func TestBruteForceIsThrottledCheaplyAndSparesOthers(t *testing.T) {
	dir := t.TempDir()
	real := func(c *Config) { c.DataDir, c.Password, c.PasswordConcurrency = dir, api.DefaultPasswordParams, 1 }
	f := newFixture(t, real)
	ctx := ctxT(t)
	_, _ = f.regularUser(t, "bob")
	start := time.Now()
	refused := 0
	for i := 0; i < 300; i++ {
		if _, err := f.c.Login(ctx, "alice", "guess"); events.CodeOf(err) == events.CodeNotAllowed {
			refused++
		}
	}
	took := time.Since(start)
	if refused != 300 {
		t.Fatalf("%d of 300 wrong passwords refused", refused)
	}
	// Hashing all 300 at ~20-50 ms each on one slot would take 6-15 s.
	if took > 3*time.Second {
		t.Fatalf("300 wrong passwords took %s: they were hashed", took)
	}
	begin := time.Now()
	mustLogin(t, f.c, "bob", "bob-pw")
	if d := time.Since(begin); d > time.Second {
		t.Fatalf("bob's login took %s during alice's brute force", d)
	}
	// The right password is refused too while alice is throttled: the password is not
	// even checked.
	if _, err := f.c.Login(ctx, "alice", "alice-pw"); events.CodeOf(err) != events.CodeNotAllowed {
		t.Fatalf("alice's own login while throttled: %v", err)
	}
	// After a restart the counts are still there (they are in the bucket): one more wrong
	// password throttles alice at once, where fresh counts would allow
	// ThrottleFreeUserFailures of them (and then her right one). Whether the first
	// window has passed meanwhile does not matter.
	f.srv.Close()
	s2 := mustStart(t, real)
	c2 := mustClient(t, s2)
	if _, err := c2.Login(ctx, "alice", "wrong"); events.CodeOf(err) != events.CodeNotAllowed {
		t.Fatalf("a wrong password after a restart: %v", err)
	}
	if _, err := c2.Login(ctx, "alice", "alice-pw"); events.CodeOf(err) != events.CodeNotAllowed {
		t.Fatalf("after a restart, the counts were lost: %v", err)
	}
	// bob: a few failures, then a success resets the count: as many failures again do
	// not throttle him.
	for round := 0; round < 2; round++ {
		for i := 0; i < api.ThrottleFreeUserFailures-1; i++ {
			c2.Login(ctx, "bob", "wrong")
		}
		if _, err := c2.Login(ctx, "bob", "bob-pw"); err != nil {
			t.Fatalf("round %d: bob's login after %d failures: %v", round, api.ThrottleFreeUserFailures-1, err)
		}
	}
}

// TestOneAddressHasABudgetOfFailures: spraying many usernames from one address is
// throttled by the address; other addresses go on.
func TestOneAddressHasABudgetOfFailures(t *testing.T) {
	f := newFixture(t, nil)
	body := func(user string) map[string]any {
		return map[string]any{"username": user, "password": "x", "current_app": "CRM", "remote_addr": "198.51.100.7"}
	}
	for i := 0; i < api.ThrottleFreeAddrFailures+1; i++ {
		rawJSON(t, f.srv, "user.login", body(fmt.Sprintf("spray-%d", i)))
	}
	// The address is throttled now: alice's right password from it is refused ...
	ok := body("alice")
	ok["password"] = "alice-pw"
	if _, out := rawJSON(t, f.srv, "user.login", ok); subStatus(out) != "E005001" {
		t.Fatalf("from the throttled address: %v", out)
	}
	// ... and from elsewhere accepted.
	ok["remote_addr"] = "198.51.100.8"
	if _, out := rawJSON(t, f.srv, "user.login", ok); out["status"] != "ok" {
		t.Fatalf("from another address: %v", out)
	}
}
