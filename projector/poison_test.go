package projector_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// TestAnEventThatCannotBeRecordedIsRejectedAndTheFoldGoesOn: on a server that takes
// messages of 64 KiB at most, one event changes more keys than an intent record can
// hold. It is rejected with E008002, nothing of it is stored, and the events after it
// are folded as usual; a restart does not fold it again.
func TestAnEventThatCannotBeRecordedIsRejectedAndTheFoldGoesOn(t *testing.T) {
	en := mustEnvWith(t, embedded.Options{MaxPayload: 64 << 10})
	g := newGen()
	alice := g.user("alice")
	evs := []*events.Event{alice, g.login(alice.UserID), g.attr(events.AttrCreated, alice.UserID, "", "before")}
	names := make([]string, 150)
	for j := range names {
		names[j] = fmt.Sprintf("%03d-%s", j, strings.Repeat(".", 185)) // a key three times as long
	}
	poison := g.attr(events.AttrCreated, alice.UserID, "", names...)
	for i := range poison.Attrs {
		poison.Attrs[i].Value = []byte("1")
	}
	after := g.attr(events.AttrCreated, alice.UserID, "", "after")
	evs = append(evs, poison, after)
	last := en.publish(t, evs...)
	got := map[uint64]events.Code{}
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket, OnDecision: func(d events.Decision) { got[d.Seq] = d.Code }})
	waitApplied(t, p, last)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if got[last-1] != events.CodeInvalidInput || got[last] != "" || got[last-2] != "" {
		t.Fatalf("decisions %v: want the 150-item event rejected (E008002) and the others accepted", got)
	}
	recs := bucketRecords(t, en.js, en.store.Bucket)
	for k := range recs {
		if strings.Contains(k, "=2E=2E") {
			t.Fatalf("a key of the rejected event is stored: %s", k)
		}
	}
	if recs[events.AttrKey(alice.UserID, "", "after")] == nil || recs[events.AttrKey(alice.UserID, "", "before")] == nil {
		t.Fatal("the events around the rejected one are missing")
	}
	// A restart goes on after it.
	got = map[uint64]events.Code{}
	more := en.publish(t, g.attr(events.AttrCreated, alice.UserID, "", "later"))
	p, stop = en.run(t, projector.Config{Bucket: en.store.Bucket, OnDecision: func(d events.Decision) { got[d.Seq] = d.Code }})
	waitApplied(t, p, more)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if _, again := got[last-1]; again || got[more] != "" {
		t.Fatalf("after a restart: %v", got)
	}
}

// TestRenewalAndLogoutOfAHugeSessionCommit: a session holding far more attributes than
// one intent record could list before the batch is renewed, then ended. The renewal
// rewrites them all (their TTL follows the session), the logout deletes them all, and
// the fold goes on; the projection equals a replay's.
func TestRenewalAndLogoutOfAHugeSessionCommit(t *testing.T) {
	en := mustEnvWith(t, embedded.Options{MaxPayload: 256 << 10})
	g := newGen()
	alice := g.user("alice")
	login := g.login(alice.UserID)
	sid := login.SessionID
	evs := []*events.Event{alice, login}
	for i := 0; i < 20; i++ {
		names := make([]string, 200)
		for j := range names {
			names[j] = fmt.Sprintf("%02d-%03d-%s", i, j, strings.Repeat("n", 170))
		}
		evs = append(evs, g.attr(events.AttrCreated, alice.UserID, sid, names...))
	}
	renew := g.next(events.SessionRenewed)
	renew.UserID, renew.SessionID, renew.Actor, renew.ActorSession = alice.UserID, sid, alice.UserID, sid
	renew.ExpiresAt = g.t.Add(2 * 3600e9).UnixNano()
	evs = append(evs, renew)
	renewSeq := en.publish(t, evs...)
	got := map[uint64]events.Code{}
	p, stop := en.run(t, projector.Config{Bucket: en.store.Bucket, OnDecision: func(d events.Decision) { got[d.Seq] = d.Code }})
	waitApplied(t, p, renewSeq)
	if got[renewSeq] != "" {
		t.Fatalf("the renewal of a 4,000-attribute session: %q", got[renewSeq])
	}
	_, want := reference(evs, 1)
	sameRecords(t, bucketRecords(t, en.js, en.store.Bucket), want)

	end := g.next(events.SessionEnded)
	end.UserID, end.SessionID, end.Actor, end.ActorSession = alice.UserID, sid, alice.UserID, sid
	other := g.login(alice.UserID)
	evs = append(evs, end, other)
	last := en.publish(t, end, other)
	waitApplied(t, p, last)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if got[last-1] != "" || got[last] != "" {
		t.Fatalf("logout then login: %v", got)
	}
	recs := bucketRecords(t, en.js, en.store.Bucket)
	for k := range recs {
		if strings.HasPrefix(k, events.AttrPrefix(alice.UserID, sid)) {
			t.Fatalf("an attribute of the ended session is left: %s", k)
		}
	}
	_, want = reference(evs, 1)
	sameRecords(t, recs, want)
}
