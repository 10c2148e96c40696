// Package rest serves attrd's operations over HTTP, compatible with Zato SSO's REST API
// and fit for browsers. It is a thin transport: it maps a route to an api.Op, turns the
// body (and, for GET and DELETE, the query string and a bearer token) into an
// api.Request, and writes api.Service.Handle's reply with its status. No rule of the
// contract lives here.
package rest

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel/propagation"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/events"
)

// Route is one served method and path.
type Route struct {
	Method string
	Path   string
	Op     api.Op
}

// Routes lists every route, as the contract maps them.
func Routes() []Route {
	rs := []Route{
		{"POST", "/zato/sso/user/login", api.OpLogin},
		{"POST", "/zato/sso/user/logout", api.OpLogout},
		{"GET", "/zato/sso/user", api.OpWhoAmI},
		{"POST", "/zato/sso/user", api.OpUserCreate},
		{"POST", "/zato/sso/user/approve", api.OpUserApprove},
		{"DELETE", "/zato/sso/user", api.OpUserDelete},
		{"PATCH", "/zato/sso/user/session", api.OpSessionRenew},
		{"GET", "/attrd/history", api.OpHistory},
		{"GET", "/attrd/history/at", api.OpHistoryAt},
		{"GET", "/attrd/user/export", api.OpUserExport},
	}
	for _, scope := range []struct {
		base string
		op   func(string) api.Op
	}{{"/zato/sso/user/attr", api.UserAttrOp}, {"/zato/sso/session/attr", api.SessionAttrOp}} {
		rs = append(rs,
			Route{"POST", scope.base, scope.op(api.VerbCreate)},
			Route{"PATCH", scope.base, scope.op(api.VerbUpdate)},
			Route{"PUT", scope.base, scope.op(api.VerbSet)},
			Route{"GET", scope.base, scope.op(api.VerbGet)},
			Route{"DELETE", scope.base, scope.op(api.VerbDelete)},
			Route{"GET", scope.base + "/exists", scope.op(api.VerbExists)},
			Route{"GET", scope.base + "/names", scope.op(api.VerbNames)},
		)
	}
	return append(rs, watchRoutes...)
}

//go:embed openapi.json
var openapi []byte

// OpenAPI returns the OpenAPI 3 description of the REST API.
func OpenAPI() []byte { return openapi }

// Config configures the REST handler.
type Config struct {
	// CORSOrigins are the origins allowed to call from a browser; "*" allows any (then
	// without credentials).
	CORSOrigins []string
	// Logger receives one line per request: method, path, status, duration, cid. Never
	// the query string, a header's value or a body: they hold tokens and values.
	Logger *slog.Logger
	// TrustedProxies are the networks of reverse proxies whose X-Forwarded-For names
	// the client; from anyone else the header is ignored.
	TrustedProxies []netip.Prefix
}

// Handler serves the REST API, /openapi.json included.
func Handler(svc *api.Service, cfg Config) http.Handler {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	inFlight := 4096
	if svc != nil {
		inFlight = svc.Config().MaxInFlight
	}
	h := &handler{svc: svc, cfg: cfg, slots: api.NewGate(inFlight, -1, slotWait, "requests")}
	mux := http.NewServeMux()
	for _, rt := range Routes() {
		mux.HandleFunc(rt.Method+" "+rt.Path, func(w http.ResponseWriter, r *http.Request) { h.serve(w, r, rt.Op) })
	}
	mux.HandleFunc("GET /openapi.json", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(openapi)
	})
	return h.middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := mux.Handler(r); pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		// No route: the router's 404 or 405 (with its Allow header), in JSON.
		rec := &statusOnly{header: w.Header()}
		mux.ServeHTTP(rec, r)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(rec.status)
		b, _ := json.Marshal(map[string]any{"result": "Error", "cid": events.NewID(), "details": http.StatusText(rec.status)})
		w.Write(append(b, '\n'))
	}))
}

// statusOnly keeps the status and headers a handler sets and drops its body.
type statusOnly struct {
	header http.Header
	status int
}

func (s *statusOnly) Header() http.Header         { return s.header }
func (s *statusOnly) Write(b []byte) (int, error) { return len(b), nil }
func (s *statusOnly) WriteHeader(code int)        { s.status = code }

type handler struct {
	svc   *api.Service
	cfg   Config
	slots *api.Gate // requests handled at once
}

// slotWait is how long a request waits for a slot before it is refused as busy.
const slotWait = 2 * time.Second

// statusWriter remembers the status for the access log.
type statusWriter struct {
	http.ResponseWriter
	status int
	cid    string
}

// Unwrap lets http.ResponseController reach the connection's writer (a watch's
// stream flushes each event and sets its own write deadlines).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

// middleware adds security headers and CORS, answers preflights, recovers panics into
// the 500 envelope, and logs each request without its secrets.
func (h *handler) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, status: 200}
		hd := w.Header()
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("Cache-Control", "no-store")
		hd.Set("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("Referrer-Policy", "no-referrer")
		preflight := h.cors(w, r)
		defer func() {
			if p := recover(); p != nil {
				cid := events.NewID()
				h.cfg.Logger.Error("http handler panicked", "cid", cid, "path", r.URL.Path, "panic", p)
				writeReply(sw, api.ErrorReply(cid, errors.New("panic")))
			}
			h.cfg.Logger.Info("http", "method", r.Method, "path", r.URL.Path, "status", sw.status,
				"dur", time.Since(start).Round(time.Microsecond), "cid", sw.cid)
		}()
		if preflight {
			sw.WriteHeader(http.StatusNoContent)
			return
		}
		next.ServeHTTP(sw, r)
	})
}

// cors sets the CORS headers of an allowed origin and reports whether r is a preflight.
// A listed origin is echoed with credentials allowed; "*" allows any origin without
// credentials (a browser refuses "*" with credentials).
func (h *handler) cors(w http.ResponseWriter, r *http.Request) bool {
	origin := r.Header.Get("Origin")
	preflight := r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != ""
	if origin == "" {
		return preflight
	}
	hd := w.Header()
	hd.Add("Vary", "Origin")
	switch {
	case slices.Contains(h.cfg.CORSOrigins, origin):
		hd.Set("Access-Control-Allow-Origin", origin)
		hd.Set("Access-Control-Allow-Credentials", "true")
	case slices.Contains(h.cfg.CORSOrigins, "*"):
		hd.Set("Access-Control-Allow-Origin", "*")
	default:
		return preflight
	}
	if preflight {
		hd.Set("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE")
		hd.Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Idempotency-Key, Last-Event-ID")
		hd.Set("Access-Control-Max-Age", "600")
	}
	return preflight
}

// meta is what the transport knows of a request besides its body.
func (h *handler) meta(w http.ResponseWriter, r *http.Request) api.Meta {
	// The caller is the end user: its address comes from the connection (or a trusted
	// proxy's X-Forwarded-For) and its user agent from the header; remote_addr and
	// user_agent in the body are ignored (Meta.BodyAudit is false).
	m := api.Meta{CID: events.NewID(), Transport: api.TransportREST, UserAgent: api.CleanAuditField(r.UserAgent(), api.MaxUserAgentBytes),
		RequestID: r.Header.Get("Idempotency-Key"), RemoteAddr: ClientAddr(r, h.cfg.TrustedProxies)}
	if sw, ok := w.(*statusWriter); ok {
		sw.cid = m.CID
	}
	return m
}

func (h *handler) serve(w http.ResponseWriter, r *http.Request, op api.Op) {
	m := h.meta(w, r)
	switch op {
	case api.OpUserAttrWatch, api.OpSessionAttrWatch:
		h.watch(w, r, op, m)
		return
	case api.OpWatchTicket:
		if err := h.slots.Do(r.Context(), "", func() { h.ticket(w, r, m) }); err != nil {
			writeReply(w, api.ErrorReply(m.CID, err))
		}
		return
	}
	// At most MaxInFlight requests (and their bodies) at once, as over NATS.
	if err := h.slots.Do(r.Context(), "", func() { h.handle(w, r, op, m) }); err != nil {
		writeReply(w, api.ErrorReply(m.CID, err))
	}
}

// handle reads, parses and runs one request within its slot.
func (h *handler) handle(w http.ResponseWriter, r *http.Request, op api.Op, m api.Meta) {
	body, err := readBody(w, r, h.svc.Config().Limits.MaxBodyBytes)
	if err != nil {
		reason := ""
		if events.CodeOf(err) == events.CodeInvalidInput {
			reason = api.RefusedOversize
		}
		rep := h.svc.Refuse(op, m, err, reason)
		if reason != "" {
			rep.Status = http.StatusRequestEntityTooLarge
		}
		writeReply(w, rep)
		return
	}
	if body, err = browserFields(body, r, op); err != nil {
		writeReply(w, h.svc.Refuse(op, m, err, ""))
		return
	}
	req, err := h.svc.ParseBody(body, false)
	if err != nil {
		writeReply(w, h.svc.Refuse(op, m, err, ""))
		return
	}
	// A caller's W3C traceparent header continues its trace.
	ctx := api.ExtractTrace(r.Context(), propagation.HeaderCarrier(r.Header))
	writeReplyChecked(w, h.svc.Handle(ctx, op, req, m), h.svc.CheckReplySize)
}

// readBody reads at most limit bytes; a larger body is refused without being read
// whole.
func readBody(w http.ResponseWriter, r *http.Request, limit int) ([]byte, error) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, int64(limit)))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return nil, events.Errorf(events.CodeInvalidInput, "the body is over %d bytes", limit)
	}
	if err != nil {
		return nil, events.Errorf(events.CodeBadRequest, "read body: %v", err)
	}
	return b, nil
}

// fields decodes a body that must be a JSON object (empty: none) into its raw fields.
func fields(body []byte) (map[string]json.RawMessage, error) {
	f := map[string]json.RawMessage{}
	if len(bytes.TrimSpace(body)) == 0 {
		return f, nil
	}
	if err := json.Unmarshal(body, &f); err != nil || f == nil {
		return nil, events.Errorf(events.CodeBadRequest, "the body is not a JSON object")
	}
	return f, nil
}

// browserFields adds to the body's fields what a browser sends elsewhere: the query
// string (GET and DELETE) and a bearer token. A field in the body wins. Without either
// the body is left as it is.
func browserFields(body []byte, r *http.Request, op api.Op) ([]byte, error) {
	var q url.Values
	if r.Method == http.MethodGet || r.Method == http.MethodDelete {
		q = r.URL.Query()
	}
	token, bearer := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	bearer = bearer && token != ""
	if len(q) == 0 && !bearer {
		return body, nil
	}
	f, err := fields(body)
	if err != nil {
		return nil, err
	}
	set := func(k string, v any) {
		if _, ok := f[k]; !ok {
			b, _ := json.Marshal(v)
			f[k] = b
		}
	}
	addQuery(set, q)
	if bearer {
		// The caller's UST: ust on user endpoints, current_ust on session attribute ones.
		if strings.HasPrefix(string(op), "session.attr.") {
			set("current_ust", token)
		} else {
			set("ust", token)
		}
	}
	return json.Marshal(f)
}

// addQuery sets the query string's fields: one name is a single-item call, a repeated
// name is data; decrypt and encrypt take true/false, expiration, after and limit an
// integer; types is a list. A value of the wrong form is passed on as a string, which
// the strict parser calls invalid input.
func addQuery(set func(string, any), q url.Values) {
	for k, vs := range q {
		switch k {
		case "name":
			if len(vs) == 1 {
				set("name", vs[0])
			} else {
				set("data", vs)
			}
		case "decrypt", "encrypt":
			if vs[0] == "true" || vs[0] == "false" {
				set(k, vs[0] == "true")
			} else {
				set(k, vs[0])
			}
		case "expiration", "after", "limit":
			if n, err := strconv.ParseInt(vs[0], 10, 64); err == nil {
				set(k, n)
			} else {
				set(k, vs[0])
			}
		case "types":
			set(k, vs) // always a list
		default:
			set(k, vs[0])
		}
	}
}

func writeReply(w http.ResponseWriter, rep api.Reply) { writeReplyChecked(w, rep, nil) }

// writeReplyChecked writes a reply whose encoded body check accepts (nil: any); one it
// refuses is replaced by that refusal.
func writeReplyChecked(w http.ResponseWriter, rep api.Reply, check func(int) error) {
	b, err := json.Marshal(rep.Body)
	if err == nil && check != nil {
		if cerr := check(len(b)); cerr != nil {
			rep = api.ErrorReply(fmt.Sprint(rep.Body["cid"]), cerr)
			b, err = json.Marshal(rep.Body)
		}
	}
	if err != nil {
		rep = api.ErrorReply(events.NewID(), err)
		b, _ = json.Marshal(rep.Body)
	}
	w.Header().Set("Content-Type", "application/json")
	if ra := rep.RetryAfterHeader(); ra != "" {
		w.Header().Set("Retry-After", ra)
	}
	w.WriteHeader(rep.Status)
	w.Write(b)
	w.Write([]byte("\n"))
}

// ClientAddr is the address of the client behind r: the connection's peer, or, when
// that peer is a trusted proxy, the right-most address in X-Forwarded-For that is not
// itself a trusted proxy (the left-most entries are whatever the client claimed).
func ClientAddr(r *http.Request, trusted []netip.Prefix) string {
	peer, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		return api.CleanAuditField(host, api.MaxRemoteAddrBytes)
	}
	addr := peer.Addr().Unmap()
	isTrusted := func(a netip.Addr) bool {
		return slices.ContainsFunc(trusted, func(p netip.Prefix) bool { return p.Contains(a) })
	}
	if !isTrusted(addr) {
		return addr.String()
	}
	var hops []string
	for _, h := range r.Header.Values("X-Forwarded-For") {
		hops = append(hops, strings.Split(h, ",")...)
	}
	for i := len(hops) - 1; i >= 0; i-- {
		a, err := netip.ParseAddr(strings.TrimSpace(hops[i]))
		if err != nil {
			break // not an address: nothing left of it can be trusted
		}
		addr = a.Unmap()
		if !isTrusted(addr) {
			break
		}
	}
	return addr.String()
}
