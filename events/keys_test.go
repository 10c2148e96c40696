package events

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"
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

func TestOneFilterGivesAUsersWholeHistory(t *testing.T) {
	uid := NewID()
	evs := []*Event{
		{Type: UserCreated, UserID: uid},
		{Type: SessionCreated, UserID: uid, SessionID: "s1"},
		{Type: AttrUpdated, UserID: uid},
		{Type: AttrSet, UserID: uid, SessionID: "s1"},
	}
	prefix := strings.TrimSuffix(UserSubjects(uid), ">")
	for _, e := range evs {
		if s := Subject(e); !strings.HasPrefix(s, prefix) || strings.Split(s, ".")[2] != uid {
			t.Fatalf("%s on %s: not under %s with the user id as third token", e.Type, s, prefix)
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
