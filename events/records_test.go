package events

import (
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

// TestAttributeRecordsOfAnOlderAttrdReadAlike: records are written with one-letter field
// names now; those stored by an older attrd, with long names, must decode to the same.
func TestAttributeRecordsOfAnOlderAttrdReadAlike(t *testing.T) {
	old, err := msgpack.Marshal(map[string]any{"val": []byte(`"x"`), "enc": true, "created": int64(1), "mod": int64(2), "exp": int64(3), "seq": uint64(4)})
	if err != nil {
		t.Fatal(err)
	}
	rec, err := DecodeRecord(AttrKey("u1", "", "a"), old)
	if err != nil {
		t.Fatal(err)
	}
	want := AttrRecord{Value: []byte(`"x"`), Encrypted: true, Created: 1, Modified: 2, ExpiresAt: 3, Seq: 4}
	got := *rec.(*AttrRecord)
	if string(got.Value) != string(want.Value) || got.Encrypted != want.Encrypted || got.Created != want.Created ||
		got.Modified != want.Modified || got.ExpiresAt != want.ExpiresAt || got.Seq != want.Seq {
		t.Fatalf("decoded %+v, want %+v", got, want)
	}
	now, err := Marshal(&want)
	if err != nil {
		t.Fatal(err)
	}
	if len(now) >= len(old) {
		t.Fatalf("the record takes %d bytes, as many as with the old names (%d)", len(now), len(old))
	}
}

// TestTheExpiryHeaderSaysWhatAListingCanTellWithoutTheRecord: a message with a TTL
// carries the expiry; one with neither never expires; one with a TTL but no expiry
// header (an older attrd's) must be read.
func TestTheExpiryHeaderSaysWhatAListingCanTellWithoutTheRecord(t *testing.T) {
	plain := &AttrRecord{}
	if h := RecordHeaders(plain, false); h != nil {
		t.Fatalf("a record that never expires, without a TTL, carries %v", h)
	}
	for _, c := range []struct {
		name   string
		h      map[string][]string
		exp    int64
		knowns bool
	}{
		{"no TTL, no header", RecordHeaders(plain, false), 0, true},
		{"TTL of its session", RecordHeaders(plain, true), 0, true},
		{"its own expiry", RecordHeaders(&AttrRecord{ExpiresAt: 42}, true), 42, true},
		{"older attrd, TTL", map[string][]string{"Nats-TTL": {"5"}}, 0, false},
	} {
		exp, ok := RecordExpiry(c.h)
		if exp != c.exp || ok != c.knowns {
			t.Errorf("%s: expiry %d known %v, want %d %v", c.name, exp, ok, c.exp, c.knowns)
		}
	}
}
