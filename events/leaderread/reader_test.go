package leaderread

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/deploy/embedded/embeddedtest"
	"github.com/attrd/attrd/events"
)

// TestAReadTakesTheLeadersAnswerOverAMembersUnavailable: a member of a stream's group
// that knows no leader (a node healed from a cut, catching up) answers a message read
// 503 at once; the leader's answer, a moment later, is the one taken. With only the
// 503, the read fails with it after the grace.
func TestAReadTakesTheLeadersAnswerOverAMembersUnavailable(t *testing.T) {
	nc := noJetStreamServer(t)
	// The two members of a stream "S": one that knows no
	// leader, and the leader, whose answer comes 20 ms later.
	member, err := nc.Subscribe("$JS.API.STREAM.MSG.GET.S", func(m *nats.Msg) {
		_ = m.Respond([]byte(`{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}`))
	})
	if err != nil {
		t.Fatal(err)
	}
	leader, err := nc.Subscribe("$JS.API.STREAM.MSG.GET.S", func(m *nats.Msg) {
		time.Sleep(20 * time.Millisecond)
		_ = m.Respond([]byte(`{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"s.a","seq":7,"data":"aGk=","time":"2026-12-05T00:00:00Z"}}`))
	})
	if err != nil {
		t.Fatal(err)
	}
	lr := mustLeaderReads(t, nc)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	m, err := lr.Get(ctx, "S", Request{LastBySubj: "s.a"})
	if err != nil {
		t.Fatalf("the read failed with %v; the leader answered 20 ms after the member's 503", err)
	}
	if m.Sequence != 7 || string(m.Data) != "hi" {
		t.Fatalf("read %d %q, want the leader's 7 \"hi\"", m.Sequence, m.Data)
	}
	if err := leader.Unsubscribe(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = lr.Get(ctx, "S", Request{LastBySubj: "s.a"})
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) || apiErr.Code != 503 || !unavailable(err) {
		t.Fatalf("with no leader the read gave %v, want the member's 503", err)
	}
	if took := time.Since(start); took > leaderGrace+time.Second {
		t.Fatalf("the read took %s with only a 503, want about %s", took, leaderGrace)
	}
	if err := member.Unsubscribe(); err != nil {
		t.Fatal(err)
	}
	if _, err := lr.Get(ctx, "S", Request{LastBySubj: "s.a"}); !unavailable(err) {
		t.Fatalf("with nobody answering the read gave %v, want an unavailable error", err)
	}
}

// TestAKeyReadFromTheLeaderSeesPutsDeletesAndPurges: lastValue reads a key's value,
// and nothing for a key never written, deleted or purged.
func TestAKeyReadFromTheLeaderSeesPutsDeletesAndPurges(t *testing.T) {
	_, nc := embeddedtest.Start(t, embedded.Options{})
	js, _ := jetstream.New(nc)
	_, kv, err := events.EnsureStore(context.Background(), js, events.DefaultStoreConfig())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	lr := mustLeaderReads(t, nc)
	bucket := events.DefaultStoreConfig().Bucket
	read := func(key string) []byte {
		t.Helper()
		v, err := lr.LastValue(ctx, bucket, key)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	if v := read("u.none"); v != nil {
		t.Fatalf("a key never written read %q", v)
	}
	for _, k := range []string{"u.a", "u.b"} {
		if _, err := kv.Put(ctx, k, []byte("v1")); err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(ctx, k, []byte("v2")); err != nil {
			t.Fatal(err)
		}
		if v := read(k); string(v) != "v2" {
			t.Fatalf("%s read %q, want v2", k, v)
		}
	}
	if err := kv.Delete(ctx, "u.a"); err != nil {
		t.Fatal(err)
	}
	if err := kv.Purge(ctx, "u.b"); err != nil {
		t.Fatal(err)
	}
	if v := read("u.a"); v != nil {
		t.Fatalf("a deleted key read %q", v)
	}
	if v := read("u.b"); v != nil {
		t.Fatalf("a purged key read %q", v)
	}
}

// noJetStreamServer starts a NATS server without JetStream and connects to it: the
// test's responders play the stream's servers.
func noJetStreamServer(t *testing.T) *nats.Conn {
	t.Helper()
	_, nc := embeddedtest.Start(t, embedded.Options{NoJetStream: true})
	return nc
}

func mustLeaderReads(t *testing.T, nc *nats.Conn) *Reader {
	t.Helper()
	lr, err := New(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lr.Close() })
	return lr
}

// TestAReadOfAStreamThatElectedALeaderLatelyIsVerifiedBeforeItIsAnswered: after an
// advisory that the stream elected a leader, the old leader (cut off, not yet stepped
// down) may answer first, from its old copy: the read waits for a second answer and,
// when the two differ, is refused (E008004) instead of answered old. A stream with no
// election lately is answered at once.
func TestAReadOfAStreamThatElectedALeaderLatelyIsVerifiedBeforeItIsAnswered(t *testing.T) {
	nc := noJetStreamServer(t)
	lr := mustLeaderReads(t, nc)
	for _, stream := range []string{"S", "Calm"} {
		answer := func(seq int, delay time.Duration) {
			if _, err := nc.Subscribe("$JS.API.STREAM.MSG.GET."+stream, func(m *nats.Msg) {
				time.Sleep(delay)
				_ = m.Respond(fmt.Appendf(nil, `{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"s.a","seq":%d,"data":"aGk=","time":"2026-12-05T00:00:00Z"}}`, seq))
			}); err != nil {
				t.Fatal(err)
			}
		}
		answer(7, 0)                   // the old leader, first
		answer(9, 10*time.Millisecond) // the new one
	}
	announceElection(t, nc, "S")
	for deadline := time.Now().Add(2 * time.Second); !lr.Suspected("S"); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the advisory was not seen")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if m, err := lr.Get(ctx, "S", Request{LastBySubj: "s.a"}); !isOutcomeUnknown(err) {
		t.Fatalf("a read of a stream that elected a leader lately, answered by two: %v %v, want E008004", m, err)
	}
	if m, err := lr.Get(ctx, "Calm", Request{LastBySubj: "s.a"}); err != nil || m.Sequence != 7 {
		t.Fatalf("a stream with no election lately: %v %v (its first answer is taken at once)", m, err)
	}
}

// TestAfterAReconnectEveryStreamsReadsAreVerified: a connection that reconnected may
// have missed an election's advisory, so for a while after it every stream's reads are
// verified.
func TestAfterAReconnectEveryStreamsReadsAreVerified(t *testing.T) {
	nc := noJetStreamServer(t)
	lr := mustLeaderReads(t, nc)
	if lr.Suspected("Any") {
		t.Fatal("a stream is suspected with no election and no reconnect")
	}
	before := nc.Stats().Reconnects
	if err := nc.ForceReconnect(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); nc.Stats().Reconnects == before || !nc.IsConnected(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no reconnect")
		}
	}
	for deadline := time.Now().Add(time.Second); !lr.Suspected("Any"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("after a reconnect, a stream's reads are not verified")
		}
	}
}

// unavailable reports an error that says the stream could not be read now: no
// responders, a timeout, or a 503 from the servers.
func unavailable(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, nats.ErrNoResponders) || errors.Is(err, context.DeadlineExceeded) ||
		errors.As(err, &apiErr) && apiErr.Code == 503
}

func isOutcomeUnknown(err error) bool {
	var e *events.Error
	return errors.As(err, &e) && e.Code == events.CodeOutcomeUnknown
}

// TestAReadNobodyAnswersIsSentAgainAndAnsweredOnceALeaderIs: while a stream's leader is
// cut off and no new one is elected, no server answers a read at all. A read sent then
// is sent again every resendAfter, so that it is answered within a moment of the
// election rather than wait out its time.
func TestAReadNobodyAnswersIsSentAgainAndAnsweredOnceALeaderIs(t *testing.T) {
	_, nc := embeddedtest.Start(t, embedded.Options{NoJetStream: true})
	lr := mustLeaderReads(t, nc)
	elected := time.Now().Add(300 * time.Millisecond) // nobody answers before
	if _, err := nc.Subscribe("$JS.API.STREAM.MSG.GET.S", func(m *nats.Msg) {
		if time.Now().Before(elected) {
			return
		}
		_ = m.Respond([]byte(`{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"s.a","seq":7,"data":"aGk=","time":"2026-12-05T00:00:00Z"}}`))
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	m, err := lr.Get(ctx, "S", Request{LastBySubj: "s.a"})
	if err != nil {
		t.Fatalf("the read failed with %v; a leader answered from 300 ms on", err)
	}
	if m.Sequence != 7 {
		t.Fatalf("read %d, want 7", m.Sequence)
	}
	if took := time.Since(start); took > 300*time.Millisecond+resendAfter+200*time.Millisecond {
		t.Fatalf("answered after %s, want within %s of the leader's first answer", took, resendAfter)
	}
}

// TestElectedIsClosedWhenAStreamAnnouncesALeader: Elected's channel is closed at the
// next leader-elected advisory, and a new one waits for the one after.
func TestElectedIsClosedWhenAStreamAnnouncesALeader(t *testing.T) {
	_, nc := embeddedtest.Start(t, embedded.Options{NoJetStream: true})
	lr := mustLeaderReads(t, nc)
	first := lr.Elected()
	select {
	case <-first:
		t.Fatal("closed before any election")
	default:
	}
	announceElection(t, nc, "S")
	select {
	case <-first:
	case <-time.After(2 * time.Second):
		t.Fatal("not closed by an election's advisory")
	}
	select {
	case <-lr.Elected():
		t.Fatal("the next channel is closed before the next election")
	default:
	}
}

// TestSuspectAllVerifiesEveryStreamsReads: an instance back from a network cut heard
// none of the elections of the other side; after SuspectAll every stream's reads are
// verified for a while.
func TestSuspectAllVerifiesEveryStreamsReads(t *testing.T) {
	_, nc := embeddedtest.Start(t, embedded.Options{NoJetStream: true})
	lr := mustLeaderReads(t, nc)
	if lr.Suspected("Any") {
		t.Fatal("a stream is suspected before anything happened")
	}
	lr.SuspectAll()
	if !lr.Suspected("Any") || !lr.Suspected("Other") {
		t.Fatal("after SuspectAll a stream's reads are not verified")
	}
}

// announceElection publishes the advisory of a leader elected for stream, as the new
// leader does.
func announceElection(t *testing.T, nc *nats.Conn, stream string) {
	t.Helper()
	if err := nc.Publish("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED."+stream, []byte(`{"type":"io.nats.jetstream.advisory.v1.stream_leader_elected"}`)); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}
