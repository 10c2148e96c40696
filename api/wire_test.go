package api

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/attrd/attrd/events"
)

// deepMsgpack is {"current_app":"CRM","value": …} with the value depth one-element
// arrays around a nil: the body that overflowed the stack of the recursive decoder.
func deepMsgpack(depth int) []byte {
	b := []byte{0x82}
	b = append(b, msgpackStr("current_app")...)
	b = append(b, msgpackStr("CRM")...)
	b = append(b, msgpackStr("value")...)
	b = append(b, bytes.Repeat([]byte{0x91}, depth)...)
	return append(b, 0xc0)
}

func msgpackStr(s string) []byte { return append([]byte{0xa0 | byte(len(s))}, s...) }

func TestDeepMsgpackIsABadRequestQuicklyAndWithoutRecursion(t *testing.T) {
	start := time.Now()
	_, err := ParseMsgpack(deepMsgpack(800_000))
	if events.CodeOf(err) != events.CodeBadRequest {
		t.Fatalf("800,000 levels: %v, want the 400 envelope", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("refusing took %s", d)
	}
	// At the limit it is accepted; one more level is refused.
	r, err := ParseMsgpack(deepMsgpack(DefaultMaxDepth))
	if err != nil || !r.Has("value") {
		t.Fatalf("depth %d: %v", DefaultMaxDepth, err)
	}
	if _, err := r.items(Limits{MaxValueBytes: 1 << 20, MaxItems: 10}); err == nil || !strings.Contains(err.Error(), "no value") && events.CodeOf(err) != events.CodeInvalidInput {
		t.Fatalf("items: %v", err)
	}
}

func TestDeepJSONIsABadRequestAndADeepValueInvalidInput(t *testing.T) {
	deep := `{"current_app":"CRM","name":"n","value":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + `}`
	if _, err := ParseJSON([]byte(deep)); events.CodeOf(err) != events.CodeBadRequest {
		t.Fatalf("5000 levels: %v, want the 400 envelope", err)
	}
	lim := Limits{MaxValueBytes: 1 << 20, MaxItems: 10, MaxDepth: 4}
	ok := `{"name":"n","value":[[[[1]]]]}`
	deeper := `{"name":"n","value":[[[[[1]]]]]}`
	inString := `{"name":"n","value":"[[[[[[[[[[["}`
	for body, want := range map[string]events.Code{ok: "", deeper: events.CodeInvalidInput, inString: ""} {
		r, err := parseJSON([]byte(body), lim.MaxDepth)
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		_, err = r.items(lim)
		if events.CodeOf(err) != want {
			t.Fatalf("%s: %v, want %q", body, err, want)
		}
	}
}

func TestMsgpackBodiesReadAsTheirJSONEquivalent(t *testing.T) {
	body := map[string]any{"current_app": "CRM", "name": "a\"b\\c\x01", "expiration": int64(9007199254740993),
		"encrypt": true, "value": map[string]any{"n": -5, "f": 1.5, "l": []any{nil, false, uint64(1 << 63), "x"}, "b": []byte{1, 2}},
		"data": []any{map[string]any{"name": "x", "value": int8(-100)}}}
	mp, err := msgpack.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	r, err := ParseMsgpack(mp)
	if err != nil {
		t.Fatal(err)
	}
	if *r.Name != "a\"b\\c\x01" || *r.Expiration != 9007199254740993 || !*r.Encrypt || len(r.Data) != 1 {
		t.Fatalf("fields: %+v", r)
	}
	var v map[string]any
	if err := json.Unmarshal(r.Value, &v); err != nil {
		t.Fatalf("value %s: %v", r.Value, err)
	}
	if want := `{"b":"AQI=","f":1.5,"l":[null,false,9223372036854775808,"x"],"n":-5}`; string(compactSorted(t, r.Value)) != want {
		t.Fatalf("value %s, want %s", compactSorted(t, r.Value), want)
	}
	for name, bad := range map[string][]byte{
		"truncated":         mp[:len(mp)-3],
		"trailing":          append(append([]byte{}, mp...), 0xc0),
		"lying count":       {0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0},
		"integer map key":   {0x81, 0x01, 0xc0},
		"extension":         {0x81, 0xa1, 'x', 0xd6, 0xff, 0, 0, 0, 0},
		"NaN":               {0x81, 0xa1, 'x', 0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 1},
		"not a map":         {0x91, 0xc0},
		"huge string":       {0x81, 0xa1, 'x', 0xdb, 0xff, 0xff, 0xff, 0xff},
		"never-used 0xc1":   {0x81, 0xa1, 'x', 0xc1},
		"nothing after key": {0x81, 0xa1, 'x'},
	} {
		if _, err := ParseMsgpack(bad); events.CodeOf(err) != events.CodeBadRequest {
			t.Fatalf("%s: %v, want bad request", name, err)
		}
	}
}

func compactSorted(t *testing.T, raw []byte) []byte {
	var v any
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(v)
	return b
}

func TestInvalidUTF8IsInvalidInputInBothEncodings(t *testing.T) {
	r, err := ParseJSON([]byte("{\"name\":\"n\",\"value\":\"a\xffb\"}"))
	if err != nil || events.CodeOf(r.typeErr) != events.CodeInvalidInput {
		t.Fatalf("JSON: %v %v", err, r)
	}
	mp := []byte{0x82, 0xa4, 'n', 'a', 'm', 'e', 0xa1, 'n', 0xa5, 'v', 'a', 'l', 'u', 'e', 0xa3, 'a', 0xff, 'b'}
	r, err = ParseMsgpack(mp)
	if err != nil || events.CodeOf(r.typeErr) != events.CodeInvalidInput {
		t.Fatalf("msgpack: %v %v", err, r)
	}
}

// FuzzParseMsgpack: whatever the body, msgpack parsing returns a request or a bad
// request / invalid input, never panics; and where the msgpack library reads the body
// as a map of plain values, so does the parser.
func FuzzParseMsgpack(f *testing.F) {
	for _, v := range []any{map[string]any{"current_app": "CRM", "name": "a", "value": []any{1, "x", nil}},
		map[string]any{"data": []any{map[string]any{"name": "a", "value": 1.5}}}, []any{1}, "x"} {
		b, _ := msgpack.Marshal(v)
		f.Add(b)
	}
	f.Add(deepMsgpack(100))
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := ParseMsgpack(body)
		checkParsed(t, r, err)
	})
}
