// Package natsapi serves attrd's operations as NATS requests: a micro service named
// "attrd" with one endpoint per operation on subject "attrd.<op>" (for example
// attrd.user.attr.update). Bodies are the REST API's JSON, or msgpack when the request
// carries Content-Type: application/msgpack; the reply uses the request's encoding.
package natsapi

import (
	"context"
	"encoding/json"
	"log/slog"
	"strconv"
	"strings"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/events"
)

// Version is the micro service's version.
const Version = "0.1.0"

// SubjectPrefix is the first token of every request subject.
const SubjectPrefix = "attrd"

// RetryAfterHeader is the reply header that tells a refused client when to come back,
// in whole seconds, as HTTP's Retry-After does.
const RetryAfterHeader = "Retry-After"

// ContentTypeMsgpack marks a msgpack body.
const ContentTypeMsgpack = "application/msgpack"

// What one endpoint may hold queued in the client before it drops requests.
const (
	pendingMsgs  = 65536
	pendingBytes = 32 << 20
)

// Server is the running NATS request API.
type Server struct {
	nc   *nats.Conn
	svc  micro.Service
	api  *api.Service
	log  *slog.Logger
	sem  chan struct{}
	jobs chan job // to the workers waiting for a request
	wg   sync.WaitGroup
	ctx  context.Context
	stop context.CancelFunc
	// stopping is set by Stop once the endpoints are stopped: a request micro still
	// hands over then is dropped (its sender times out and retries elsewhere), so that
	// no handler starts while Stop waits for those running (wg).
	mu       sync.Mutex
	stopping bool
	// renewSubject is where this instance's watchers renew their watches (watch.go).
	renewSubject string
	renewSub     *nats.Subscription
}

// job is a request for a worker.
type job struct {
	op api.Op
	r  micro.Request
}

// workers is how many goroutines wait for requests. A worker keeps the stack that
// handling a request grew (JSON parsing, encoding), where a goroutine per request grew a
// fresh one every time; requests beyond them get a goroutine of their own.
const workers = 128

// Subject returns the request subject of an operation.
func Subject(op api.Op) string { return SubjectPrefix + "." + string(op) }

// Start registers the service on nc. Requests are handled concurrently (micro calls a
// handler one request at a time per endpoint), at most the API's MaxInFlight at once.
func Start(nc *nats.Conn, a *api.Service, log *slog.Logger) (*Server, error) {
	return StartWith(nc, a, log, Instance{})
}

// Instance is what service discovery says of this instance beyond micro's own: its
// name, and whether it is ready (as /readyz says), in each endpoint's STATS data.
type Instance struct {
	Name  string
	Ready func() (ready bool, reason string)
}

// InstanceStats is the data of each endpoint in a STATS answer ($SRV.STATS.attrd).
type InstanceStats struct {
	Instance string `json:"instance,omitempty"`
	Ready    bool   `json:"ready"`
	Reason   string `json:"reason,omitempty"`
}

// StartWith is Start with what discovery says of the instance.
func StartWith(nc *nats.Conn, a *api.Service, log *slog.Logger, in Instance) (*Server, error) {
	if log == nil {
		log = slog.Default()
	}
	svc, err := micro.AddService(nc, micro.Config{
		Name:        "attrd",
		Version:     Version,
		Description: "user and session attributes",
		StatsHandler: func(*micro.Endpoint) any {
			st := InstanceStats{Instance: in.Name, Ready: true}
			if in.Ready != nil {
				st.Ready, st.Reason = in.Ready()
			}
			return st
		},
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{nc: nc, svc: svc, api: a, log: log, sem: make(chan struct{}, a.Config().MaxInFlight), jobs: make(chan job), ctx: ctx, stop: cancel}
	for range workers {
		go s.work()
	}
	for _, op := range api.Ops() {
		name := strings.ReplaceAll(string(op), ".", "-")
		err := svc.AddEndpoint(name, micro.HandlerFunc(func(r micro.Request) { s.dispatch(op, r) }),
			micro.WithEndpointSubject(Subject(op)),
			// Requests queue in the client while the semaphore is full, up to a bound:
			// beyond it the client drops them (a slow consumer; their senders time
			// out) rather than hold unbounded memory for a flood.
			micro.WithEndpointPendingLimits(pendingMsgs, pendingBytes))
		if err != nil {
			_ = svc.Stop()
			cancel()
			return nil, err
		}
	}
	if err := s.addWatches(); err != nil {
		_ = svc.Stop()
		cancel()
		return nil, err
	}
	return s, nil
}

// Stop unsubscribes the endpoints (requests in flight drain) and waits for handlers.
func (s *Server) Stop() error {
	err := s.svc.Stop()
	if s.renewSub != nil {
		_ = s.renewSub.Unsubscribe()
	}
	s.mu.Lock()
	s.stopping = true // no wg.Add after this: Wait below never races one
	s.mu.Unlock()
	s.wg.Wait()
	s.stop() // the workers end; a request still draining gets a goroutine of its own
	return err
}

// dispatch hands a request to an idle worker, or to a goroutine of its own when none is
// idle: micro calls a handler one request at a time per endpoint, and the semaphore
// bounds how many are handled at once.
func (s *Server) dispatch(op api.Op, r micro.Request) {
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	s.sem <- struct{}{}
	select {
	case s.jobs <- job{op, r}:
	default:
		go s.run(job{op, r})
	}
}

func (s *Server) work() {
	for {
		select {
		case j := <-s.jobs:
			s.run(j)
		case <-s.ctx.Done():
			return
		}
	}
}

func (s *Server) run(j job) {
	defer func() { <-s.sem; s.wg.Done() }()
	s.handle(j.op, j.r)
}

func (s *Server) handle(op api.Op, r micro.Request) {
	m := api.Meta{CID: events.NewID(), RequestID: r.Headers().Get(nats.MsgIdHdr), BodyAudit: true, Transport: api.TransportNATS}
	if op == api.OpUserAttrWatch || op == api.OpSessionAttrWatch {
		s.watch(op, r, m)
		return
	}
	isMsgpack := r.Headers().Get("Content-Type") == ContentTypeMsgpack
	req, err := s.api.ParseBody(r.Data(), isMsgpack)
	var rep api.Reply
	if err != nil {
		rep = s.api.Refuse(op, m, err, "")
	} else {
		// A caller's W3C traceparent, in the request's headers, continues its trace.
		ctx := api.ExtractTrace(s.ctx, events.TraceCarrier(r.Headers()))
		rep = s.api.Handle(ctx, op, req, m)
	}
	s.respond(r.Reply(), rep, isMsgpack, m.CID)
}

// respond publishes a reply: its body in the request's encoding, micro's error headers
// for an error, Retry-After when the client should come back.
func (s *Server) respond(to string, rep api.Reply, isMsgpack bool, cid string) {
	body, ctype, err := encode(rep.Body, isMsgpack)
	if err == nil {
		if cerr := s.api.CheckReplySize(len(body)); cerr != nil {
			rep = api.ErrorReply(cid, cerr)
			body, ctype, err = encode(rep.Body, isMsgpack)
		}
	}
	if err != nil {
		s.log.Error("encode reply", "cid", cid, "err", err)
		rep = api.ErrorReply(cid, err)
		body, ctype, _ = encode(rep.Body, false)
	}
	// The reply is published on the connection, not through micro.Request: micro reads
	// the request's response error after the handler returns (for its stats), and this
	// runs after the handler returned, so Request.Respond/Error here would race with it.
	// The error headers are micro's own (micro.ErrorHeader, micro.ErrorCodeHeader); micro's
	// stats count requests but not their errors.
	out := &nats.Msg{Subject: to, Data: body, Header: nats.Header{"Content-Type": []string{ctype}}}
	if rep.Code != "" {
		desc := string(rep.Code)
		switch rep.Code {
		case events.CodeBadRequest:
			desc = "Bad request"
		case events.CodeInternal:
			desc = "Internal error"
		}
		out.Header.Set(micro.ErrorHeader, desc)
		out.Header.Set(micro.ErrorCodeHeader, strconv.Itoa(rep.Status))
	}
	if ra := rep.RetryAfterHeader(); ra != "" {
		out.Header.Set(RetryAfterHeader, ra) // as REST's header: when to come back
	}
	if out.Subject == "" {
		return // a request sent with no reply subject: nobody to answer
	}
	if err := s.nc.PublishMsg(out); err != nil {
		s.log.Warn("reply not sent", "cid", cid, "err", err)
	}
}

// encode writes a reply body as JSON, or as msgpack (values that are raw JSON become
// their msgpack equivalent; integers stay exact).
func encode(body map[string]any, asMsgpack bool) ([]byte, string, error) {
	if !asMsgpack {
		b, err := json.Marshal(body)
		return b, "application/json", err
	}
	js, err := json.Marshal(body)
	if err != nil {
		return nil, "", err
	}
	dec := json.NewDecoder(strings.NewReader(string(js)))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, "", err
	}
	b, err := msgpack.Marshal(numbers(v))
	return b, ContentTypeMsgpack, err
}

// numbers turns json.Number into int64, uint64 or float64, recursively.
func numbers(v any) any {
	switch t := v.(type) {
	case json.Number:
		if i, err := strconv.ParseInt(string(t), 10, 64); err == nil {
			return i
		}
		if u, err := strconv.ParseUint(string(t), 10, 64); err == nil {
			return u
		}
		f, _ := t.Float64()
		return f
	case map[string]any:
		for k, e := range t {
			t[k] = numbers(e)
		}
	case []any:
		for i, e := range t {
			t[i] = numbers(e)
		}
	}
	return v
}
