package main

// Deleting a user for good (issue 19): user.deleted ends the user's sessions at once,
// removes their and their sessions' attributes, frees the username, and replays as
// it was decided, across partitions too.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// TestADeletedUserIsGoneWithSessionsAttributesAndUsername: a super-user deletes
// alice, who has two sessions and attributes of her own and of a session, plain and
// encrypted, one expiring. At once every operation with her USTs answers E007001, her
// login E005001, nothing of hers is left in the bucket, and her username can be taken
// again by a new user who starts with nothing. Deleting her again, deleting oneself,
// or deleting as a regular user is refused; the replay reproduces all of it.
func TestADeletedUserIsGoneWithSessionsAttributesAndUsername(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	me, err := f.alice.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	expectCode(t, me.Attr.Create(ctx, "email", "alice@example.com"), noError)
	expectCode(t, me.Attr.Create(ctx, "secret", "s3cret", client.Encrypt(true)), noError)
	expectCode(t, me.Attr.Create(ctx, "soon", 1, client.Expiration(time.Hour)), noError)
	second := mustLogin(t, f.c, "alice", "alice-pw")
	expectCode(t, second.SessionAttr(second.UST).Create(ctx, "cart", []int{1, 2}), noError)
	bobID, bob := f.regularUser(t, "bob")

	expectCode(t, bob.DeleteUser(ctx, f.aliceID), events.CodeNotAllowed)
	expectCode(t, f.admin.DeleteUser(ctx, f.adminID), events.CodeInvalidOperation)
	expectCode(t, f.admin.DeleteUser(ctx, f.aliceID), noError)
	expectCode(t, f.admin.DeleteUser(ctx, f.aliceID), events.CodeInvalidOperation)
	expectCode(t, f.admin.DeleteUser(ctx, "01NOSUCHUSER000000000000000"), events.CodeInvalidOperation)

	for _, s := range []*client.Session{f.alice, second} {
		_, err := s.User(ctx)
		expectCode(t, err, events.CodeNoSession)
		_, err = s.UserByID(f.aliceID).Attr.Get(ctx, "email")
		expectCode(t, err, events.CodeNoSession)
		expectCode(t, s.UserByID(f.aliceID).Attr.Set(ctx, "email", "again"), events.CodeNoSession)
		_, err = s.SessionAttr(s.UST).Names(ctx)
		expectCode(t, err, events.CodeNoSession)
	}
	_, err = f.admin.UserByID(f.aliceID).Attr.Get(ctx, "email")
	expectCode(t, err, events.CodeNotAllowed)
	_, err = f.c.Login(ctx, "alice", "alice-pw")
	expectCode(t, err, events.CodeNotAllowed)

	// Nothing of hers in the bucket: no key names her id, her username or her sessions.
	kv := mustKV(t, f.srv)
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for k := range keys.Keys() {
		if strings.Contains(k, f.aliceID) || k == events.UsernameKey("alice") ||
			k == events.SessionKey(events.SessionID(f.alice.UST)) || k == events.SessionKey(events.SessionID(second.UST)) {
			t.Errorf("key %s is left after alice's deletion", k)
		}
	}

	newID, err := f.admin.CreateUser(ctx, "alice", "new-pw", false)
	if err != nil {
		t.Fatalf("the username of a deleted user is not free: %v", err)
	}
	if newID == f.aliceID {
		t.Fatal("the new alice has the deleted one's id")
	}
	newAlice := mustLogin(t, f.c, "alice", "new-pw")
	u, err := newAlice.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if names, err := u.Attr.Names(ctx); err != nil || len(names) != 0 {
		t.Fatalf("the new alice starts with %v, %v; want nothing", names, err)
	}
	if _, err := bob.UserByID(bobID).Attr.Names(ctx); err != nil {
		t.Fatalf("bob, another user, lost his session: %v", err)
	}
	verifyReplay(t, f)
}

// TestAClaimOfADeletedUsersNameBeforeTheDeletionIsDecidedAsReplayDoes: dora, in one
// partition, is deleted while a claim of her username, appended just before the
// deletion in another partition, waits to be folded (its partition is held on an
// event before it). The deletion waits for that partition, so the claim finds the
// name taken, as the replay, which folds the log in order, does; a claim after the
// deletion gets the name. Without the wait the deletion lands first and the claim
// takes the name.
func TestAClaimOfADeletedUsersNameBeforeTheDeletionIsDecidedAsReplayDoes(t *testing.T) {
	decided := &decisionLog{}
	f, h := heldFixture(t, func(c *Config) { c.OnDecision = decided.record })
	ctx := ctxT(t)
	doraID, doraPart, doraSession := userIn(t, f, "dora", false)
	me, err := doraSession.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	doraName := me.Username
	lay := events.Layout{Partitions: 4}
	js, _ := jetstream.New(f.srv.apiConn)
	claimPart := (doraPart + 1) % 4
	// Users created as attrd itself would, in the claim's partition: a filler, which
	// the partition holds, and behind it the claim of dora's username.
	h.start(claimPart)
	appendUserIn(t, js, lay, claimPart, "filler")
	<-h.seen // the claim's partition holds the filler, unwritten
	claim := appendUserIn(t, js, lay, claimPart, doraName)
	deleted := make(chan error, 1)
	go func() { deleted <- f.admin.DeleteUser(context.Background(), doraID) }()
	time.Sleep(300 * time.Millisecond) // the deletion would be folded now
	h.release()
	expectCode(t, <-deleted, noError)
	if c := decided.await(t, claim.ID); c != events.CodeUsernameExists {
		t.Fatalf("the claim before the deletion: %q, want E001002", c)
	}
	if _, err := f.admin.CreateUser(ctx, doraName, "pw2", false); err != nil {
		t.Fatalf("a claim after the deletion: %v", err)
	}
	verifyReplay(t, f)
}

// TestAfterADeletionNothingYieldsTheUsersPersonalData: zelda logs in through a service
// that passes on her address and user agent, fails a login, and stores a plain, an
// encrypted and a session attribute. A copy of the event stream is taken, as a backup
// would. After a super-user deletes her, none of her username, password hash, values,
// address or user agent is in the event stream read raw, the projection bucket's or
// the other buckets' streams read raw, `attrd history` with the key file, a bucket
// rebuilt by `attrd replay --into`, or the copy taken before, opened with the key file.
// (In the log they were sealed from the start; the copy shows it too.)
func TestAfterADeletionNothingYieldsTheUsersPersonalData(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	secrets := []string{"zelda-the-user", "203.0.113.77", "ZeldaAgent/9.1", "plain-secret-5521", "enc-secret-8842", "sess-secret-3310"}
	zid, err := f.admin.CreateUser(ctx, "zelda-the-user", "Zpw-9137-secret", false)
	if err != nil {
		t.Fatal(err)
	}
	_, out := rawJSON(t, f.srv, "user.login", map[string]any{"username": "zelda-the-user", "password": "Zpw-9137-secret",
		"current_app": "CRM", "remote_addr": "203.0.113.77", "user_agent": "ZeldaAgent/9.1"})
	ust, _ := out["ust"].(string)
	if ust == "" {
		t.Fatalf("login: %v", out)
	}
	_, out = rawJSON(t, f.srv, "user.login", map[string]any{"username": "zelda-the-user", "password": "wrong",
		"current_app": "CRM", "remote_addr": "203.0.113.77", "user_agent": "ZeldaAgent/9.1"})
	if subStatus(out) != string(events.CodeNotAllowed) {
		t.Fatalf("a wrong password: %v", out)
	}
	z := f.c.Resume(ust)
	u, err := z.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	expectCode(t, u.Attr.Create(ctx, "pref", "plain-secret-5521"), noError)
	expectCode(t, u.Attr.Create(ctx, "card", "enc-secret-8842", client.Encrypt(true)), noError)
	expectCode(t, z.SessionAttr(z.UST).Create(ctx, "cart", "sess-secret-3310"), noError)
	rec, err := mustKV(t, f.srv).Get(ctx, events.UserKey(zid))
	if err != nil {
		t.Fatal(err)
	}
	var zu events.UserRecord
	if err := events.Unmarshal(rec.Value(), &zu); err != nil || zu.PasswordHash == "" {
		t.Fatalf("zelda's record: %v", err)
	}
	secrets = append(secrets, zu.PasswordHash)
	js, err := jetstream.New(f.srv.apiConn)
	if err != nil {
		t.Fatal(err)
	}
	backup := readStream(t, js, events.StreamName)

	expectCode(t, f.admin.DeleteUser(ctx, zid), noError)

	leaks := func(where string, data []byte) {
		t.Helper()
		for _, s := range secrets {
			if bytes.Contains(data, []byte(s)) {
				t.Errorf("%s holds %q after the deletion: %.80s", where, s, data)
			}
		}
	}
	for _, stream := range []string{events.StreamName, events.KVStream(events.DefaultBucket), events.KVStream(events.ThrottleBucket), events.KVStream(events.DataKeysBucket)} {
		for _, m := range readStream(t, js, stream) {
			leaks("stream "+stream, wholeMsg(m))
		}
	}
	key := "--encryption-key-file=" + filepath.Join(f.srv.cfg.DataDir, "encryption.key")
	code, hist := runCmd(t, "history", "--user", zid, "--json", "--nats-url", f.srv.ClientURL(), key)
	if code != 0 || !strings.Contains(hist, `"type":"user.deleted"`) || !strings.Contains(hist, `"personal_data":"sealed"`) {
		t.Fatalf("history of the deleted user: exit %d\n%s", code, hist)
	}
	leaks("attrd history", []byte(hist))
	if code, out := runCmd(t, "replay", "--into", "rebuilt_", "--nats-url", f.srv.ClientURL(), key); code != 0 {
		t.Fatalf("replay --into: exit %d\n%s", code, out)
	}
	for _, m := range readStream(t, js, events.KVStream("rebuilt_"+events.DefaultBucket)) {
		leaks("the rebuilt bucket", wholeMsg(m))
	}
	// The copy of the log taken before the deletion, opened now with the key file.
	keys, err := loadKeys(filepath.Join(f.srv.cfg.DataDir, "encryption.key"))
	if err != nil {
		t.Fatal(err)
	}
	dk, err := events.OpenDataKeys(ctx, js, keys)
	if err != nil {
		t.Fatal(err)
	}
	erased := 0
	for _, m := range backup {
		leaks("the copy of the log", wholeMsg(m))
		ev, err := events.Decode(m.Data)
		if err != nil {
			continue // a recorded decision
		}
		if err := dk.Open(ctx, ev); err != nil {
			t.Fatal(err)
		}
		if ev.Erased {
			erased++
		}
		opened, _ := events.Encode(ev)
		leaks("the copy of the log, opened with the key file", opened)
	}
	if erased == 0 {
		t.Fatal("no event of the copy was left sealed")
	}
}

// readStream returns every message of a stream.
func readStream(t *testing.T, js jetstream.JetStream, name string) []*jetstream.RawStreamMsg {
	t.Helper()
	ctx := ctxT(t)
	st, err := js.Stream(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []*jetstream.RawStreamMsg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

// wholeMsg is a message's subject, headers and data in one.
func wholeMsg(m *jetstream.RawStreamMsg) []byte {
	whole := append([]byte(m.Subject+"\n"), m.Data...)
	for k, vs := range m.Header {
		whole = append(whole, k...)
		for _, v := range vs {
			whole = append(whole, v...)
		}
	}
	return whole
}

// TestASuperUserDeletedAfterActingOnOthersReplaysAsDecided: a super-user creates a
// user, writes that user's attributes and approves another; then the super-user is
// deleted (their username and data are erased from the log). Everything they did
// stays, the other users keep working, and the replay reproduces every decision and
// state though it cannot read the deleted super-user's personal data.
func TestASuperUserDeletedAfterActingOnOthersReplaysAsDecided(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	superID, err := f.admin.CreateUser(ctx, "root2", "root2-pw", true)
	if err != nil {
		t.Fatal(err)
	}
	root2 := mustLogin(t, f.c, "root2", "root2-pw")
	xID, err := root2.CreateUser(ctx, "xavier", "x-pw", false)
	if err != nil {
		t.Fatal(err)
	}
	expectCode(t, root2.UserByID(xID).Attr.Create(ctx, "plan", "gold"), noError)
	expectCode(t, root2.UserByID(f.aliceID).Attr.Set(ctx, "note", "from root2", client.Encrypt(true)), noError)
	// A claim of root2's username while root2 exists is refused; after, it is not.
	_, err = f.admin.CreateUser(ctx, "root2", "other", false)
	expectCode(t, err, events.CodeUsernameExists)
	expectCode(t, f.admin.DeleteUser(ctx, superID), noError)

	x := mustLogin(t, f.c, "xavier", "x-pw")
	u, err := x.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if a, err := u.Attr.Get(ctx, "plan"); err != nil || string(a.Value) != `"gold"` {
		t.Fatalf("what the deleted super-user wrote: %v %v", a, err)
	}
	if _, err := f.admin.CreateUser(ctx, "root2", "again", false); err != nil {
		t.Fatalf("the deleted super-user's username: %v", err)
	}
	verifyReplay(t, f)
}

// TestTheHistoryOfADeletedUserKeepsItsMetadata: after a deletion a super-user still
// reads the deleted user's history over the API: types, times, actors and decisions,
// with what was personal shown as sealed.
func TestTheHistoryOfADeletedUserKeepsItsMetadata(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, err := f.alice.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	expectCode(t, u.Attr.Create(ctx, "colour", "teal-7731"), noError)
	expectCode(t, f.admin.DeleteUser(ctx, f.aliceID), noError)
	_, out := rawJSON(t, f.srv, "history.list", map[string]any{"ust": f.admin.UST, "current_app": "CRM", "user_id": f.aliceID})
	evs, _ := out["events"].([]any)
	if len(evs) == 0 {
		t.Fatalf("no history for the deleted user: %v", out)
	}
	types := map[string]bool{}
	for _, e := range evs {
		m := e.(map[string]any)
		types[m["type"].(string)] = true
		if m["type"] != "user.deleted" && m["type"] != "user.created" && m["personal_data"] != "sealed" {
			t.Errorf("an event of the deleted user not shown sealed: %v", m)
		}
		if m["decision"] == nil || m["time"] == nil {
			t.Errorf("an event without its metadata: %v", m)
		}
	}
	for _, want := range []string{"user.created", "session.created", "attr.created", "user.deleted"} {
		if !types[want] {
			t.Errorf("the history lacks %s: %v", want, types)
		}
	}
	if b, _ := json.Marshal(out); bytes.Contains(b, []byte("teal-7731")) || bytes.Contains(b, []byte(`"alice"`)) {
		t.Fatalf("the history shows the deleted user's data: %s", b)
	}
}

// TestDeletingAUserWithTenThousandAttributesAndAThousandSessions: the largest user the
// default limits allow (10,000 attributes, 1,000 sessions with an attribute each) is
// deleted in one request within the decision timeout, while another user's writes go
// on, every one answered ok; nothing of the deleted user is left.
func TestDeletingAUserWithTenThousandAttributesAndAThousandSessions(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	big, err := f.admin.CreateUser(ctx, "big", "big-pw", false)
	if err != nil {
		t.Fatal(err)
	}
	var sessions []*client.Session
	for i := 0; i < api.DefaultMaxSessionsPerUser; i++ {
		s := mustLogin(t, f.c, "big", "big-pw")
		expectCode(t, s.SessionAttr(s.UST).Set(ctx, "s", i), noError)
		sessions = append(sessions, s)
	}
	attrs := f.admin.UserByID(big).Attr
	for i := 0; i < api.DefaultMaxAttrsPerUser; i += 1000 {
		items := make([]client.Item, 1000)
		for j := range items {
			items[j] = client.Item{Name: fmt.Sprintf("a%05d", i+j), Value: i + j}
		}
		expectCode(t, attrs.CreateMany(ctx, items), noError)
	}
	_, bobSession := f.regularUser(t, "bob")
	stop := make(chan struct{})
	type result struct {
		n       int
		slowest time.Duration
		err     error
	}
	done := make(chan result)
	go func() {
		var r result
		for {
			select {
			case <-stop:
				done <- r
				return
			default:
			}
			start := time.Now()
			if err := bobSession.UserByID("").Attr.Set(context.Background(), "tick", r.n); err != nil {
				r.err = err
			}
			r.slowest = max(r.slowest, time.Since(start))
			r.n++
		}
	}()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heapBefore := ms.HeapAlloc
	start := time.Now()
	expectCode(t, f.admin.DeleteUser(ctx, big), noError)
	took := time.Since(start)
	runtime.ReadMemStats(&ms)
	close(stop)
	r := <-done
	t.Logf("deleted 10,000 attributes and 1,000 sessions in %s (heap %+d MiB); bob wrote %d times meanwhile, the slowest in %s",
		took.Round(time.Millisecond), (int64(ms.HeapAlloc)-int64(heapBefore))>>20, r.n, r.slowest.Round(time.Millisecond))
	if r.err != nil {
		t.Fatalf("another user's write failed during the deletion: %v", r.err)
	}
	if _, err := sessions[500].User(ctx); !errors.Is(err, events.ErrNoSession) {
		t.Fatalf("a session of the deleted user: %v", err)
	}
	keys, err := mustKV(t, f.srv).ListKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	left := 0
	for k := range keys.Keys() {
		if strings.Contains(k, big) {
			left++
		}
	}
	if left != 0 {
		t.Fatalf("%d keys of the deleted user are left", left)
	}
}

// TestAUserExportsEverythingAttrdHoldsOfThem: alice's export (hers, a super-user's
// about her, the operator's `attrd user export`, and REST's) holds her record without
// the password hash, her attributes decrypted, her two live sessions with their
// attributes, address and user agent, and her history; another regular user cannot
// export her.
func TestAUserExportsEverythingAttrdHoldsOfThem(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, err := f.alice.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	expectCode(t, u.Attr.Create(ctx, "email", "alice@example.com"), noError)
	expectCode(t, u.Attr.Create(ctx, "card", "4111-1111", client.Encrypt(true)), noError)
	_, out := rawJSON(t, f.srv, "user.login", map[string]any{"username": "alice", "password": "alice-pw", "current_app": "CRM",
		"remote_addr": "198.51.100.9", "user_agent": "AliceBrowser/2"})
	second := f.c.Resume(out["ust"].(string))
	expectCode(t, second.SessionAttr(second.UST).Create(ctx, "cart", []int{3}), noError)
	_, bob := f.regularUser(t, "bob")

	check := func(who string, doc map[string]any) {
		t.Helper()
		b, _ := json.Marshal(doc)
		if bytes.Contains(b, []byte("argon2id")) {
			t.Errorf("%s: the export holds the password hash", who)
		}
		user, _ := doc["user"].(map[string]any)
		attrs, _ := doc["attributes"].(map[string]any)
		sessions, _ := doc["sessions"].([]any)
		history, _ := doc["history"].([]any)
		card, _ := attrs["card"].(map[string]any)
		if user["username"] != "alice" || user["user_id"] != f.aliceID || card["value"] != "4111-1111" || attrs["email"] == nil {
			t.Errorf("%s: record or attributes wrong: %s", who, b)
		}
		if len(sessions) != 2 || !bytes.Contains(b, []byte("AliceBrowser/2")) || !bytes.Contains(b, []byte("198.51.100.9")) || !bytes.Contains(b, []byte(`"cart"`)) {
			t.Errorf("%s: sessions wrong: %s", who, b)
		}
		if len(history) < 5 {
			t.Errorf("%s: history of %d events: %s", who, len(history), b)
		}
	}
	own, err := f.alice.Export(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	check("her own", own)
	bySuper, err := f.admin.Export(ctx, f.aliceID)
	if err != nil {
		t.Fatal(err)
	}
	check("a super-user's", bySuper)
	_, err = bob.Export(ctx, f.aliceID)
	expectCode(t, err, events.CodeNotAllowed)

	code, cli := runCmd(t, "user", "export", "--user", "alice", "--nats-url", f.srv.ClientURL(),
		"--encryption-key-file="+filepath.Join(f.srv.cfg.DataDir, "encryption.key"))
	var doc map[string]any
	if code != 0 || json.Unmarshal([]byte(cli), &doc) != nil {
		t.Fatalf("attrd user export: exit %d\n%s", code, cli)
	}
	check("attrd user export", doc)
	st, _, body := httpDo(t, f.srv, "GET", "/attrd/user/export", map[string]any{"current_app": "CRM"}, map[string]string{"Authorization": "Bearer " + f.alice.UST})
	if st != 200 {
		t.Fatalf("REST export: %d %v", st, body)
	}
	check("REST", body)
}

// TestALogOfVersionTwoGoesOnAndItsUsersCanBeDeleted: a user whose events were written
// by the previous version (schema 2: personal data in clear, no data key) logs in and
// writes with this one: the new events are sealed with a data key made then, the old
// and new values read back, and the replay reproduces everything. Deleting the user
// erases the projection and what the new events hold, and removes the old events
// from the log (their metadata stays, in an erasure record): none of their personal
// data is left in the stream, the history still lists every event of theirs, and the
// replay, without the removed events, reproduces every decision and state.
func TestALogOfVersionTwoGoesOnAndItsUsersCanBeDeleted(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	js, _ := jetstream.New(f.srv.apiConn)
	lay := events.Layout{Partitions: 1}
	uid := events.NewID()
	now := time.Now().UnixNano()
	sid := events.SessionID("legacy-ust")
	for _, ev := range []*events.Event{
		{Type: events.UserCreated, Time: now, UserID: uid, App: "attrd",
			User: &events.UserData{Username: "legacy", PasswordHash: mustHash(t, "legacy-pw"), Approved: true}},
		{Type: events.SessionCreated, Time: now + 1, UserID: uid, SessionID: sid, Actor: uid, ActorSession: sid, ActorName: "legacy",
			App: "CRM", RemoteAddr: "192.0.2.22", ExpiresAt: now + int64(time.Hour)},
		{Type: events.AttrCreated, Time: now + 2, UserID: uid, Actor: uid, ActorSession: sid, ActorName: "legacy", App: "CRM",
			Attrs: []events.AttrItem{{Name: "old", Value: []byte(`"old-clear-4471"`)}}},
	} {
		ev.ID, ev.Version = events.NewID(), 2 // as the previous version wrote them
		data, err := events.Encode(ev)
		if err != nil {
			t.Fatal(err)
		}
		msg := &nats.Msg{Subject: lay.Subject(ev), Data: data, Header: nats.Header{}}
		msg.Header.Set(events.HeaderType, string(ev.Type))
		msg.Header.Set(events.HeaderVersion, "2")
		msg.Header.Set(nats.MsgIdHdr, ev.ID)
		if _, err := js.PublishMsg(ctx, msg); err != nil {
			t.Fatal(err)
		}
	}
	var s *client.Session
	for deadline := time.Now().Add(10 * time.Second); s == nil; time.Sleep(20 * time.Millisecond) {
		var err error
		if s, err = f.c.Login(ctx, "legacy", "legacy-pw"); err != nil && time.Now().After(deadline) {
			t.Fatalf("the user of version 2 cannot log in: %v", err)
		}
	}
	me, err := s.User(ctx)
	if err != nil {
		t.Fatal(err)
	}
	expectCode(t, me.Attr.Create(ctx, "new", "new-sealed-9902"), noError)
	for name, want := range map[string]string{"old": `"old-clear-4471"`, "new": `"new-sealed-9902"`} {
		if a, err := me.Attr.Get(ctx, name); err != nil || string(a.Value) != want {
			t.Fatalf("%s: %v %v", name, a, err)
		}
	}
	verifyReplay(t, f)

	expectCode(t, f.admin.DeleteUser(ctx, uid), noError)
	verifyReplay(t, f)
	for _, m := range readStream(t, js, events.StreamName) {
		for _, s := range []string{"new-sealed-9902", "old-clear-4471", "legacy", "192.0.2.22"} {
			if bytes.Contains(wholeMsg(m), []byte(s)) {
				t.Fatalf("the log holds %q after the deletion: %s", s, wholeMsg(m))
			}
		}
	}
	code, hist := runCmd(t, "history", "--user", uid, "--json", "--nats-url", f.srv.ClientURL(),
		"--encryption-key-file="+filepath.Join(f.srv.cfg.DataDir, "encryption.key"))
	for _, want := range []string{`"type":"user.created"`, `"type":"session.created"`, `"name":"old"`, `"name":"new"`, `"type":"user.deleted"`} {
		if code != 0 || !strings.Contains(hist, want) {
			t.Fatalf("the history after the deletion lacks %s: exit %d\n%s", want, code, hist)
		}
	}
	for _, m := range readStream(t, js, events.KVStream(events.DefaultBucket)) {
		if bytes.Contains(wholeMsg(m), []byte("old-clear-4471")) || bytes.Contains(wholeMsg(m), []byte("legacy")) {
			t.Fatalf("the projection keeps the deleted user: %s", wholeMsg(m))
		}
	}
}

// TestARequestsFingerprintIsKeyedByItsUsersDataKey: the fingerprint a request with a
// request id leaves in the log is keyed with its user's data key. Two users sending
// the same body under the same request id (an unkeyed hash of it would be one and the
// same, and would let anyone test a guessed value against it) leave two different
// ones, and a retry is still told from a reuse.
func TestARequestsFingerprintIsKeyedByItsUsersDataKey(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	_, bob := f.regularUser(t, "bob")
	for _, s := range []*client.Session{f.alice, bob} {
		a := s.UserByID("").Attr
		expectCode(t, a.Set(ctx, "consent", true, client.RequestID("same")), noError)
		expectCode(t, a.Set(ctx, "consent", true, client.RequestID("same")), noError)                  // a retry
		expectCode(t, a.Set(ctx, "consent", false, client.RequestID("same")), events.CodeInvalidInput) // a reuse
	}
	js, _ := jetstream.New(f.srv.apiConn)
	fps := map[string]bool{}
	for _, m := range readStream(t, js, events.StreamName) {
		ev, err := events.Decode(m.Data)
		if err == nil && ev.Type == events.AttrSet && ev.Fingerprint != "" {
			fps[ev.Fingerprint] = true
		}
	}
	if len(fps) != 2 {
		t.Fatalf("the two users' requests left %d fingerprints, want 2 different ones: %v", len(fps), fps)
	}
}

// TestAReplayGoesOnOverTheStartOfTheLogAnErasureRemoved: the very first event of a log
// (written by the previous version, in clear, as is its super-user's) is a user's
// creation; deleting that user
// removes it, so the stream now starts after sequence 1, which a replay would take for
// a log cut by retention. The erasure record says those events were erased: the replay
// folds the log and reproduces the projection.
func TestAReplayGoesOnOverTheStartOfTheLogAnErasureRemoved(t *testing.T) {
	ns, accts := startAccountsNATS(t, "127.0.0.1:0")
	nc, err := nats.Connect(ns.ClientURL(), nats.UserInfo(embedded.OperatorUser, accts.OperatorPassword))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx := ctxT(t)
	if _, _, err := events.EnsureStore(ctx, js, events.DefaultStoreConfig()); err != nil {
		t.Fatal(err)
	}
	first := &events.Event{ID: events.NewID(), Version: 2, Type: events.UserCreated, Time: time.Now().UnixNano(), UserID: events.NewID(),
		App: "attrd", User: &events.UserData{Username: "first", PasswordHash: mustHash(t, "pw"), Approved: true}}
	// And a super-user, as the previous version wrote one too.
	root := &events.Event{ID: events.NewID(), Version: 2, Type: events.UserCreated, Time: time.Now().UnixNano(), UserID: events.NewID(),
		App: "attrd", User: &events.UserData{Username: "admin", PasswordHash: mustHash(t, adminPassword), SuperUser: true, Approved: true}}
	for i, ev := range []*events.Event{first, root} {
		data, _ := events.Encode(ev)
		if ack, err := js.Publish(ctx, events.Layout{}.Subject(ev), data, jetstream.WithMsgID(ev.ID)); err != nil || ack.Sequence != uint64(i+1) {
			t.Fatalf("event %d: %v %v", i+1, ack, err)
		}
	}
	keyFile := filepath.Join(t.TempDir(), "k.key")
	if err := sealed.GenerateKeyFile(keyFile); err != nil {
		t.Fatal(err)
	}
	s := mustStart(t, func(c *Config) {
		c.NATSURL, c.KeyFile, c.Replicas = ns.ClientURL(), keyFile, 1
		c.NATSOptions = []nats.Option{nats.UserInfo(embedded.OperatorUser, accts.OperatorPassword)}
	})
	admin := mustLogin(t, mustClient(t, s), "admin", adminPassword)
	if _, err := mustClient(t, s).Login(ctx, "first", "pw"); err != nil {
		t.Fatalf("the user of the first event: %v", err)
	}
	expectCode(t, admin.DeleteUser(ctx, first.UserID), noError)
	st, _ := js.Stream(ctx, events.StreamName)
	info, err := st.Info(ctx)
	if err != nil || info.State.FirstSeq <= 1 {
		t.Fatalf("the stream still starts at %d (%v)", info.State.FirstSeq, err)
	}
	if !replayEqualsLive(t, s) {
		t.Fatal("the replay does not reproduce the projection")
	}
}

// TestWithoutAKeyFileADeletionRemovesTheUsersEventsFromTheLog: a deployment without a
// key file seals nothing, so every event of a user holds their data in clear; deleting
// the user removes those events from the log (their metadata stays in an erasure
// record), and the replay reproduces the projection.
func TestWithoutAKeyFileADeletionRemovesTheUsersEventsFromTheLog(t *testing.T) {
	ns, accts := startAccountsNATS(t, "127.0.0.1:0")
	s := mustStart(t, func(c *Config) {
		c.NATSURL, c.Replicas = ns.ClientURL(), 1
		c.NATSOptions = []nats.Option{nats.UserInfo(embedded.OperatorUser, accts.OperatorPassword)}
	})
	ctx := ctxT(t)
	c := mustClient(t, s)
	admin := mustLogin(t, c, "admin", adminPassword)
	id, err := admin.CreateUser(ctx, "nokey-user", "pw", false)
	if err != nil {
		t.Fatal(err)
	}
	u := mustLogin(t, c, "nokey-user", "pw")
	me, _ := u.User(ctx)
	expectCode(t, me.Attr.Create(ctx, "colour", "clear-value-6610"), noError)
	js, _ := jetstream.New(s.apiConn)
	found := false
	for _, m := range readStream(t, js, events.StreamName) {
		found = found || bytes.Contains(m.Data, []byte("clear-value-6610"))
	}
	if !found {
		t.Fatal("without a key file the value should be in the log in clear before the deletion")
	}
	expectCode(t, admin.DeleteUser(ctx, id), noError)
	for _, m := range readStream(t, js, events.StreamName) {
		for _, secret := range []string{"clear-value-6610", "nokey-user"} {
			if bytes.Contains(wholeMsg(m), []byte(secret)) {
				t.Fatalf("the log holds %q after the deletion", secret)
			}
		}
	}
	if !replayEqualsLive(t, s) {
		t.Fatal("the replay does not reproduce the projection")
	}
}
