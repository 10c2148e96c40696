package main

// Deleting a user for good (issue 19): user.deleted ends the user's sessions at once,
// removes their and their sessions' attributes, frees the username, and replays as
// it was decided, across partitions too.

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
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
