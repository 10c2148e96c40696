package api

import (
	"strings"
	"testing"

	"github.com/attrd/attrd/events"
)

func TestParseJSONRefusesWhatIsNotOneJSONObject(t *testing.T) {
	for name, body := range map[string]string{
		"truncated": `{"current_app":"CRM"`, "trailing": `{"a":1} x`, "two values": `{} {}`,
		"array": `[]`, "string": `"x"`, "garbage": "\xff\x00", "number": `12`,
	} {
		if _, err := ParseJSON([]byte(body)); events.CodeOf(err) != events.CodeBadRequest {
			t.Fatalf("%s: %v, want bad request", name, err)
		}
	}
}

func TestParseJSONTypesAreStrict(t *testing.T) {
	cases := map[string]bool{ // body -> type error expected
		`{"expiration":10}`:         false,
		`{"expiration":"10"}`:       true,
		`{"expiration":1.5}`:        true,
		`{"expiration":1e2}`:        true,
		`{"expiration":true}`:       true,
		`{"encrypt":false}`:         false,
		`{"encrypt":"true"}`:        true,
		`{"decrypt":1}`:             true,
		`{"name":"n"}`:              false,
		`{"name":5}`:                true,
		`{"data":["a"]}`:            false,
		`{"data":"a"}`:              true,
		`{"ust":["x"]}`:             true,
		`{"value":null,"name":"n"}`: false,
	}
	for body, wantErr := range cases {
		r, err := ParseJSON([]byte(body))
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		if (r.typeErr != nil) != wantErr {
			t.Fatalf("%s: type error %v, want error: %v", body, r.typeErr, wantErr)
		}
	}
	r, _ := ParseJSON([]byte(`{"value":null,"name":"n","expiration":9223372036854775807}`))
	if string(r.Value) != "null" || !r.Has("value") || *r.Expiration != 9223372036854775807 {
		t.Fatalf("null is a value, big integers stay exact: %+v", r)
	}
	if _, err := ParseJSON([]byte(`{"expiration":9223372036854775808}`)); err != nil {
		t.Fatal(err)
	} else if r, _ := ParseJSON([]byte(`{"expiration":9223372036854775808}`)); r.typeErr == nil {
		t.Fatal("an expiration past int64 must be invalid input")
	}
}

func TestValidateNameFollowsTheContract(t *testing.T) {
	ok := []string{"a", strings.Repeat("x", 191), "a b", "ü", "日本"}
	bad := []string{"", strings.Repeat("x", 192), "a\x00", "a\x1f", "a\x7f", "\xff\xfe"}
	for _, n := range ok {
		if err := ValidateName(n); err != nil {
			t.Fatalf("%q: %v", n, err)
		}
	}
	for _, n := range bad {
		if events.CodeOf(ValidateName(n)) != events.CodeInvalidInput {
			t.Fatalf("%q accepted", n)
		}
	}
}

func TestItemsApplyTopLevelDefaultsAndRejectDuplicates(t *testing.T) {
	lim := Limits{MaxValueBytes: 10, MaxItems: 2}
	r, _ := ParseJSON([]byte(`{"expiration":5,"encrypt":true,"data":[{"name":"a","value":1},{"name":"b","value":2,"expiration":0,"encrypt":false}]}`))
	items, err := r.items(lim)
	if err != nil {
		t.Fatal(err)
	}
	if *items[0].Expiration != 5 || !*items[0].Encrypt || *items[1].Expiration != 0 || *items[1].Encrypt {
		t.Fatalf("defaults: %+v %+v", items[0], items[1])
	}
	for _, body := range []string{
		`{"data":[{"name":"a","value":1},{"name":"a","value":2}]}`,                        // twice
		`{"data":[{"name":"a","value":1},{"name":"b","value":1},{"name":"c","value":1}]}`, // too many
		`{"name":"a","value":"0123456789"}`,                                               // value too big
		`{"name":"a"}`,                                                                    // no value
		`{"data":[{"value":1}]}`,                                                          // no name
		`{"data":[{"name":"a","value":1,"expiration":"1"}]}`,                              // string expiration
		`{"data":[{"name":"a","value":1,"expiration":-1}]}`,                               // negative
		`{"data":[]}`,
		`{}`,
	} {
		r, _ := ParseJSON([]byte(body))
		if _, err := r.items(lim); events.CodeOf(err) != events.CodeInvalidInput {
			t.Fatalf("%s: %v, want E008002", body, err)
		}
	}
}

func TestPasswordsHashWithArgon2idAndCheck(t *testing.T) {
	p := PasswordParams{Time: 1, MemoryK: 64, Threads: 1}
	h, err := HashPassword("pw", p)
	if err != nil || !strings.HasPrefix(h, "$argon2id$") {
		t.Fatalf("hash %q %v", h, err)
	}
	if !CheckPassword("pw", h) || CheckPassword("wrong", h) || CheckPassword("pw", "garbage") {
		t.Fatal("CheckPassword")
	}
	if h2, _ := HashPassword("pw", p); h2 == h {
		t.Fatal("hashes must be salted")
	}
}

// FuzzParseJSON: whatever the body, parsing and reading its items and names returns
// an error or a request, and never panics.
func FuzzParseJSON(f *testing.F) {
	for _, s := range []string{`{}`, `{"name":"a","value":1}`, `{"data":[{"name":"a","value":{"x":[1,2]}},"b"]}`,
		`{"expiration":-1,"encrypt":"x"}`, `{"types":["a"],"limit":5}`, `[`, `{"name":"\u0000"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := ParseJSON(body)
		checkParsed(t, r, err)
		if _, err := ParseMsgpack(body); err != nil && events.CodeOf(err) == events.CodeInternal {
			t.Fatalf("msgpack: %v", err)
		}
	})
}

// checkParsed fails unless a parse ended in a request whose items and names can be
// read without a panic, or in one of the two codes a body can earn.
func checkParsed(t *testing.T, r *Request, err error) {
	t.Helper()
	if err != nil {
		if c := events.CodeOf(err); c != events.CodeBadRequest && c != events.CodeInvalidInput {
			t.Fatalf("error code %q", c)
		}
		return
	}
	lim := Limits{MaxValueBytes: 64, MaxItems: 10}
	r.items(lim)
	r.names(lim)
}
