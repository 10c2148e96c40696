package events

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
)

// kvKey is what NATS KV accepts as a key token here (no dots: EncodeName must not emit
// one, or a name would become several tokens).
var kvToken = regexp.MustCompile(`^[-_=a-zA-Z0-9]+$`)

func TestEncodeNameRoundTripsAndYieldsAKeyToken(t *testing.T) {
	for _, n := range []string{"a", "a.b", "a:b", "a+b", "a b", "ünï©ødé", "日本語", "=41", "x/y", ".", "..", "*", ">",
		"\x7f\x01", strings.Repeat("é", 95), "A", "a"} {
		enc := EncodeName(n)
		if !kvToken.MatchString(enc) {
			t.Fatalf("EncodeName(%q) = %q: not a key token", n, enc)
		}
		dec, err := DecodeName(enc)
		if err != nil || dec != n {
			t.Fatalf("DecodeName(EncodeName(%q)) = %q, %v", n, dec, err)
		}
	}
	if EncodeName("A") == EncodeName("a") {
		t.Fatal("encoding must keep case")
	}
}

func TestDecodeNameRejectsBrokenEscapes(t *testing.T) {
	for _, tok := range []string{"=", "=4", "a=G1", "=zz"} {
		if _, err := DecodeName(tok); err == nil {
			t.Fatalf("DecodeName(%q) accepted a broken escape", tok)
		}
	}
}

func FuzzEncodeName(f *testing.F) {
	f.Add("a.b")
	f.Add("=")
	f.Fuzz(func(t *testing.T, n string) {
		enc := EncodeName(n)
		if n != "" && !kvToken.MatchString(enc) {
			t.Fatalf("EncodeName(%q) = %q", n, enc)
		}
		if dec, err := DecodeName(enc); err != nil || dec != n {
			t.Fatalf("round trip of %q: %q, %v", n, dec, err)
		}
	})
}

// TestOneFilterGivesAUsersWholeHistory: in every layout, a user's events and decisions
// are under one filter, inside the user's partition's filter, and the user id reads
// back from each subject; with one partition the subjects are those of every attrd
// before partitions.
func TestOneFilterGivesAUsersWholeHistory(t *testing.T) {
	uid := NewID()
	evs := []*Event{
		{Type: UserCreated, UserID: uid},
		{Type: SessionCreated, UserID: uid, SessionID: "s1"},
		{Type: AttrUpdated, UserID: uid},
		{Type: AttrSet, UserID: uid, SessionID: "s1"},
	}
	if got := (Layout{}).Subject(evs[1]); got != "attrd.events."+uid+".session.s1" {
		t.Fatalf("one partition: %s, not the subject of a deployment made before partitions", got)
	}
	for _, n := range []int{0, 1, 4, 16} {
		l := Layout{Partitions: n}
		prefix := strings.TrimSuffix(l.UserSubjects(uid), ">")
		part := strings.TrimSuffix(l.PartitionSubjects(l.Partition(uid)), ">")
		for _, s := range []string{l.Subject(evs[0]), l.Subject(evs[1]), l.Subject(evs[2]), l.Subject(evs[3]), l.DecisionSubject(uid)} {
			if !strings.HasPrefix(s, prefix) || !strings.HasPrefix(s, part) || UserOfSubject(s) != uid {
				t.Fatalf("%d partitions: %s is not under %s and %s with user %s", n, s, prefix, part, uid)
			}
		}
	}
}

// TestPartitionsSpreadUsersAsTheServersTransformWould: a user's partition is FNV-1a of
// the id modulo N, nats-server's partition(N, token), and users spread over all.
func TestPartitionsSpreadUsersAsTheServersTransformWould(t *testing.T) {
	l := Layout{Partitions: 16}
	seen := map[int]int{}
	for range 1600 {
		seen[l.Partition(NewID())]++
	}
	if len(seen) != 16 {
		t.Fatalf("1,600 users fell in %d of 16 partitions", len(seen))
	}
	for p, n := range seen {
		if n < 50 || n > 150 {
			t.Fatalf("partition %d holds %d of 1,600 users", p, n)
		}
	}
	// The server's own transform puts each user in the same partition.
	tr, err := server.NewSubjectTransform("attrd.events.*.>", "p.{{partition(16,1)}}.{{wildcard(1)}}.>")
	if err != nil {
		t.Fatal(err)
	}
	for range 100 {
		uid := NewID()
		got, err := tr.Match("attrd.events." + uid + ".attr")
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("p.%d.%s.attr", l.Partition(uid), uid); got != want {
			t.Fatalf("the server maps user %s to %s, attrd to %s", uid, got, want)
		}
	}
}

func TestEventsRoundTripThroughMsgpack(t *testing.T) {
	e := &Event{ID: NewID(), Type: AttrCreated, Version: SchemaVersion, Time: 42, UserID: "u",
		Attrs: []AttrItem{{Name: "n", Value: []byte(`{"a":1}`), Enc: Inherit, ExpiresAt: 7}}}
	b, err := Encode(e)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(b)
	if err != nil || got.ID != e.ID || got.Attrs[0].Enc != Inherit || string(got.Attrs[0].Value) != `{"a":1}` {
		t.Fatalf("decoded %+v, %v", got, err)
	}
	if _, err := Decode([]byte{0xc1, 0x00}); err == nil {
		t.Fatal("garbage decoded")
	}
	e.Version = 99
	b, _ = Encode(e)
	if _, err := Decode(b); err == nil {
		t.Fatal("an unknown schema version decoded")
	}
}

func TestErrorsMatchByCode(t *testing.T) {
	err := Errorf(CodeNoAttr, "no %s", "x")
	if !errorsIs(err, ErrNoAttr) || errorsIs(err, ErrAttrExists) {
		t.Fatal("errors.Is must compare codes")
	}
	if CodeOf(err) != CodeNoAttr || CodeOf(nil) != "" || CodeOf(errPlain{}) != CodeInternal {
		t.Fatal("CodeOf")
	}
}

type errPlain struct{}

func (errPlain) Error() string { return "plain" }

func errorsIs(err, target error) bool { return errors.Is(fmt.Errorf("wrapped: %w", err), target) }

// TestAStreamFromBeforePartitionsIsOnePartition: the event stream of a deployment the
// previous version created has no partitions in its metadata: it is read as one
// partition, and events keep the subjects that version wrote (no p<k> token), so an
// upgrade needs no migration.
func TestAStreamFromBeforePartitionsIsOnePartition(t *testing.T) {
	for _, md := range []map[string]string{nil, {}, {MetadataPartitions: "not a number"}} {
		l := LayoutOf(jetstream.StreamConfig{Name: StreamName, Subjects: []string{EventsPrefix + ".>"}, Metadata: md})
		if l.N() != 1 {
			t.Fatalf("metadata %v: %d partitions, want 1", md, l.N())
		}
		uid := NewID()
		ev := &Event{Type: AttrSet, UserID: uid}
		if got, want := l.Subject(ev), EventsPrefix+"."+uid+".attr"; got != want {
			t.Fatalf("metadata %v: subject %s, want the earlier version's %s", md, got, want)
		}
		if l.Partition(uid) != 0 || l.PartitionSubjects(0) != EventsPrefix+".>" {
			t.Fatalf("metadata %v: partition %d, its subjects %s", md, l.Partition(uid), l.PartitionSubjects(0))
		}
	}
}
