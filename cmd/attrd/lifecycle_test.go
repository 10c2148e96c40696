package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
	"github.com/attrd/attrd/projector"
)

// TestLateDecisionIsOutcomeUnknownAndTheRequestIDLearnsIt: a decision that does not come
// within the timeout is E008004 (HTTP 503), never a guess; the change still applies, and
// a retry with the same request id returns its real outcome.
func TestLateDecisionIsOutcomeUnknownAndTheRequestIDLearnsIt(t *testing.T) {
	slow, hooks := slowProjector(700*time.Millisecond, nil)
	f := newFixture(t, func(c *Config) { c.ProjectorHooks = hooks; c.DecisionTimeout = 300 * time.Millisecond })
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	slow.Store(true)
	err := u.Attr.Create(ctx, "late", 1, client.RequestID("late-1"))
	expectCode(t, err, events.CodeOutcomeUnknown)
	_, body := rawJSON(t, f.srv, "user.attr.create", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "name": "late2", "value": 1})
	if subStatus(body) != "E008004" {
		t.Fatalf("late decision over the wire: %v", body)
	}
	slow.Store(false)
	time.Sleep(800 * time.Millisecond) // let the slow batches finish (the point is their lateness)
	expectCode(t, u.Attr.Create(ctx, "late", 1, client.RequestID("late-1")), noError)
	if ok, _ := u.Attr.Exists(ctx, "late"); !ok {
		t.Fatal("the change whose outcome was unknown did not apply")
	}
	hdr, _ := rawJSON(t, f.srv, "user.attr.create", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "name": "late3", "value": 1})
	if hdr.Get("Nats-Service-Error-Code") != "" {
		t.Fatalf("after the slowness, a plain create failed: %v", hdr)
	}
}

// TestShutdownAnswersRequestsInFlight: Close stops taking requests but answers the ones
// it has, with their real outcome.
func TestShutdownAnswersRequestsInFlight(t *testing.T) {
	started := make(chan struct{}, 16)
	slow, hooks := slowProjector(300*time.Millisecond, started)
	f := newFixture(t, func(c *Config) { c.ProjectorHooks = hooks })
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	slow.Store(true)
	done := make(chan error, 1)
	go func() { done <- u.Attr.Create(ctx, "in-flight", 1) }()
	<-started // the event is in the log and being folded
	if err := f.srv.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("the request in flight during shutdown got %v, want its ok", err)
	}
}

// TestAProjectorCrashIsSurvivedAndTheWaitingRequestGetsItsAnswer: the projector stops
// after writing a batch but before answering; the server starts it again, it recovers
// the batch from its intent record and answers the request still waiting.
func TestAProjectorCrashIsSurvivedAndTheWaitingRequestGetsItsAnswer(t *testing.T) {
	var armed, crashed atomic.Bool
	hooks := projector.Hooks{AfterWrites: func(first, last uint64) error {
		if armed.Load() && crashed.CompareAndSwap(false, true) {
			return errTest
		}
		return nil
	}}
	f := newFixture(t, func(c *Config) { c.ProjectorHooks = hooks })
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	armed.Store(true)
	start := time.Now()
	expectCode(t, u.Attr.Create(ctx, "survivor", 1), noError)
	if !crashed.Load() {
		t.Fatal("the projector did not crash: the test tests nothing")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("the answer took %v: it came from the timeout, not the restarted projector", d)
	}
	// Applied once: a second create is refused, and the history has one accepted create.
	expectCode(t, u.Attr.Create(ctx, "survivor", 2), events.CodeAttrExists)
	evs, _ := historyOf(t, f, f.alice.UST, map[string]any{"name": "survivor"})
	if len(evs) != 2 || evs[0]["decision"] != "accepted" || evs[1]["code"] != "E009001" {
		t.Fatalf("history after the crash: %v", evs)
	}
}

// TestServesOnAnExistingNATSServer: with --nats-url attrd embeds nothing; with no key
// file there, encrypt:true is refused rather than stored plain.
func TestServesOnAnExistingNATSServer(t *testing.T) {
	ns, err := embedded.Start(embedded.Options{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	s := mustStart(t, func(c *Config) { c.NATSURL, c.Replicas = ns.ClientURL(), 1 })
	if s.ns != nil {
		t.Fatal("attrd embedded a server although given --nats-url")
	}
	sess := mustLogin(t, mustClient(t, s), "admin", adminPassword)
	u, _ := sess.User(ctxT(t))
	expectCode(t, u.Attr.Create(ctxT(t), "plain", 1), noError)
	expectCode(t, u.Attr.Update(ctxT(t), "plain", 2), noError) // keeps "plain" plain: no key needed
	expectCode(t, u.Attr.Set(ctxT(t), "new", 1), noError)
	expectCode(t, u.Attr.Create(ctxT(t), "secret", 1, client.Encrypt(true)), events.CodeInvalidInput)
	if _, err := os.Stat(filepath.Join(s.cfg.DataDir, "encryption.key")); err == nil {
		t.Fatal("a key was generated for an external NATS")
	}
	s.Close()

	// An attribute encrypted while a key was configured cannot be updated without one:
	// keeping it encrypted needs the key, and storing it plain would break its setting.
	keyFile := filepath.Join(t.TempDir(), "key")
	if err := sealed.GenerateKeyFile(keyFile); err != nil {
		t.Fatal(err)
	}
	withKey := mustStart(t, func(c *Config) { c.NATSURL, c.Replicas, c.KeyFile = ns.ClientURL(), 1, keyFile })
	sess = mustLogin(t, mustClient(t, withKey), "admin", adminPassword)
	u, _ = sess.User(ctxT(t))
	expectCode(t, u.Attr.Create(ctxT(t), "secret", 1, client.Encrypt(true)), noError)
	withKey.Close()
	keyless := mustStart(t, func(c *Config) { c.NATSURL, c.Replicas = ns.ClientURL(), 1 })
	u = mustClient(t, keyless).Resume(sess.UST).UserByID(u.ID)
	expectCode(t, u.Attr.Update(ctxT(t), "secret", 2), events.CodeInvalidInput)
	expectCode(t, u.Attr.Update(ctxT(t), "secret", 2, client.Encrypt(false)), noError) // an explicit choice is fine
}

// TestASlowDecisionWithARequestIDAnswersWhenDecided: a request with a request id whose
// decision is slower than its probe finds its own first publish in the stream's
// duplicate ack, and answers as soon as the decision comes (not when the lease next
// reports the log folded, up to 0.7 s later).
func TestASlowDecisionWithARequestIDAnswersWhenDecided(t *testing.T) {
	var released atomic.Int64 // when the held batch went on (Unix ns)
	slow, hold := slowProjector(400*time.Millisecond, nil)
	hooks := projector.Hooks{BeforeCheckpoint: func(first, last uint64) error {
		err := hold.BeforeCheckpoint(first, last)
		released.Store(time.Now().UnixNano())
		return err
	}}
	f := newFixture(t, func(c *Config) { c.ProjectorHooks = hooks })
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	slow.Store(true)
	for i := range 3 {
		name := fmt.Sprintf("slow-%d", i)
		expectCode(t, u.Attr.Create(ctx, name, i, client.RequestID(name)), noError)
		if after := time.Since(time.Unix(0, released.Load())); after > 150*time.Millisecond {
			t.Errorf("%s: answered %s after its batch went on", name, after)
		} else {
			t.Logf("%s: answered %s after its batch went on", name, after)
		}
	}
	slow.Store(false)
	names, err := u.Attr.Names(ctx)
	if err != nil || len(names) != 3 {
		t.Fatalf("names %v, %v: want the three, once each", names, err)
	}
}

// slowProjector returns projector hooks that, while slow is set, hold every batch for d
// before its intent record, first signalling started (if not nil).
func slowProjector(d time.Duration, started chan<- struct{}) (slow *atomic.Bool, hooks projector.Hooks) {
	slow = &atomic.Bool{}
	hooks.BeforeCheckpoint = func(first, last uint64) error {
		if slow.Load() {
			if started != nil {
				started <- struct{}{}
			}
			time.Sleep(d)
		}
		return nil
	}
	return slow, hooks
}
