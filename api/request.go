package api

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/attrd/attrd/events"
)

// Request is a request body, read strictly: every field has the JSON type the contract
// gives it. Fields absent from the body are nil or "". A field of the wrong type is
// kept as an error and reported after authentication, as E008002.
type Request struct {
	CurrentApp  string
	UST         string // ust
	CurrentUST  string // current_ust
	TargetUST   string // target_ust
	UserID      string
	Name        *string
	Value       json.RawMessage // nil when absent; "null" is a value
	Data        []json.RawMessage
	HasData     bool
	Expiration  *int64
	Encrypt     *bool
	Decrypt     *bool
	RequestID   string
	Username    string
	Password    string
	IsSuperUser *bool
	RemoteAddr  string
	UserAgent   string
	// History queries.
	SessionID string
	Since     string
	Until     string
	At        string
	Types     []string
	After     *int64 // history: a sequence
	AfterName string // names: the last name of the previous page
	Limit     *int64

	present map[string]bool
	typeErr error
}

// Has reports whether the body had the field, whatever its value.
func (r *Request) Has(field string) bool { return r.present[field] }

// DefaultMaxBodyBytes is the largest request body read, unless configured.
const DefaultMaxBodyBytes = 1 << 20

// wire is a request body as sent: every field raw, so that its type can be checked.
// A field absent from the body is nil; JSON null is "null".
type wire struct {
	CurrentApp  json.RawMessage `json:"current_app"`
	UST         json.RawMessage `json:"ust"`
	CurrentUST  json.RawMessage `json:"current_ust"`
	TargetUST   json.RawMessage `json:"target_ust"`
	UserID      json.RawMessage `json:"user_id"`
	Name        json.RawMessage `json:"name"`
	Value       json.RawMessage `json:"value"`
	Data        json.RawMessage `json:"data"`
	Expiration  json.RawMessage `json:"expiration"`
	Encrypt     json.RawMessage `json:"encrypt"`
	Decrypt     json.RawMessage `json:"decrypt"`
	RequestID   json.RawMessage `json:"request_id"`
	Username    json.RawMessage `json:"username"`
	Password    json.RawMessage `json:"password"`
	IsSuperUser json.RawMessage `json:"is_super_user"`
	RemoteAddr  json.RawMessage `json:"remote_addr"`
	UserAgent   json.RawMessage `json:"user_agent"`
	SessionID   json.RawMessage `json:"session_id"`
	Since       json.RawMessage `json:"since"`
	Until       json.RawMessage `json:"until"`
	At          json.RawMessage `json:"at"`
	Types       json.RawMessage `json:"types"`
	After       json.RawMessage `json:"after"`
	Limit       json.RawMessage `json:"limit"`
}

// ParseJSON reads a JSON request body with the default nesting bound (transports use
// Service.ParseBody, which applies the configured limits).
func ParseJSON(body []byte) (*Request, error) { return parseJSON(body, DefaultMaxDepth) }

// ParseMsgpack reads a msgpack request body with the default nesting bound.
func ParseMsgpack(body []byte) (*Request, error) { return parseMsgpack(body, DefaultMaxDepth) }

// ParseBody reads a request body as a transport received it: over the size limit is
// E008002; msgpack or JSON, nested deeper than the limit allows, malformed, truncated,
// followed by trailing data or not an object is CodeBadRequest.
func (s *Service) ParseBody(body []byte, isMsgpack bool) (*Request, error) {
	if err := s.CheckBodySize(len(body)); err != nil {
		return nil, err
	}
	if isMsgpack {
		return parseMsgpack(body, s.cfg.Limits.MaxDepth)
	}
	return parseJSON(body, s.cfg.Limits.MaxDepth)
}

// parseJSON reads a JSON request body whose values nest at most maxDepth deep.
func parseJSON(body []byte, maxDepth int) (*Request, error) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		body = []byte("{}")
	}
	if body[0] != '{' {
		return nil, events.Errorf(events.CodeBadRequest, "the body is not a JSON object")
	}
	// Bound the nesting before any decoder sees the body: encoding/json would recurse
	// 10,000 levels deep, and a value that deep is nobody's attribute.
	if _, err := jsonDepth(body, maxDepth+bodyDepthSlack); err != nil {
		return nil, events.Errorf(events.CodeBadRequest, "the body nests more than %d levels deep", maxDepth+bodyDepthSlack)
	}
	var w wire
	// json.Unmarshal rejects malformed and truncated JSON and anything after the value.
	if err := json.Unmarshal(body, &w); err != nil {
		return nil, events.Errorf(events.CodeBadRequest, "malformed JSON: %v", err)
	}
	r := &Request{present: map[string]bool{}}
	if !utf8.Valid(body) {
		// encoding/json would quietly turn invalid bytes into U+FFFD in some fields and
		// keep them raw in others (values are kept as sent): refuse them everywhere.
		r.fail("strings must be valid UTF-8")
	}
	r.CurrentApp = r.str("current_app", w.CurrentApp)
	r.UST = r.str("ust", w.UST)
	r.CurrentUST = r.str("current_ust", w.CurrentUST)
	r.TargetUST = r.str("target_ust", w.TargetUST)
	r.UserID = r.str("user_id", w.UserID)
	if w.Name != nil {
		r.present["name"] = true
		if s, ok := unquote(w.Name); ok {
			r.Name = &s
		} else {
			r.fail("name must be a string")
		}
	}
	if w.Value != nil {
		r.present["value"] = true
		r.Value = compact(w.Value)
	}
	if w.Data != nil {
		r.present["data"] = true
		r.HasData = true
		if w.Data[0] != '[' || json.Unmarshal(w.Data, &r.Data) != nil {
			r.fail("data must be a list")
		}
	}
	r.Expiration = r.integer("expiration", w.Expiration)
	r.Encrypt = r.boolean("encrypt", w.Encrypt)
	r.Decrypt = r.boolean("decrypt", w.Decrypt)
	r.IsSuperUser = r.boolean("is_super_user", w.IsSuperUser)
	r.RequestID = r.str("request_id", w.RequestID)
	r.Username = r.str("username", w.Username)
	r.Password = r.str("password", w.Password)
	r.RemoteAddr = r.str("remote_addr", w.RemoteAddr)
	r.UserAgent = r.str("user_agent", w.UserAgent)
	r.SessionID = r.str("session_id", w.SessionID)
	r.Since = r.str("since", w.Since)
	r.Until = r.str("until", w.Until)
	r.At = r.str("at", w.At)
	if len(w.After) > 0 && w.After[0] == '"' {
		r.AfterName = r.str("after", w.After) // names page after a name
	} else {
		r.After = r.integer("after", w.After)
	}
	r.Limit = r.integer("limit", w.Limit)
	if w.Types != nil {
		r.present["types"] = true
		if w.Types[0] != '[' || json.Unmarshal(w.Types, &r.Types) != nil {
			r.fail("types must be a list of event types")
		}
	}
	return r, nil
}

// unquote returns the string a raw JSON value holds, and false if it is no string.
func unquote(raw json.RawMessage) (string, bool) {
	if len(raw) < 2 || raw[0] != '"' {
		return "", false
	}
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw[1 : len(raw)-1]), true // valid JSON without escapes: as is
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", false
	}
	return s, true
}

// parseMsgpack reads a msgpack request body (a map with string keys) by way of its JSON
// equivalent, so both encodings obey the same rules. The conversion is iterative and
// bounds the nesting as it goes: no body can exhaust the stack or the memory.
func parseMsgpack(body []byte, maxDepth int) (*Request, error) {
	js, err := msgpackToJSON(body, maxDepth+bodyDepthSlack)
	if errors.Is(err, errTooDeep) {
		return nil, events.Errorf(events.CodeBadRequest, "the body nests more than %d levels deep", maxDepth+bodyDepthSlack)
	}
	if err != nil {
		return nil, events.Errorf(events.CodeBadRequest, "malformed msgpack: %v", err)
	}
	return parseJSON(js, maxDepth)
}

func (r *Request) fail(format string, args ...any) {
	if r.typeErr == nil {
		r.typeErr = events.Errorf(events.CodeInvalidInput, format, args...)
	}
}

func (r *Request) str(name string, raw json.RawMessage) string {
	if raw == nil {
		return ""
	}
	r.present[name] = true
	if string(raw) == "null" {
		return ""
	}
	s, ok := unquote(raw)
	if !ok {
		r.fail("%s must be a string", name)
	}
	return s
}

func (r *Request) boolean(name string, raw json.RawMessage) *bool {
	if raw == nil {
		return nil
	}
	r.present[name] = true
	b, err := parseBool(raw)
	if err != nil {
		r.fail("%s must be true or false", name)
		return nil
	}
	return &b
}

func (r *Request) integer(name string, raw json.RawMessage) *int64 {
	if raw == nil {
		return nil
	}
	r.present[name] = true
	n, err := parseInt(raw)
	if err != nil {
		r.fail("%s must be a whole number: %v", name, err)
		return nil
	}
	return &n
}

// parseBool accepts only the JSON literals true and false.
func parseBool(raw json.RawMessage) (bool, error) {
	switch string(raw) {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, fmt.Errorf("not a boolean")
}

// parseInt accepts only a JSON integer: no quotes, fraction or exponent (json.Number
// would take the string "10").
func parseInt(raw json.RawMessage) (int64, error) {
	s := string(raw)
	for i, c := range s {
		if !(c >= '0' && c <= '9' || i == 0 && c == '-') {
			return 0, fmt.Errorf("not an integer")
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

// compact returns raw JSON without insignificant white space (raw is valid JSON).
func compact(raw json.RawMessage) json.RawMessage {
	if bytes.IndexAny(raw, " \t\r\n") < 0 {
		return raw // nothing to take out (the decoder has checked it is valid)
	}
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return raw
	}
	return b.Bytes()
}

// fingerprint identifies a request by what makes it the same request: its operation,
// its target and the fields that say what to do. The caller's token is left out (the
// request key already scopes a request id to its user), and so is a new user's
// password (a hash of it would be stored in the log; a retry with another password is
// taken as the same request).
func (r *Request) fingerprint(op Op) string {
	h := sha256.New()
	put := func(name string, v []byte) {
		fmt.Fprintf(h, "%s=%d:", name, len(v))
		h.Write(v)
	}
	put("op", []byte(op))
	put("user_id", []byte(r.UserID))
	put("target", []byte(events.SessionID(r.TargetUST)))
	if r.Name != nil {
		put("name", []byte(*r.Name))
	}
	put("value", r.Value)
	for _, d := range r.Data {
		put("data", compact(d))
	}
	if r.Expiration != nil {
		put("expiration", strconv.AppendInt(nil, *r.Expiration, 10))
	}
	if r.Encrypt != nil {
		put("encrypt", strconv.AppendBool(nil, *r.Encrypt))
	}
	if r.IsSuperUser != nil {
		put("is_super_user", strconv.AppendBool(nil, *r.IsSuperUser))
	}
	put("username", []byte(r.Username))
	return base64.RawURLEncoding.EncodeToString(h.Sum(nil)[:16])
}

// Item is one attribute of a write: name, value and its own options.
type Item struct {
	Name       string
	Value      json.RawMessage
	Expiration *int64
	Encrypt    *bool
}

// Limits bound what one request may hold.
type Limits struct {
	MaxValueBytes int // encoded JSON of one value (default 64 KiB)
	MaxItems      int // items of one request (default 1000)
	MaxBodyBytes  int // a request body (default 1 MiB)
	MaxDepth      int // nesting of one value (default DefaultMaxDepth)
	MaxReplyBytes int // a reply (default 4 MiB, and never more than NATS carries)
	// What one owner may hold (0: the defaults below; negative: no cap).
	MaxAttrsPerUser    int
	MaxAttrsPerSession int
	MaxSessionsPerUser int
}

// Default caps on what one owner may hold.
const (
	DefaultMaxAttrsPerUser    = 10_000
	DefaultMaxAttrsPerSession = 1_000
	DefaultMaxSessionsPerUser = 1_000
)

// Bounds of the audit fields a service reports for its end user.
const (
	MaxRemoteAddrBytes = 256
	MaxUserAgentBytes  = 512
)

// validAuditField refuses an audit field that is too long or holds control characters
// (they could forge lines or colours in a terminal that shows the history).
func validAuditField(field, v string, max int) error {
	if len(v) > max {
		return events.Errorf(events.CodeInvalidInput, "%s has %d bytes, the limit is %d", field, len(v), max)
	}
	if !utf8.ValidString(v) || strings.IndexFunc(v, isControl) >= 0 {
		return events.Errorf(events.CodeInvalidInput, "%s must be text without control characters", field)
	}
	return nil
}

// isControl reports C0 and C1 control characters and DEL.
func isControl(r rune) bool { return r < 0x20 || r >= 0x7f && r < 0xa0 }

// CleanAuditField makes a value the transport read (a header) fit the audit history:
// control characters become U+FFFD, invalid UTF-8 too, and it is cut to max bytes.
func CleanAuditField(v string, max int) string {
	v = strings.ToValidUTF8(v, "\uFFFD")
	v = strings.Map(func(r rune) rune {
		if isControl(r) {
			return utf8.RuneError
		}
		return r
	}, v)
	if len(v) > max {
		v = v[:max]
		for !utf8.ValidString(v) {
			v = v[:len(v)-1]
		}
	}
	return v
}

// MaxPasswordBytes is the longest password.
const MaxPasswordBytes = 1024

// MaxNameBytes is the longest attribute name.
const MaxNameBytes = 191

// ValidateName applies the contract's rules for attribute names: 1 to 191 bytes of
// UTF-8 with no C0 control character and no DEL.
func ValidateName(name string) error {
	if name == "" || len(name) > MaxNameBytes {
		return events.Errorf(events.CodeInvalidInput, "a name has 1 to %d bytes, this one %d", MaxNameBytes, len(name))
	}
	if !utf8.ValidString(name) {
		return events.Errorf(events.CodeInvalidInput, "a name must be UTF-8")
	}
	for i := 0; i < len(name); i++ {
		if name[i] < 0x20 || name[i] == 0x7f {
			return events.Errorf(events.CodeInvalidInput, "a name has no control characters")
		}
	}
	return nil
}

// items returns the items of a write request: name+value, or data; top-level
// expiration and encrypt are the defaults of every item. needValue is false for
// nothing today (all writes need a value) but keeps the rule in one place.
func (r *Request) items(lim Limits) ([]Item, error) {
	var items []Item
	switch {
	case r.HasData:
		if len(r.Data) > lim.MaxItems {
			return nil, events.Errorf(events.CodeInvalidInput, "%d items, the limit is %d", len(r.Data), lim.MaxItems)
		}
		for i, raw := range r.Data {
			it, err := parseItem(raw)
			if err != nil {
				return nil, events.Errorf(events.CodeInvalidInput, "data[%d]: %v", i, err)
			}
			items = append(items, it)
		}
	case r.Name != nil:
		items = []Item{{Name: *r.Name, Value: r.Value}}
	default:
		return nil, events.Errorf(events.CodeInvalidInput, "neither name nor data given")
	}
	if len(items) == 0 {
		return nil, events.Errorf(events.CodeInvalidInput, "data is empty")
	}
	maxDepth := lim.MaxDepth
	if maxDepth <= 0 {
		maxDepth = DefaultMaxDepth
	}
	seen := make(map[string]bool, len(items))
	for i := range items {
		it := &items[i]
		if err := ValidateName(it.Name); err != nil {
			return nil, err
		}
		if seen[it.Name] {
			return nil, events.Errorf(events.CodeInvalidInput, "the name %q is given twice", it.Name)
		}
		seen[it.Name] = true
		if it.Value == nil {
			return nil, events.Errorf(events.CodeInvalidInput, "no value for %q", it.Name)
		}
		if len(it.Value) > lim.MaxValueBytes {
			return nil, events.Errorf(events.CodeInvalidInput, "the value of %q has %d bytes, the limit is %d", it.Name, len(it.Value), lim.MaxValueBytes)
		}
		if _, err := jsonDepth(it.Value, maxDepth); err != nil {
			return nil, events.Errorf(events.CodeInvalidInput, "the value of %q nests more than %d levels deep", it.Name, maxDepth)
		}
		if it.Expiration == nil {
			it.Expiration = r.Expiration
		}
		if it.Encrypt == nil {
			it.Encrypt = r.Encrypt
		}
		if it.Expiration != nil && *it.Expiration < 0 {
			return nil, events.Errorf(events.CodeInvalidInput, "expiration of %q is negative", it.Name)
		}
	}
	return items, nil
}

// parseItem reads one {name, value, expiration?, encrypt?} of data.
func parseItem(raw json.RawMessage) (Item, error) {
	var f map[string]json.RawMessage
	if len(raw) == 0 || raw[0] != '{' || json.Unmarshal(raw, &f) != nil {
		return Item{}, fmt.Errorf("an item must be an object")
	}
	var it Item
	name, ok := unquote(f["name"])
	if !ok {
		return Item{}, fmt.Errorf("an item needs a string name")
	}
	it.Name = name
	if v, ok := f["value"]; ok {
		it.Value = compact(v)
	}
	if e, ok := f["expiration"]; ok {
		n, err := parseInt(e)
		if err != nil {
			return Item{}, fmt.Errorf("expiration must be a whole number")
		}
		it.Expiration = &n
	}
	if e, ok := f["encrypt"]; ok {
		b, err := parseBool(e)
		if err != nil {
			return Item{}, fmt.Errorf("encrypt must be true or false")
		}
		it.Encrypt = &b
	}
	return it, nil
}

// names returns the names of a read or delete request: name, or data as a list of names.
func (r *Request) names(lim Limits) ([]string, bool, error) {
	if r.HasData {
		if len(r.Data) > lim.MaxItems {
			return nil, true, events.Errorf(events.CodeInvalidInput, "%d names, the limit is %d", len(r.Data), lim.MaxItems)
		}
		names := make([]string, 0, len(r.Data))
		seen := make(map[string]bool, len(r.Data))
		for i, raw := range r.Data {
			var n string
			if len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &n) != nil {
				return nil, true, events.Errorf(events.CodeInvalidInput, "data[%d] must be a name", i)
			}
			if err := ValidateName(n); err != nil {
				return nil, true, err
			}
			if seen[n] {
				return nil, true, events.Errorf(events.CodeInvalidInput, "the name %q is given twice", n)
			}
			seen[n] = true
			names = append(names, n)
		}
		return names, true, nil
	}
	if r.Name == nil {
		return nil, false, events.Errorf(events.CodeInvalidInput, "neither name nor data given")
	}
	if err := ValidateName(*r.Name); err != nil {
		return nil, false, err
	}
	return []string{*r.Name}, false, nil
}
