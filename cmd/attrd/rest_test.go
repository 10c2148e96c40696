package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/attrd/attrd/api/rest"
)

// httpDo sends a request to the server and returns status, headers and the JSON body.
func httpDo(t testing.TB, s *Server, method, path string, body any, hdr map[string]string) (int, http.Header, map[string]any) {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		js, _ := json.Marshal(b)
		rd = bytes.NewReader(js)
	}
	req, err := http.NewRequest(method, "http://"+s.HTTPAddr()+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if len(bytes.TrimSpace(data)) > 0 {
		if err := json.Unmarshal(data, &out); err != nil {
			t.Fatalf("%s %s: body is not JSON: %q", method, path, data)
		}
	}
	return resp.StatusCode, resp.Header, out
}

func ok(t testing.TB, status int, body map[string]any) {
	t.Helper()
	if status != 200 || body["status"] != "ok" || body["cid"] == nil {
		t.Fatalf("want 200 ok with a cid, got %d %v", status, body)
	}
}

func refused(t testing.TB, status int, body map[string]any, wantStatus int, code string) {
	t.Helper()
	if status != wantStatus || body["status"] != "error" || subStatus(body) != code {
		t.Fatalf("want %d %s, got %d %v", wantStatus, code, status, body)
	}
}

func restLogin(t testing.TB, s *Server, user, pw string) string {
	t.Helper()
	st, _, b := httpDo(t, s, "POST", "/zato/sso/user/login", map[string]any{"username": user, "password": pw, "current_app": "CRM"}, nil)
	ok(t, st, b)
	return b["ust"].(string)
}

func TestRESTEveryRouteWorksAsTheContractMapsIt(t *testing.T) {
	s := mustStart(t, nil)
	ust := restLogin(t, s, "admin", adminPassword)
	au := map[string]any{"ust": ust, "current_app": "CRM"}
	with := func(m map[string]any, kv ...any) map[string]any {
		out := map[string]any{}
		for k, v := range m {
			out[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			out[kv[i].(string)] = kv[i+1]
		}
		return out
	}
	st, _, b := httpDo(t, s, "GET", "/zato/sso/user", au, nil)
	ok(t, st, b)
	if b["username"] != "admin" || b["is_super_user"] != true {
		t.Fatalf("who am I: %v", b)
	}
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user", with(au, "username", "bob", "password", "bob-pw"), nil)
	ok(t, st, b)
	bobID := b["user_id"].(string)
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user/approve", with(au, "user_id", bobID), nil)
	ok(t, st, b)
	st, _, b = httpDo(t, s, "PATCH", "/zato/sso/user/session", au, nil)
	ok(t, st, b)
	if _, err := time.Parse(time.RFC3339Nano, b["expiration_time"].(string)); err != nil {
		t.Fatalf("renew: %v", b)
	}

	for _, scope := range []struct {
		base string
		who  map[string]any
	}{{"/zato/sso/user/attr", au}, {"/zato/sso/session/attr", map[string]any{"current_ust": ust, "target_ust": ust, "current_app": "CRM"}}} {
		base, who := scope.base, scope.who
		st, _, b = httpDo(t, s, "POST", base, with(who, "name", "a", "value", 1), nil)
		ok(t, st, b)
		st, _, b = httpDo(t, s, "POST", base, with(who, "name", "a", "value", 1), nil)
		refused(t, st, b, 403, "E009001")
		st, _, b = httpDo(t, s, "PATCH", base, with(who, "name", "missing", "value", 1), nil)
		refused(t, st, b, 403, "E009002")
		st, _, b = httpDo(t, s, "PATCH", base, with(who, "data", []map[string]any{{"name": "a", "value": 2}}), nil)
		ok(t, st, b)
		st, _, b = httpDo(t, s, "PUT", base, with(who, "name", "b", "value", map[string]any{"k": true}), nil)
		ok(t, st, b)
		st, _, b = httpDo(t, s, "GET", base, with(who, "name", "a"), nil)
		ok(t, st, b)
		if b["found"] != true || b["value"] != 2.0 {
			t.Fatalf("%s get: %v", base, b)
		}
		st, _, b = httpDo(t, s, "GET", base+"/exists", with(who, "data", []string{"a", "z"}), nil)
		ok(t, st, b)
		if r := b["result"].(map[string]any); r["a"] != true || r["z"] != false {
			t.Fatalf("%s exists: %v", base, b)
		}
		st, _, b = httpDo(t, s, "GET", base+"/names", who, nil)
		ok(t, st, b)
		if strings.Join(toStrings(b["result"]), ",") != "a,b" {
			t.Fatalf("%s names: %v", base, b)
		}
		st, _, b = httpDo(t, s, "DELETE", base, with(who, "data", []string{"a", "never"}), nil)
		ok(t, st, b)
		st, _, b = httpDo(t, s, "GET", base, with(who, "name", "a"), nil)
		if st != 200 || b["found"] != false {
			t.Fatalf("%s get after delete: %v", base, b)
		}
	}
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user/logout", au, nil)
	ok(t, st, b)
	st, _, b = httpDo(t, s, "GET", "/zato/sso/user", au, nil)
	refused(t, st, b, 403, "E007001")
}

func toStrings(v any) []string {
	var out []string
	for _, e := range v.([]any) {
		out = append(out, e.(string))
	}
	return out
}

func TestRESTStatusesAndBodiesFollowTheContract(t *testing.T) {
	slow := make(chan struct{})
	close(slow)
	s := mustStart(t, nil)
	ust := restLogin(t, s, "admin", adminPassword)
	badRequest := func(st int, b map[string]any) {
		t.Helper()
		if st != 400 || b["result"] != "Error" || b["details"] != "Bad request" || b["cid"] == nil || len(b) != 3 {
			t.Fatalf("want the 400 envelope, got %d %v", st, b)
		}
	}
	st, _, b := httpDo(t, s, "POST", "/zato/sso/user/login", map[string]any{"username": "admin", "password": "x"}, nil)
	badRequest(st, b) // no current_app
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user/login", map[string]any{"username": "admin", "current_app": "CRM"}, nil)
	badRequest(st, b) // no password
	for _, raw := range []string{`{"current_app":"CRM"`, `{"current_app":"CRM"} {}`, "\xff\xfe", `[1]`} {
		st, _, b = httpDo(t, s, "PATCH", "/zato/sso/user/attr", raw, nil)
		badRequest(st, b)
	}
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user/login", map[string]any{"username": "admin", "password": adminPassword, "current_app": "ERP"}, nil)
	refused(t, st, b, 200, "E004001")
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user/login", map[string]any{"username": "admin", "password": "wrong", "current_app": "CRM"}, nil)
	refused(t, st, b, 403, "E005001")
	if _, has := b["ust"]; has {
		t.Fatal("a refused login returned a ust")
	}
	st, _, b = httpDo(t, s, "PUT", "/zato/sso/user/attr", map[string]any{"ust": ust, "current_app": "CRM", "name": "n", "value": 1, "expiration": "10"}, nil)
	refused(t, st, b, 403, "E008002")
	st, _, b = httpDo(t, s, "PUT", "/zato/sso/user/attr", map[string]any{"ust": ust, "current_app": "CRM", "name": strings.Repeat("n", 192), "value": 1}, nil)
	refused(t, st, b, 403, "E008002")
	st, _, b = httpDo(t, s, "PUT", "/zato/sso/session/attr", map[string]any{"current_ust": ust, "target_ust": "nope", "current_app": "CRM", "name": "n", "value": 1}, nil)
	refused(t, st, b, 403, "E007001")
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user/attr", map[string]any{"ust": ust, "current_app": "CRM", "user_id": "01NOSUCHUSER000000000000000", "name": "n", "value": 1}, nil)
	refused(t, st, b, 403, "E005001")
	big := `{"current_app":"CRM","ust":"` + ust + `","name":"n","value":"` + strings.Repeat("x", 2<<20) + `"}`
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user/attr", big, nil)
	refused(t, st, b, 413, "E008002")
	// Still serving.
	st, _, b = httpDo(t, s, "GET", "/zato/sso/user", map[string]any{"ust": ust, "current_app": "CRM"}, nil)
	ok(t, st, b)
}

func TestRESTSeedExampleWorksUnchanged(t *testing.T) {
	s := mustStart(t, nil)
	ust := restLogin(t, s, "admin", adminPassword)
	seed := map[string]any{"current_ust": ust, "target_ust": ust, "current_app": "CRM", "name": "my-attr",
		"value": "my-value", "encrypt": true, "expiration": 900}
	st, _, b := httpDo(t, s, "PUT", "/zato/sso/session/attr", seed, nil) // the attribute must exist to be updated
	ok(t, st, b)
	st, _, b = httpDo(t, s, "PATCH", "/zato/sso/session/attr", seed, nil)
	ok(t, st, b)
	if len(b) != 2 {
		t.Fatalf("the seed's update answers exactly status and cid: %v", b)
	}
}

func TestRESTBrowserFormsQueryStringBearerAndIdempotencyKey(t *testing.T) {
	s := mustStart(t, nil)
	ust := restLogin(t, s, "admin", adminPassword)
	bearer := map[string]string{"Authorization": "Bearer " + ust}
	st, _, b := httpDo(t, s, "POST", "/zato/sso/user/attr", map[string]any{"current_app": "CRM", "data": []map[string]any{
		{"name": "a b", "value": 1}, {"name": "c", "value": "secret", "encrypt": true}}}, bearer)
	ok(t, st, b)
	q := url.Values{"current_app": {"CRM"}, "name": {"a b"}}
	st, _, b = httpDo(t, s, "GET", "/zato/sso/user/attr?"+q.Encode(), nil, bearer)
	ok(t, st, b)
	if b["found"] != true || b["value"] != 1.0 {
		t.Fatalf("query-string get of one name: %v", b)
	}
	q = url.Values{"current_app": {"CRM"}, "name": {"a b", "c", "zz"}, "decrypt": {"false"}}
	st, _, b = httpDo(t, s, "GET", "/zato/sso/user/attr?"+q.Encode(), nil, bearer)
	ok(t, st, b)
	r := b["result"].(map[string]any)
	if r["zz"].(map[string]any)["found"] != false || r["c"].(map[string]any)["value"] == "secret" {
		t.Fatalf("repeated name is data, decrypt=false keeps ciphertext: %v", b)
	}
	q = url.Values{"current_app": {"CRM"}, "decrypt": {"yes"}, "name": {"c"}}
	st, _, b = httpDo(t, s, "GET", "/zato/sso/user/attr?"+q.Encode(), nil, bearer)
	refused(t, st, b, 403, "E008002")
	q = url.Values{"current_app": {"CRM"}, "name": {"a b"}, "ust": {ust}}
	st, _, b = httpDo(t, s, "GET", "/zato/sso/user/attr/exists?"+q.Encode(), nil, nil)
	if st != 200 || b["result"] != true {
		t.Fatalf("exists with the UST in the query: %v", b)
	}
	st, _, b = httpDo(t, s, "DELETE", "/zato/sso/user/attr?"+url.Values{"current_app": {"CRM"}, "name": {"a b"}}.Encode(), nil, bearer)
	ok(t, st, b)
	// Bearer on session endpoints fills current_ust.
	st, _, b = httpDo(t, s, "PUT", "/zato/sso/session/attr", map[string]any{"current_app": "CRM", "target_ust": ust, "name": "s", "value": 1}, bearer)
	ok(t, st, b)
	// Idempotency-Key is the request id: the repeat answers the first outcome.
	key := map[string]string{"Authorization": "Bearer " + ust, "Idempotency-Key": "idem-1"}
	body := map[string]any{"current_app": "CRM", "name": "once", "value": 1}
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user/attr", body, key)
	ok(t, st, b)
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user/attr", body, key)
	ok(t, st, b) // a second create would be E009001
	st, _, b = httpDo(t, s, "POST", "/zato/sso/user/attr", body, bearer)
	refused(t, st, b, 403, "E009001")
}

func TestRESTCORSAnswersPreflightsForConfiguredOriginsOnly(t *testing.T) {
	s := mustStart(t, func(c *Config) { c.CORSOrigins = []string{"https://app.example"} })
	pre := func(origin string) http.Header {
		_, h, _ := httpDo(t, s, "OPTIONS", "/zato/sso/user/attr", nil, map[string]string{
			"Origin": origin, "Access-Control-Request-Method": "PATCH", "Access-Control-Request-Headers": "authorization, content-type"})
		return h
	}
	h := pre("https://app.example")
	if h.Get("Access-Control-Allow-Origin") != "https://app.example" || h.Get("Access-Control-Allow-Credentials") != "true" ||
		!strings.Contains(h.Get("Access-Control-Allow-Methods"), "PATCH") || !strings.Contains(h.Get("Access-Control-Allow-Headers"), "Authorization") {
		t.Fatalf("preflight of an allowed origin: %v", h)
	}
	if h := pre("https://evil.example"); h.Get("Access-Control-Allow-Origin") != "" {
		t.Fatalf("preflight of another origin allowed: %v", h)
	}
	_, h, _ = httpDo(t, s, "GET", "/zato/sso/user", map[string]any{"current_app": "CRM"}, map[string]string{"Origin": "https://app.example"})
	if h.Get("Access-Control-Allow-Origin") != "https://app.example" || !strings.Contains(h.Get("Vary"), "Origin") {
		t.Fatalf("simple request from an allowed origin: %v", h)
	}
	any := mustStart(t, func(c *Config) { c.CORSOrigins = []string{"*"} })
	_, h, _ = httpDo(t, any, "OPTIONS", "/zato/sso/user/attr", nil, map[string]string{"Origin": "https://x.example", "Access-Control-Request-Method": "GET"})
	if h.Get("Access-Control-Allow-Origin") != "*" || h.Get("Access-Control-Allow-Credentials") != "" {
		t.Fatalf("* must allow any origin without credentials: %v", h)
	}
}

func TestRESTSecurityHeadersAreOnEveryResponse(t *testing.T) {
	s := mustStart(t, nil)
	for _, path := range []string{"/zato/sso/user", "/openapi.json", "/nope"} {
		_, h, _ := httpDo(t, s, "GET", path, nil, nil)
		for k, v := range map[string]string{"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"} {
			if h.Get(k) != v {
				t.Fatalf("%s: %s = %q, want %q", path, k, h.Get(k), v)
			}
		}
		if !strings.Contains(h.Get("Content-Security-Policy"), "default-src 'none'") {
			t.Fatalf("%s: no CSP", path)
		}
	}
}

func TestOpenAPIDescribesExactlyTheServedRoutes(t *testing.T) {
	s := mustStart(t, nil)
	resp, err := http.Get("http://" + s.HTTPAddr() + "/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc struct {
		OpenAPI string                                `json:"openapi"`
		Paths   map[string]map[string]json.RawMessage `json:"paths"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil || !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Fatalf("/openapi.json is not an OpenAPI 3 document: %v", err)
	}
	served := map[string]bool{}
	for _, r := range rest.Routes() {
		served[r.Method+" "+r.Path] = true
		if _, ok := doc.Paths[r.Path][strings.ToLower(r.Method)]; !ok {
			t.Errorf("served route %s %s is not in the OpenAPI description", r.Method, r.Path)
		}
		// And it is really served: not a 404 or 405 from the router.
		if st, _, _ := httpDo(t, s, r.Method, r.Path, map[string]any{"current_app": "CRM"}, nil); st == 404 || st == 405 {
			t.Errorf("%s %s answers %d", r.Method, r.Path, st)
		}
	}
	for path, ops := range doc.Paths {
		for m := range ops {
			if !served[strings.ToUpper(m)+" "+path] {
				t.Errorf("the description has %s %s, which is not served", m, path)
			}
		}
	}
}

func TestRESTAndNATSGiveTheSameBody(t *testing.T) {
	s := mustStart(t, nil)
	ust := restLogin(t, s, "admin", adminPassword)
	// Writes change state, so a write's name gets a suffix per transport ("%s").
	cases := []struct {
		method, path, op string
		body             map[string]any
	}{
		{"POST", "/zato/sso/user/attr", "user.attr.create", map[string]any{"name": "new-%s", "value": []int{1}}},
		{"POST", "/zato/sso/user/attr", "user.attr.create", map[string]any{"name": "taken", "value": 1}},
		{"PATCH", "/zato/sso/user/attr", "user.attr.update", map[string]any{"name": "missing", "value": 1}},
		{"GET", "/zato/sso/user/attr/names", "user.attr.names", map[string]any{}},
		{"GET", "/zato/sso/user/attr/exists", "user.attr.exists", map[string]any{"data": []string{"taken", "x"}}},
		{"PUT", "/zato/sso/user/attr", "user.attr.set", map[string]any{"name": "n2", "value": 1, "expiration": "x"}},
		{"GET", "/zato/sso/user", "user.get", map[string]any{}},
		{"GET", "/zato/sso/user", "user.get", map[string]any{"current_app": "ERP"}},
		{"GET", "/zato/sso/user", "user.get", map[string]any{"current_app": nil}},
	}
	httpDo(t, s, "POST", "/zato/sso/user/attr", map[string]any{"ust": ust, "current_app": "CRM", "name": "taken", "value": 0}, nil)
	for _, c := range cases {
		body := func(transport string) map[string]any {
			b := map[string]any{"ust": ust, "current_app": "CRM"}
			for k, v := range c.body {
				if v == nil {
					delete(b, k)
				} else if s, ok := v.(string); ok && strings.Contains(s, "%s") {
					b[k] = fmt.Sprintf(s, transport)
				} else {
					b[k] = v
				}
			}
			return b
		}
		st, _, rb := httpDo(t, s, c.method, c.path, body("rest"), nil)
		hdr, nb := rawJSON(t, s, c.op, body("nats"))
		delete(rb, "cid")
		delete(nb, "cid")
		rj, _ := json.Marshal(rb)
		nj, _ := json.Marshal(nb)
		if !bytes.Equal(rj, nj) {
			t.Errorf("%s %s: REST %s, NATS %s", c.method, c.path, rj, nj)
		}
		if code := hdr.Get("Nats-Service-Error-Code"); code != "" && code != strconv.Itoa(st) {
			t.Errorf("%s %s: HTTP %d, NATS error code %s", c.method, c.path, st, code)
		}
	}
}

// lockedBuffer collects log output from several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestNoUSTPasswordOrValueInAnyLogLine(t *testing.T) {
	var logs lockedBuffer
	s := mustStart(t, func(c *Config) {
		c.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	ust := restLogin(t, s, "admin", adminPassword)
	const value = "value-needle-93ad1"
	httpDo(t, s, "POST", "/zato/sso/user/attr", map[string]any{"ust": ust, "current_app": "CRM", "name": "n", "value": value}, nil)
	httpDo(t, s, "POST", "/zato/sso/user/attr", map[string]any{"ust": ust, "current_app": "CRM", "name": "n", "value": value}, nil) // refused
	httpDo(t, s, "GET", "/zato/sso/user/attr?"+url.Values{"ust": {ust}, "current_app": {"CRM"}, "name": {"n"}}.Encode(), nil, nil)
	httpDo(t, s, "GET", "/zato/sso/user/attr", nil, map[string]string{"Authorization": "Bearer " + ust})
	httpDo(t, s, "POST", "/zato/sso/user/login", map[string]any{"username": "admin", "password": "wrong-password-needle", "current_app": "CRM"}, nil)
	out := logs.String()
	if !strings.Contains(out, "path=/zato/sso/user/attr") {
		t.Fatalf("no access log lines to check: %q", out)
	}
	for _, secret := range []string{ust, value, adminPassword, "wrong-password-needle"} {
		if strings.Contains(out, secret) {
			t.Fatalf("a secret is in the logs: %q", secret)
		}
	}
}

func TestSlowClientsCannotHoldAConnection(t *testing.T) {
	s := mustStart(t, func(c *Config) { c.HTTPReadHeaderTimeout = 300 * time.Millisecond })
	conn, err := net.Dial("tcp", s.HTTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte("GET /zato/sso/user HTTP/1.1\r\nHost: x\r\n")) // and never the end of the headers
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	io.ReadAll(conn) // returns when the server closes the connection
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("the server kept a client that never finished its headers for %v", d)
	}
}
