package projector_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/deploy/embedded/embeddedtest"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// env is an embedded server with the stream and the bucket.
type env struct {
	nc    *nats.Conn
	js    jetstream.JetStream
	kv    jetstream.KeyValue
	store events.StoreConfig
}

func mustEnv(t *testing.T) *env { return mustEnvWith(t, embedded.Options{}) }

func mustEnvWith(t *testing.T, o embedded.Options) *env {
	t.Helper()
	return mustEnvStore(t, o, events.DefaultStoreConfig())
}

// mustEnvStore starts an embedded server with o and creates store's stream and bucket.
func mustEnvStore(t *testing.T, o embedded.Options, store events.StoreConfig) *env {
	t.Helper()
	_, nc := embeddedtest.Start(t, o)
	js, _ := jetstream.New(nc)
	_, kv, err := events.EnsureStore(context.Background(), js, store)
	if err != nil {
		t.Fatal(err)
	}
	return &env{nc: nc, js: js, kv: kv, store: store}
}

// gen builds valid events about a few users and sessions.
type gen struct {
	t     time.Time
	users []string
	sess  map[string][]string // user -> sessions
	rk    int
}

func newGen() *gen { return &gen{t: time.Now(), sess: map[string][]string{}} }

func (g *gen) next(typ events.Type) *events.Event {
	g.t = g.t.Add(time.Millisecond)
	return &events.Event{ID: events.NewID(), Type: typ, Version: events.SchemaVersion, Time: g.t.UnixNano(), App: "CRM"}
}

func (g *gen) user(name string) *events.Event {
	e := g.next(events.UserCreated)
	e.UserID = events.NewID()
	e.User = &events.UserData{Username: name, PasswordHash: "x", Approved: true}
	g.users = append(g.users, e.UserID)
	return e
}

func (g *gen) login(uid string) *events.Event {
	e := g.next(events.SessionCreated)
	e.UserID, e.SessionID = uid, events.SessionID(events.NewID())
	e.ExpiresAt = g.t.Add(time.Hour).UnixNano()
	g.sess[uid] = append(g.sess[uid], e.SessionID)
	return e
}

// attr is an attribute event by uid on its own attributes (sid "": user attributes).
func (g *gen) attr(typ events.Type, uid, sid string, names ...string) *events.Event {
	e := g.next(typ)
	e.UserID, e.SessionID = uid, sid
	e.Actor, e.ActorSession = uid, g.sess[uid][0]
	for _, n := range names {
		e.Attrs = append(e.Attrs, events.AttrItem{Name: n, Value: []byte(fmt.Sprintf("%q", n+"@"+e.ID))})
	}
	return e
}

// publish appends events and returns the stream sequence of the last.
func (en *env) publish(t *testing.T, evs ...*events.Event) uint64 {
	t.Helper()
	var last uint64
	for _, ev := range evs {
		data, err := events.Encode(ev)
		if err != nil {
			t.Fatal(err)
		}
		ack, err := en.js.Publish(context.Background(), events.Layout{}.Subject(ev), data, jetstream.WithMsgID(ev.ID))
		if err != nil {
			t.Fatal(err)
		}
		last = ack.Sequence
	}
	return last
}

// run starts a projector and returns a stop function that returns Run's error.
func (en *env) run(t *testing.T, cfg projector.Config) (*projector.Projector, func() error) {
	p, done, cancel := en.start(t, cfg)
	return p, func() error { cancel(); return <-done }
}

// start starts a projector; done yields Run's error when it returns by itself or
// after cancel.
func (en *env) start(t *testing.T, cfg projector.Config) (*projector.Projector, <-chan error, context.CancelFunc) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quiet
	}
	p, err := projector.New(en.nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	return p, done, cancel
}

// within waits for a projector to return by itself.
func within(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(15 * time.Second):
		t.Fatal("the projector did not return")
		return nil
	}
}

// waitApplied waits until p has folded seq.
func waitApplied(t *testing.T, p *projector.Projector, seq uint64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for p.Applied() < seq {
		if time.Now().After(deadline) {
			t.Fatalf("projector applied %d, want %d", p.Applied(), seq)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// bucketRecords returns every record in a bucket but the intent and recording records.
func bucketRecords(t *testing.T, js jetstream.JetStream, bucket string) map[string][]byte {
	t.Helper()
	ctx := context.Background()
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	out := map[string][]byte{}
	for e := range w.Updates() {
		if e == nil {
			break
		}
		if !strings.HasPrefix(e.Key(), "p.") && !strings.HasPrefix(e.Key(), "r.") {
			out[e.Key()] = e.Value()
		}
	}
	return out
}

// reference folds evs in memory: the decisions and projection a correct projector
// produces (decision records aside).
func reference(evs []*events.Event, firstSeq uint64) ([]events.Decision, map[string][]byte) {
	m := projector.NewMemory()
	var ds []events.Decision
	for i, ev := range evs {
		ds = append(ds, projector.Fold(m.State(), firstSeq+uint64(i), ev, nil, nil))
	}
	return ds, m.Records()
}

func sameRecords(t *testing.T, got, want map[string][]byte) {
	t.Helper()
	for k, w := range want {
		if g, ok := got[k]; !ok || !bytes.Equal(g, w) {
			t.Errorf("key %s: got %x, want %x", k, g, w)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok && !strings.HasPrefix(k, "d.") {
			t.Errorf("unexpected key %s", k)
		}
	}
}

// scenario is a log whose decisions depend on order: a second create of a name is
// E009001, an update of a missing name E009002. Folded twice, the first create would
// turn into E009001 and the update into an accepted one.
func scenario(g *gen) []*events.Event {
	alice := g.user("alice")
	login := g.login(alice.UserID)
	uid, sid := alice.UserID, login.SessionID
	return []*events.Event{alice, login,
		g.attr(events.AttrCreated, uid, "", "a", "b"),
		g.attr(events.AttrCreated, uid, "", "a"),
		g.attr(events.AttrUpdated, uid, "", "c"),
		g.attr(events.AttrCreated, uid, "", "c"),
		g.attr(events.AttrUpdated, uid, "", "c", "a"),
		g.attr(events.AttrSet, uid, sid, "s1", "s2"),
		g.attr(events.AttrDeleted, uid, "", "b", "never"),
		g.attr(events.AttrCreated, uid, "", "b"),
	}
}

var quiet = slogDiscard()

func TestProjectorCrashAtAnyStepAppliesEveryEventExactlyOnce(t *testing.T) {
	steps := map[string]func(h *projector.Hooks, f func(uint64, uint64) error){
		"after the events are stored": func(h *projector.Hooks, f func(uint64, uint64) error) { h.BeforeCheckpoint = f },
		"after the intent record":     func(h *projector.Hooks, f func(uint64, uint64) error) { h.AfterCheckpoint = f },
		"after the KV writes":         func(h *projector.Hooks, f func(uint64, uint64) error) { h.AfterWrites = f },
		"before the ack":              func(h *projector.Hooks, f func(uint64, uint64) error) { h.BeforeAck = f },
	}
	for name, set := range steps {
		t.Run(name, func(t *testing.T) {
			en := mustEnv(t)
			evs := scenario(newGen())
			last := en.publish(t, evs...)
			wantDecisions, wantRecords := reference(evs, 1)

			var hooks projector.Hooks
			crash := errors.New("crash")
			set(&hooks, func(first, l uint64) error { return crash })
			_, done, _ := en.start(t, projector.Config{Bucket: en.store.Bucket, Hooks: hooks})
			if err := within(t, done); !errors.Is(err, crash) {
				t.Fatalf("first run ended with %v, want the crash", err)
			}

			var got []events.Decision
			p, stop2 := en.run(t, projector.Config{Bucket: en.store.Bucket, OnDecision: func(d events.Decision) { got = append(got, d) }})
			waitApplied(t, p, last)
			if err := stop2(); err != nil {
				t.Fatal(err)
			}
			// Crashed before writing anything: the batch is folded afresh. Otherwise the
			// recorded batch is folded again with its recorded decisions.
			if len(got) != len(wantDecisions) {
				t.Fatalf("%d decisions after restart, want %d", len(got), len(wantDecisions))
			}
			for i := range got {
				if got[i].Code != wantDecisions[i].Code || got[i].Seq != wantDecisions[i].Seq {
					t.Errorf("event %d: decision %q, want %q", i+1, got[i].Code, wantDecisions[i].Code)
				}
			}
			sameRecords(t, bucketRecords(t, en.js, en.store.Bucket), wantRecords)
		})
	}
}

func TestProjectorRestartAfterACleanStopReappliesNothing(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	evs := scenario(g)
	last := en.publish(t, evs...)
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket})
	waitApplied(t, p, last)
	stop()
	uid := evs[0].UserID
	more := []*events.Event{g.attr(events.AttrCreated, uid, "", "a"), g.attr(events.AttrUpdated, uid, "", "zz")}
	last = en.publish(t, more...)
	var got []events.Decision
	p, stop = en.run(t, projector.Config{Bucket: en.store.Bucket, OnDecision: func(d events.Decision) { got = append(got, d) }})
	waitApplied(t, p, last)
	stop()
	_, wantRecords := reference(append(evs, more...), 1)
	tail := got[len(got)-2:]
	if tail[0].Code != events.CodeAttrExists || tail[1].Code != events.CodeNoAttr {
		t.Fatalf("decisions after restart: %+v", tail)
	}
	sameRecords(t, bucketRecords(t, en.js, en.store.Bucket), wantRecords)
}

func TestReplayIntoEmptyBucketGivesTheSameProjectionAndDecisions(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	rng := rand.New(rand.NewPCG(1, 2))
	var evs []*events.Event
	for i := 0; i < 4; i++ {
		u := g.user(fmt.Sprintf("user%d", i))
		evs = append(evs, u, g.login(u.UserID), g.login(u.UserID))
	}
	types := []events.Type{events.AttrCreated, events.AttrUpdated, events.AttrSet, events.AttrDeleted}
	for i := 0; i < 600; i++ {
		uid := g.users[rng.IntN(len(g.users))]
		sid := ""
		if rng.IntN(3) == 0 {
			sid = g.sess[uid][rng.IntN(2)]
		}
		var names []string
		for _, n := range rng.Perm(6)[:1+rng.IntN(3)] {
			names = append(names, fmt.Sprintf("n%d", n))
		}
		ev := g.attr(types[rng.IntN(len(types))], uid, sid, names...)
		if rng.IntN(5) == 0 {
			g.rk++
			ev.RequestKey = fmt.Sprintf("rk%d", g.rk)
		}
		evs = append(evs, ev)
		if rng.IntN(50) == 0 { // a logout, or a renewal
			e := g.next(events.SessionEnded)
			if rng.IntN(2) == 0 {
				e = g.next(events.SessionRenewed)
				e.ExpiresAt = g.t.Add(2 * time.Hour).UnixNano()
			}
			e.UserID, e.SessionID, e.Actor = uid, g.sess[uid][1], uid
			e.ActorSession = e.SessionID
			evs = append(evs, e)
		}
	}
	last := en.publish(t, evs...)
	var live []events.Decision
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket, OnDecision: func(d events.Decision) { live = append(live, d) }})
	waitApplied(t, p, last)
	stop()

	replayStore := en.store
	replayStore.Bucket = "replay"
	if _, err := events.EnsureBucket(context.Background(), en.js, replayStore); err != nil {
		t.Fatal(err)
	}
	var replayed []events.Decision
	_, doneR, _ := en.start(t, projector.Config{Bucket: "replay", Durable: "replay", StopAtEnd: true, MaxBatch: 37,
		OnDecision: func(d events.Decision) { replayed = append(replayed, d) }})
	if err := within(t, doneR); err != nil {
		t.Fatal(err)
	}
	if len(replayed) != len(live) {
		t.Fatalf("replay decided %d events, live %d", len(replayed), len(live))
	}
	rejected := 0
	for i := range live {
		if live[i] != replayed[i] {
			t.Fatalf("event seq %d: live %+v, replay %+v", live[i].Seq, live[i], replayed[i])
		}
		if live[i].Code != "" {
			rejected++
		}
	}
	if rejected == 0 || rejected == len(live) {
		t.Fatalf("%d of %d rejected: the log does not exercise both outcomes", rejected, len(live))
	}
	sameRecords(t, bucketRecords(t, en.js, "replay"), bucketRecords(t, en.js, en.store.Bucket))
	_, mem := reference(evs, 1)
	sameRecords(t, bucketRecords(t, en.js, en.store.Bucket), mem)
}

func TestUpdateWithoutExpirationKeepsTheKeysTTL(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	g.t = time.Now()
	alice := g.user("alice")
	login := g.login(alice.UserID)
	create := g.attr(events.AttrCreated, alice.UserID, "", "e")
	create.Attrs[0].ExpiresAt = time.Now().Add(2 * time.Second).UnixNano()
	update := g.attr(events.AttrUpdated, alice.UserID, "", "e") // no expiration: keep
	last := en.publish(t, alice, login, create, update)
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket})
	defer stop()
	waitApplied(t, p, last)
	st, _ := en.js.Stream(context.Background(), events.KVStream(en.store.Bucket))
	key := events.AttrKey(alice.UserID, "", "e")
	m, err := st.GetLastMsgForSubject(context.Background(), events.KVSubject(en.store.Bucket, key))
	if err != nil {
		t.Fatal(err)
	}
	// kv.Update would have written this revision without Nats-TTL (nats.go#1994).
	if ttl := m.Header.Get("Nats-TTL"); ttl == "" {
		t.Fatalf("the updated revision has no Nats-TTL: headers %v", m.Header)
	}
	deadline := time.Now().Add(5 * time.Second)
	for { // expiry test: poll until the server removes the key
		if _, err := en.kv.Get(context.Background(), key); errors.Is(err, jetstream.ErrKeyNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the key outlived its expiry by 3s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestSecondProjectorOnOnePartitionStops(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	evs := scenario(g)
	last := en.publish(t, evs[:3]...)
	p, done1, _ := en.start(t, projector.Config{Bucket: en.store.Bucket})
	waitApplied(t, p, last)
	// A second projector of the same partition (another consumer): one of the two loses
	// the compare-and-set on the intent record as soon as both write, and stops.
	p2, done2, _ := en.start(t, projector.Config{Bucket: en.store.Bucket, Durable: "other"})
	<-p2.Ready()
	en.publish(t, evs[3:]...)
	var err error
	select {
	case err = <-done1:
	case err = <-done2:
	case <-time.After(15 * time.Second):
		t.Fatal("two projectors wrote one partition and neither stopped")
	}
	// Whichever write of the two loses first stops its projector: the intent record's
	// compare-and-set, or a key that another writer wrote.
	if err == nil || !strings.Contains(err.Error(), "intent record") && !strings.Contains(err.Error(), "another writer") {
		t.Fatalf("stopped with %v, want a lost compare-and-set", err)
	}
}

// TestOlderSchemaVersionsStillReplay publishes events exactly as schema version 1 wrote
// them (a msgpack map without the fields version 2 added), and one of an unknown future
// version: the v1 events fold, live and in a replay; the unknown one is refused and the
// projector goes on.
func TestOlderSchemaVersionsStillReplay(t *testing.T) {
	en := mustEnv(t)
	uid, sid := events.NewID(), events.SessionID("ust")
	now := time.Now().UnixNano()
	v1 := []map[string]any{
		{"id": events.NewID(), "type": "user.created", "v": 1, "ts": now, "uid": uid,
			"user": map[string]any{"username": "old", "pwhash": "x", "approved": true}},
		{"id": events.NewID(), "type": "session.created", "v": 1, "ts": now + 1, "uid": uid, "sid": sid, "exp": now + int64(time.Hour)},
		{"id": events.NewID(), "type": "attr.created", "v": 1, "ts": now + 2, "uid": uid, "actor": uid, "asid": sid,
			"attrs": []map[string]any{{"n": "kept", "val": []byte(`"from v1"`)}}},
		{"id": events.NewID(), "type": "attr.updated", "v": 99, "ts": now + 3, "uid": uid, "actor": uid, "asid": sid,
			"attrs": []map[string]any{{"n": "kept", "val": []byte(`"from the future"`)}}},
	}
	var last uint64
	for _, m := range v1 {
		data, err := msgpack.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		msg := nats.NewMsg(events.EventsPrefix + "." + uid + ".user")
		if m["type"] != "user.created" {
			msg.Subject = events.EventsPrefix + "." + uid + ".attr"
		}
		if m["type"] == "session.created" {
			msg.Subject = events.EventsPrefix + "." + uid + ".session." + sid
		}
		msg.Data = data
		msg.Header.Set(events.HeaderVersion, fmt.Sprint(m["v"]))
		ack, err := en.js.PublishMsg(context.Background(), msg)
		if err != nil {
			t.Fatal(err)
		}
		last = ack.Sequence
	}
	var live []events.Decision
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket, OnDecision: func(d events.Decision) { live = append(live, d) }})
	waitApplied(t, p, last)
	stop()
	codes := []events.Code{"", "", "", events.CodeInvalidInput}
	for i, d := range live {
		if d.Code != codes[i] {
			t.Fatalf("event %d (v%v): %q, want %q", i+1, v1[i]["v"], d.Code, codes[i])
		}
	}
	e, err := en.kv.Get(context.Background(), events.AttrKey(uid, "", "kept"))
	if err != nil {
		t.Fatal(err)
	}
	var a events.AttrRecord
	if events.Unmarshal(e.Value(), &a) != nil || string(a.Value) != `"from v1"` {
		t.Fatalf("the v1 attribute: %s", e.Value())
	}
	m := projector.NewMemory()
	var replayed []events.Decision
	if err := projector.NewLog(en.js, nil).FoldAll(context.Background(), m, func(e events.Entry) {
		replayed = append(replayed, e.Decision)
		if e.Event != nil && e.Event.Version != events.SchemaVersion {
			t.Errorf("event %d not upgraded: version %d", e.Seq, e.Event.Version)
		}
	}); err != nil {
		t.Fatal(err)
	}
	for i := range live {
		if replayed[i].Code != live[i].Code {
			t.Fatalf("replay of event %d: %q, live %q", i+1, replayed[i].Code, live[i].Code)
		}
	}
}

// TestBatchesAreCutSoThatIntentRecordsFitTheMaxPayload: on a server that takes messages
// of 256 KiB at most, many 300-item events arrive together; folded as one batch their
// intent record would be far larger, so the projector cuts the batch.
func TestBatchesAreCutSoThatIntentRecordsFitTheMaxPayload(t *testing.T) {
	en := mustEnvWith(t, embedded.Options{MaxPayload: 256 << 10})
	g := newGen()
	alice := g.user("alice")
	evs := []*events.Event{alice, g.login(alice.UserID)}
	for i := 0; i < 30; i++ {
		names := make([]string, 300)
		for j := range names {
			names[j] = fmt.Sprintf("batch-%02d-item-%03d-%s", i, j, strings.Repeat("x", 40))
		}
		evs = append(evs, g.attr(events.AttrCreated, alice.UserID, "", names...))
	}
	last := en.publish(t, evs...)
	var got []events.Decision
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket, OnDecision: func(d events.Decision) { got = append(got, d) }})
	waitApplied(t, p, last)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	for _, d := range got {
		if d.Code != "" {
			t.Fatalf("event %d refused: %s", d.Seq, d.Code)
		}
	}
	if batches, _ := p.Stats(); batches < 10 {
		t.Fatalf("%d batches for 32 events of up to 300 keys under a 256 KiB payload", batches)
	}
	_, want := reference(evs, 1)
	sameRecords(t, bucketRecords(t, en.js, en.store.Bucket), want)
}

// TestAProjectorGoesOnFromARebuiltBucket: a rebuild writes an intent record with nothing
// pending; a projector started on that bucket folds only the events after it.
func TestAProjectorGoesOnFromARebuiltBucket(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	evs := scenario(g)
	last := en.publish(t, evs...)
	store := en.store
	store.Bucket = "rebuilt"
	if _, err := events.EnsureBucket(context.Background(), en.js, store); err != nil {
		t.Fatal(err)
	}
	m := projector.NewMemory()
	log := projector.NewLog(en.js, nil)
	if err := log.FoldAll(context.Background(), m, nil); err != nil {
		t.Fatal(err)
	}
	if err := projector.Write(context.Background(), en.js, "rebuilt", m, last, nil); err != nil {
		t.Fatal(err)
	}
	uid := evs[0].UserID
	more := []*events.Event{g.attr(events.AttrCreated, uid, "", "a"), g.attr(events.AttrCreated, uid, "", "fresh")}
	last = en.publish(t, more...)
	var got []events.Decision
	p, stop := en.run(t, projector.Config{Bucket: "rebuilt", Durable: "rebuilt", OnDecision: func(d events.Decision) { got = append(got, d) }})
	waitApplied(t, p, last)
	stop()
	if len(got) != 2 || got[0].Code != events.CodeAttrExists || got[1].Code != "" {
		t.Fatalf("decisions on the rebuilt bucket: %+v (want only the two new events: E009001, accepted)", got)
	}
	_, want := reference(append(evs, more...), 1)
	sameRecords(t, bucketRecords(t, en.js, "rebuilt"), want)
}

// TestAConsumerLostWhileRecoveringEndsTheRun: a run recovering a recorded batch waits
// for the rest of the batch; if its consumer goes away meanwhile, the run must end (and
// the instance start again, or give the lease up) instead of waiting for good while its
// lease keeps every other instance out.
func TestAConsumerLostWhileRecoveringEndsTheRun(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	last := en.publish(t, g.user("ann"), g.user("bob"))
	// An intent record naming a batch longer than the log: recovery waits for its end.
	data, err := events.Marshal(&events.Checkpoint{First: 1, Last: last + 5})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := en.kv.Put(context.Background(), events.CheckpointKey("0"), data); err != nil {
		t.Fatal(err)
	}
	p, done, _ := en.start(t, projector.Config{Bucket: en.store.Bucket})
	select {
	case <-p.Ready():
	case err := <-done:
		t.Fatalf("the run ended before consuming: %v", err)
	}
	st, err := en.js.Stream(context.Background(), events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	deleted := 0
	for name := range st.ListConsumers(context.Background()).Info() {
		if err := st.DeleteConsumer(context.Background(), name.Name); err != nil {
			t.Fatal(err)
		}
		deleted++
	}
	if deleted == 0 {
		t.Fatal("the run has no consumer")
	}
	if err := within(t, done); !errors.Is(err, jetstream.ErrConsumerDeleted) && !errors.Is(err, jetstream.ErrNoHeartbeat) {
		t.Fatalf("the run ended with %v, want its consumer's loss", err)
	}
	if p.Applied() >= last {
		t.Fatalf("the run folded part of a recorded batch (applied %d)", p.Applied())
	}
}

// TestDeliveriesLostOnTheWayAreNotSkipped: when a replicated consumer's leader changes,
// messages the old leader sent but nobody received come again only after AckWait,
// while later ones come at once. A projector folding on would skip those events for
// good (and report them folded). Here the server's consumer reset makes the same gap
// on one node: the run must stop at it, and the next run fold every event.
func TestDeliveriesLostOnTheWayAreNotSkipped(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	evs := scenario(g)
	first := en.publish(t, evs[:3]...)
	hooks, held, release := holdBatch(first)
	_, done, _ := en.start(t, projector.Config{Bucket: en.store.Bucket, Hooks: hooks})
	<-held
	// While the run is held on its batch, its consumer jumps past the next events, as
	// lost deliveries do.
	st, err := en.js.Stream(context.Background(), events.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	var name string
	for c := range st.ListConsumers(context.Background()).Info() {
		name = c.Name
	}
	rep, err := en.nc.Request(fmt.Sprintf("$JS.API.CONSUMER.RESET.%s.%s", events.StreamName, name), []byte(fmt.Sprintf(`{"seq":%d}`, first+4)), 5*time.Second)
	if err != nil || bytes.Contains(rep.Data, []byte(`"error"`)) {
		t.Fatalf("reset the consumer: %v %s", err, rep.Data)
	}
	last := en.publish(t, evs[3:]...)
	close(release)
	if err := within(t, done); !errors.Is(err, projector.ErrDeliveryGap) {
		t.Fatalf("the run ended with %v, want a delivery gap", err)
	}
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket})
	waitApplied(t, p, last)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	_, want := reference(evs, 1)
	sameRecords(t, bucketRecords(t, en.js, en.store.Bucket), want)
}

// TestAPausedProjectorWritesNothingAfterItsSuccessorStarted: a projector paused in the
// middle of a batch (a long GC pause, a frozen VM) while another takes over must not
// land anything when it wakes: the successor's fence makes its intent record fail, and
// nothing of a batch is written before its intent record is stored.
func TestAPausedProjectorWritesNothingAfterItsSuccessorStarted(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	evs := scenario(g)
	uid := evs[0].UserID
	first := en.publish(t, evs[:2]...)
	hooks, paused, resume := holdBatch(first + 1)
	old, done, _ := en.start(t, projector.Config{Bucket: en.store.Bucket, Hooks: hooks})
	waitApplied(t, old, first)
	// The old projector takes the next event and freezes before its intent record.
	en.publish(t, g.attr(events.AttrSet, uid, "", "a"))
	<-paused
	// Its successor fences the intent record, folds that event and a later one.
	later := g.attr(events.AttrSet, uid, "", "a")
	next, stop := en.run(t, projector.Config{Bucket: en.store.Bucket, Durable: "next"})
	<-next.Ready()
	last := en.publish(t, later)
	waitApplied(t, next, last)
	before := bucketRecords(t, en.js, en.store.Bucket)
	intent, err := en.kv.Get(context.Background(), events.CheckpointKey("0"))
	if err != nil {
		t.Fatal(err)
	}
	close(resume)
	if err := within(t, done); err == nil || !strings.Contains(err.Error(), "intent record") {
		t.Fatalf("the paused projector ended with %v, want its intent record refused", err)
	}
	after := bucketRecords(t, en.js, en.store.Bucket)
	sameRecords(t, after, before)
	if e, err := en.kv.Get(context.Background(), events.CheckpointKey("0")); err != nil || e.Revision() != intent.Revision() {
		t.Fatalf("the intent record was written after the successor's last batch (%v)", err)
	}
	if err := stop(); err != nil { // (a clean stop writes the successor's closing record)
		t.Fatal(err)
	}
	if got := after[events.AttrKey(uid, "", "a")]; !bytes.Contains(got, []byte(later.ID)) {
		t.Fatalf("attribute a holds %q, want the later event's value", got)
	}
}

// holdBatch returns hooks that hold the first batch reaching sequence from before its
// intent record: held is closed when it is held, and closing release lets it go on.
func holdBatch(from uint64) (hooks projector.Hooks, held chan struct{}, release chan struct{}) {
	held, release = make(chan struct{}), make(chan struct{})
	var once bool
	hooks.BeforeCheckpoint = func(f, l uint64) error {
		if l >= from && !once {
			once = true
			close(held)
			<-release
		}
		return nil
	}
	return hooks, held, release
}

// TestAChunkInFlightIsRecoveredWithTheNext: with one event a batch, each chunk is in
// flight while the next one's intent record (covering both) goes out. A crash right
// there, between the two pipelined steps, and a restart apply every event exactly once:
// the restart folds both chunks again from the record.
func TestAChunkInFlightIsRecoveredWithTheNext(t *testing.T) {
	en := mustEnv(t)
	evs := scenario(newGen())
	last := en.publish(t, evs...)
	wantDecisions, wantRecords := reference(evs, 1)
	crash := errors.New("crash")
	crashed := 0
	hooks := projector.Hooks{InFlight: func(first, l uint64) error {
		if first >= 3 { // once some chunks have landed
			crashed++
			return crash
		}
		return nil
	}}
	_, done, _ := en.start(t, projector.Config{Bucket: en.store.Bucket, MaxBatch: 1, Hooks: hooks})
	if err := within(t, done); !errors.Is(err, crash) {
		t.Fatalf("the first run ended with %v, want the crash between the pipelined steps", err)
	}
	got := map[uint64]events.Code{}
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket, MaxBatch: 1, OnDecision: func(d events.Decision) { got[d.Seq] = d.Code }})
	waitApplied(t, p, last)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	for _, d := range wantDecisions {
		if c, ok := got[d.Seq]; ok && c != d.Code {
			t.Errorf("event %d: decision %q after the restart, want %q", d.Seq, c, d.Code)
		}
	}
	sameRecords(t, bucketRecords(t, en.js, en.store.Bucket), wantRecords)
}

// TestAProjectorPausedBetweenThePipelinedStepsLandsNothingOfItsOwn: a projector
// frozen with one chunk in flight and the next chunk's intent record sent, while a
// successor takes over and folds both chunks and a later event on the same key, lands
// nothing when it wakes: its next chunk's key finds the successor's later record (not
// the one it would write) and it stops; the projection stays the successor's.
func TestAProjectorPausedBetweenThePipelinedStepsLandsNothingOfItsOwn(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	evs := scenario(g)
	uid := evs[0].UserID
	first := en.publish(t, evs...)
	paused, resume := make(chan uint64, 1), make(chan struct{})
	var from uint64 // pause on the first chunk in flight from this sequence on
	var once bool
	var mu sync.Mutex
	hooks := projector.Hooks{InFlight: func(f, l uint64) error {
		mu.Lock()
		hold := from != 0 && f >= from && !once
		if hold {
			once = true
		}
		mu.Unlock()
		if hold {
			paused <- l
			<-resume
		}
		return nil
	}}
	old, done, _ := en.start(t, projector.Config{Bucket: en.store.Bucket, MaxBatch: 1, Hooks: hooks})
	waitApplied(t, old, first)
	mu.Lock()
	from = first + 1
	mu.Unlock()
	// Several sets of one key, one a batch: some chunk is in flight when the next
	// one's intent record goes out.
	var sets []*events.Event
	for range 6 {
		sets = append(sets, g.attr(events.AttrSet, uid, "", "p"))
	}
	en.publish(t, sets...)
	var inFlight uint64
	select {
	case inFlight = <-paused: // a chunk in flight, the record of it and the next sent
	case <-time.After(10 * time.Second):
		t.Fatal("no chunk was in flight while the next one's intent record went out")
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		e, err := en.kv.Get(context.Background(), events.CheckpointKey("0"))
		var ck events.Checkpoint
		if err == nil && events.Unmarshal(e.Value(), &ck) == nil && ck.Last > inFlight {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the record of both chunks was not stored")
		}
	}
	next, stop := en.run(t, projector.Config{Bucket: en.store.Bucket, Durable: "next"})
	<-next.Ready()
	z := g.attr(events.AttrSet, uid, "", "p")
	last := en.publish(t, z)
	waitApplied(t, next, last)
	before := bucketRecords(t, en.js, en.store.Bucket)
	close(resume)
	if err := within(t, done); err == nil {
		t.Fatal("the paused projector went on after waking")
	}
	sameRecords(t, bucketRecords(t, en.js, en.store.Bucket), before)
	if got := before[events.AttrKey(uid, "", "p")]; !bytes.Contains(got, []byte(z.ID)) {
		t.Fatalf("attribute p holds %q, want the successor's later value", got)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// TestAFoldOnAStaleReadIsNotWrittenOverAnExpiry: a projector whose view holds a key as
// a server behind answered it (a stream leader cut off and back goes on answering reads
// as the leader for a moment) folds an event on that old state; its write loses the
// compare-and-set to what the key really holds, an expiry marker of a later record that
// expired. The expiry cannot be the old record's (it lives on): the run stops with
// ErrStaleRead rather than write a record folded from the old state on top.
func TestAFoldOnAStaleReadIsNotWrittenOverAnExpiry(t *testing.T) {
	en := mustEnv(t)
	g := newGen()
	g.t = time.Now()
	alice := g.user("alice")
	login := g.login(alice.UserID)
	set := g.attr(events.AttrSet, alice.UserID, "", "a") // no expiry
	last := en.publish(t, alice, login, set)
	p, done, _ := en.start(t, projector.Config{Bucket: en.store.Bucket})
	waitApplied(t, p, last)
	// What the view does not know: a later record of the key, written with a 1 s TTL
	// on top of the one it holds, has expired since.
	ctx := context.Background()
	key := events.AttrKey(alice.UserID, "", "a")
	e, err := en.kv.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	later := &events.AttrRecord{Value: []byte(`"later"`), Created: time.Now().UnixNano(), Modified: time.Now().UnixNano(),
		ExpiresAt: time.Now().Add(time.Second).UnixNano(), Seq: last + 100}
	data, err := events.Marshal(later)
	if err != nil {
		t.Fatal(err)
	}
	m := &nats.Msg{Subject: events.KVSubject(en.store.Bucket, key), Data: data, Header: nats.Header{}}
	if _, err := en.js.PublishMsg(ctx, m, jetstream.WithExpectLastSequencePerSubject(e.Revision()), jetstream.WithMsgTTL(time.Second)); err != nil {
		t.Fatal(err)
	}
	st, _ := en.js.Stream(ctx, events.KVStream(en.store.Bucket))
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) { // expiry test
		lm, err := st.GetLastMsgForSubject(ctx, events.KVSubject(en.store.Bucket, key))
		if err == nil && lm.Header.Get(jetstream.MarkerReasonHeader) != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the later record left no expiry marker")
		}
	}
	en.publish(t, g.attr(events.AttrSet, alice.UserID, "", "a"))
	if err := within(t, done); !errors.Is(err, projector.ErrStaleRead) {
		t.Fatalf("the run ended with %v, want ErrStaleRead", err)
	}
	lm, err := st.GetLastMsgForSubject(ctx, events.KVSubject(en.store.Bucket, key))
	if err != nil {
		t.Fatal(err)
	}
	if lm.Header.Get(jetstream.MarkerReasonHeader) == "" {
		t.Fatalf("a record folded on the old state was written over the expiry: %q", lm.Data)
	}
}
