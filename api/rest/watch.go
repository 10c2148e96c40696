package rest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/events"
)

// Watches as Server-Sent Events. GET /zato/sso/user/attr/watch and
// /zato/sso/session/attr/watch take the fields of a get (query string, a Bearer token)
// plus after, or a ticket (?ticket=…, from POST /attrd/watch/ticket) in place of the
// tokens, for a browser's EventSource. The stream is text/event-stream:
//
//	event: ready    id: the position   data: the ready reply
//	event: change   id: its sequence   data: api.WatchMessage
//	event: expired                     data: api.WatchMessage
//	event: end      id: the position   data: api.WatchMessage (then the stream closes)
//	: heartbeat     id: the position   (a comment: no event, but the browser keeps the id)
//
// A reconnecting EventSource sends Last-Event-ID, which resumes from there.

// watchRoutes are the watch routes.
var watchRoutes = []Route{
	{"GET", "/zato/sso/user/attr/watch", api.OpUserAttrWatch},
	{"GET", "/zato/sso/session/attr/watch", api.OpSessionAttrWatch},
	{"POST", "/attrd/watch/ticket", api.OpWatchTicket},
}

// sseRetry is the reconnection delay the stream asks of an EventSource.
const sseRetry = 2 * time.Second

// ticket answers POST /attrd/watch/ticket.
func (h *handler) ticket(w http.ResponseWriter, r *http.Request, m api.Meta) {
	body, err := readBody(w, r, h.svc.Config().Limits.MaxBodyBytes)
	if err == nil {
		body, err = browserFields(body, r, api.OpWatchTicket)
	}
	var req *api.Request
	if err == nil {
		req, err = h.svc.ParseBody(body, false)
	}
	if err != nil {
		writeReply(w, h.svc.Refuse(api.OpWatchTicket, m, err, ""))
		return
	}
	writeReply(w, h.svc.WatchTicket(r.Context(), req, m))
}

// watch opens a watch (within a request slot, as any request) and then streams it
// (outside: a watch is bounded by the watch limits, not the slots).
func (h *handler) watch(w http.ResponseWriter, r *http.Request, op api.Op, m api.Meta) {
	session := op == api.OpSessionAttrWatch
	var wt *api.Watch
	var rep api.Reply
	err := h.slots.Do(r.Context(), "", func() { wt, rep = h.openWatch(r, op, session, m) })
	if err != nil {
		writeReply(w, api.ErrorReply(m.CID, err))
		return
	}
	if wt == nil {
		writeReply(w, rep)
		return
	}
	rc := http.NewResponseController(w)
	hd := w.Header()
	hd.Set("Content-Type", "text/event-stream")
	hd.Set("Cache-Control", "no-store")
	hd.Set("X-Accel-Buffering", "no") // nginx: pass each event on at once
	w.WriteHeader(http.StatusOK)
	var buf bytes.Buffer
	write := func() error {
		// The server's WriteTimeout would end the stream: each write gets its own.
		_ = rc.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if _, err := w.Write(buf.Bytes()); err != nil {
			return err
		}
		buf.Reset()
		return rc.Flush()
	}
	fmt.Fprintf(&buf, "retry: %d\n", sseRetry.Milliseconds())
	writeEvent(&buf, "ready", strconv.FormatUint(wt.Start(), 10), rep.Body)
	if write() != nil {
		wt.Release()
		return
	}
	wt.Serve(r.Context(), false, func(msg api.WatchMessage) error {
		switch msg.Type {
		case "heartbeat":
			fmt.Fprintf(&buf, ": heartbeat\nid: %d\n\n", *msg.After)
		case "change":
			// The message made once for every watch of the change (one line of JSON).
			fmt.Fprintf(&buf, "event: change\nid: %d\ndata: %s\n\n", msg.Seq, msg.Raw)
		case "end":
			writeEvent(&buf, msg.Type, strconv.FormatUint(*msg.After, 10), msg)
		default:
			writeEvent(&buf, msg.Type, "", msg)
		}
		return write()
	})
}

// openWatch parses a watch request: the query string, a Bearer token or a ticket,
// and Last-Event-ID as after when the query has none.
func (h *handler) openWatch(r *http.Request, op api.Op, session bool, m api.Meta) (*api.Watch, api.Reply) {
	body, err := browserFields(nil, r, op)
	if err != nil {
		return nil, h.svc.Refuse(op, m, err, "")
	}
	f, err := fields(body)
	if err != nil {
		return nil, h.svc.Refuse(op, m, err, "")
	}
	if tk, ok := f["ticket"]; ok {
		var s string
		if json.Unmarshal(tk, &s) != nil {
			return nil, h.svc.Refuse(op, m, events.Errorf(events.CodeNoSession, "a ticket is a string"), "")
		}
		given, err := h.svc.OpenTicket(r.Context(), s, session)
		if err != nil {
			return nil, h.svc.Refuse(op, m, err, "")
		}
		delete(f, "ticket")
		for k, v := range given {
			f[k], _ = json.Marshal(v)
		}
	}
	if _, ok := f["after"]; !ok {
		if id := r.Header.Get("Last-Event-ID"); id != "" {
			n, err := strconv.ParseInt(id, 10, 64)
			if err != nil {
				return nil, h.svc.Refuse(op, m, events.Errorf(events.CodeInvalidInput, "Last-Event-ID must be a sequence"), "")
			}
			f["after"], _ = json.Marshal(n)
		}
	}
	body, _ = json.Marshal(f)
	req, err := h.svc.ParseBody(body, false)
	if err != nil {
		return nil, h.svc.Refuse(op, m, err, "")
	}
	return h.svc.Watch(r.Context(), session, req, m)
}

// writeEvent writes one Server-Sent Event: its type, its id when given, its data as
// one line of JSON (JSON has no raw newlines).
func writeEvent(buf *bytes.Buffer, typ, id string, data any) {
	b, err := json.Marshal(data)
	if err != nil {
		b = []byte(`{}`)
	}
	fmt.Fprintf(buf, "event: %s\n", typ)
	if id != "" {
		fmt.Fprintf(buf, "id: %s\n", id)
	}
	fmt.Fprintf(buf, "data: %s\n\n", b)
}
