package leaderread

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/deploy/embedded"
	"github.com/attrd/attrd/deploy/embedded/embeddedtest"
)

// snapshotEnv is a stream S (subjects s.>) with direct gets, and a Snapshots on it.
func snapshotEnv(t *testing.T, direct bool) (jetstream.JetStream, *Snapshots) {
	t.Helper()
	_, nc := embeddedtest.Start(t, embedded.Options{})
	js, _ := jetstream.New(nc)
	if _, err := js.CreateStream(context.Background(), jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"},
		AllowDirect: direct, MaxMsgsPerSubject: 1}); err != nil {
		t.Fatal(err)
	}
	snaps, err := NewSnapshots(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = snaps.Close() })
	return js, snaps
}

// TestASnapshotHasTheLastMessageOfEverySubjectThatHasOne: 600 subjects (three requests'
// worth), one of them written twice and one deleted with a marker, read at once: each
// subject's last message with its headers, none for subjects never written, and a
// wildcard reads every subject under it.
func TestASnapshotHasTheLastMessageOfEverySubjectThatHasOne(t *testing.T) {
	js, snaps := snapshotEnv(t, true)
	ctx := context.Background()
	var subjects []string
	for i := range 600 {
		subj := fmt.Sprintf("s.k%d", i)
		subjects = append(subjects, subj)
		if _, err := js.Publish(ctx, subj, []byte("v1")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := js.Publish(ctx, "s.k7", []byte("v2")); err != nil {
		t.Fatal(err)
	}
	del, err := js.PublishMsg(ctx, &nats.Msg{Subject: "s.k9", Header: nats.Header{"KV-Operation": []string{"DEL"}}})
	if err != nil {
		t.Fatal(err)
	}
	got, err := snaps.Last(ctx, "S", "s.k0", append(subjects, "s.never"), del.Sequence)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 600 {
		t.Fatalf("%d subjects read, want the 600 written", len(got))
	}
	if string(got["s.k7"].Data) != "v2" || string(got["s.k1"].Data) != "v1" {
		t.Fatalf("s.k7 reads %q, s.k1 %q: want each one's last", got["s.k7"].Data, got["s.k1"].Data)
	}
	if d := got["s.k9"]; d.Sequence != del.Sequence || d.Header.Get("KV-Operation") != "DEL" {
		t.Fatalf("the deleted subject reads sequence %d with headers %v, want its marker at %d", d.Sequence, d.Header, del.Sequence)
	}
	if got["s.k7"].Header.Get(jetstream.SequenceHeader) != "" {
		t.Fatal("the stream's own headers were left in a message's headers")
	}
	wild, err := snaps.Last(ctx, "S", "", []string{"s.>"}, 0)
	if err != nil || len(wild) != 600 {
		t.Fatalf("the wildcard read %d messages (%v), want 600", len(wild), err)
	}
}

// TestASnapshotFromACopyBehindItsFloorIsNotTaken: a copy that does not hold the floor
// (here the only copy, asked for a sequence past its end, as a replica that is behind
// would be) is not taken: the read asks again until its time is up (ErrBehind), and
// takes the answer as soon as the copy holds the floor.
func TestASnapshotFromACopyBehindItsFloorIsNotTaken(t *testing.T) {
	js, snaps := snapshotEnv(t, true)
	ctx := context.Background()
	ack, err := js.Publish(ctx, "s.a", []byte("old"))
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, err := snaps.Last(short, "S", "s.a", []string{"s.a"}, ack.Sequence+1); !errors.Is(err, ErrBehind) {
		t.Fatalf("a read from a copy behind its floor gave %v, want ErrBehind", err)
	}
	// The copy reaches the floor while the read waits.
	go func() {
		time.Sleep(200 * time.Millisecond)
		_, _ = js.Publish(ctx, "s.a", []byte("new"))
	}()
	got, err := snaps.Last(ctx, "S", "s.a", []string{"s.a"}, ack.Sequence+1)
	if err != nil {
		t.Fatal(err)
	}
	if string(got["s.a"].Data) != "new" {
		t.Fatalf("read %q, want the message at the floor", got["s.a"].Data)
	}
}

// TestASnapshotOfAStreamWithoutDirectGetsSaysSo: nobody answers direct gets of a stream
// that does not allow them (ErrNoDirect: the caller reads another way), and a wildcard
// with more messages than one answer holds is ErrTooMany.
func TestASnapshotOfAStreamWithoutDirectGetsSaysSo(t *testing.T) {
	js, snaps := snapshotEnv(t, false)
	ctx := context.Background()
	if _, err := js.Publish(ctx, "s.a", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if _, err := snaps.Last(ctx, "S", "", []string{"s.a"}, 0); !errors.Is(err, ErrNoDirect) {
		t.Fatalf("a stream without direct gets gave %v, want ErrNoDirect", err)
	}
	cfg := jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}, AllowDirect: true, MaxMsgsPerSubject: 1}
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	for i := range 1100 {
		js.PublishAsync(fmt.Sprintf("s.many.%d", i), nil)
	}
	<-js.PublishAsyncComplete()
	if _, err := snaps.Last(ctx, "S", "", []string{"s.many.>"}, 0); !errors.Is(err, ErrTooMany) {
		t.Fatalf("1,100 messages under a wildcard gave %v, want ErrTooMany", err)
	}
}

// TestNextReadsASubjectsMessagesInOrderFromASequence: a batch read returns the
// messages on its subject (a wildcard) from its sequence on, in order, at most batch
// of them, and says whether more follow; from past the end it returns none. A stream
// without direct gets says so.
func TestNextReadsASubjectsMessagesInOrderFromASequence(t *testing.T) {
	js, snaps := snapshotEnv(t, true)
	ctx := context.Background()
	for i := range 10 {
		subj := fmt.Sprintf("s.a.%d", i)
		if i%2 == 1 {
			subj = "s.b"
		}
		if _, err := js.Publish(ctx, subj, []byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	got, more, err := snaps.Next(ctx, "S", "s.a.>", 1, 3)
	if err != nil {
		t.Fatal(err)
	}
	var seqs []uint64
	for _, m := range got {
		seqs = append(seqs, m.Sequence)
	}
	if fmt.Sprint(seqs) != "[1 3 5]" || !more || string(got[1].Data) != "2" || got[1].Subject != "s.a.2" {
		t.Fatalf("read %v (more %v), want s.a's sequences [1 3 5] and more", seqs, more)
	}
	got, more, err = snaps.Next(ctx, "S", "s.a.>", 6, 100)
	if err != nil || len(got) != 2 || got[0].Sequence != 7 || got[1].Sequence != 9 || more {
		t.Fatalf("from 6 read %d messages (more %v, err %v), want 7 and 9 and no more", len(got), more, err)
	}
	if got, more, err = snaps.Next(ctx, "S", "s.a.>", 11, 100); err != nil || len(got) != 0 || more {
		t.Fatalf("past the end read %d messages (more %v, err %v), want none", len(got), more, err)
	}
	njs, nsnaps := snapshotEnv(t, false)
	if _, err := njs.Publish(ctx, "s.a.0", nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := nsnaps.Next(ctx, "S", "s.a.>", 1, 10); !errors.Is(err, ErrNoDirect) {
		t.Fatalf("without direct gets the read gave %v, want ErrNoDirect", err)
	}
}
