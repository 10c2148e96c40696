package natsapi

import (
	"context"
	"encoding/json"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/events"
)

// Watches over NATS. A watch request (attrd.user.attr.watch, attrd.session.attr.watch)
// is answered like any other: an error envelope, or the ready reply, which names the
// subject where the watcher renews it. Then the changes follow on the request's reply
// subject, each a message of its own (api.WatchMessage, JSON or msgpack as the request
// was). Core NATS tells a publisher nothing of a subscriber gone, so the watcher
// renews every renew_interval seconds; a watch not renewed for three intervals ends.
// A renewal, {"watch_id": …}, and a stop, {"watch_id": …, "stop": true}, are requests
// to the renewal subject, which only the instance holding the watch listens on.

// RenewSubjectPrefix begins each instance's renewal subject (under attrd.user., which
// the client account imports).
const RenewSubjectPrefix = "attrd.user.attr.watch.renew."

// renewal is the body of a renewal.
type renewal struct {
	WatchID string `json:"watch_id"`
	Stop    bool   `json:"stop,omitempty"`
}

// addWatches registers the watch endpoints and subscribes to this instance's
// renewal subject.
func (s *Server) addWatches() error {
	s.renewSubject = RenewSubjectPrefix + events.NewID()
	for _, op := range []api.Op{api.OpUserAttrWatch, api.OpSessionAttrWatch} {
		name := "user-attr-watch"
		if op == api.OpSessionAttrWatch {
			name = "session-attr-watch"
		}
		err := s.svc.AddEndpoint(name, micro.HandlerFunc(func(r micro.Request) { s.dispatch(op, r) }),
			micro.WithEndpointSubject(Subject(op)), micro.WithEndpointPendingLimits(pendingMsgs, pendingBytes))
		if err != nil {
			return err
		}
	}
	sub, err := s.nc.Subscribe(s.renewSubject, s.renew)
	s.renewSub = sub
	return err
}

// watch opens a watch and serves it on its own goroutine.
func (s *Server) watch(op api.Op, r micro.Request, m api.Meta) {
	isMsgpack := r.Headers().Get("Content-Type") == ContentTypeMsgpack
	req, err := s.api.ParseBody(r.Data(), isMsgpack)
	if err != nil {
		s.respond(r.Reply(), s.api.Refuse(op, m, err, ""), isMsgpack, m.CID)
		return
	}
	to := r.Reply()
	if to == "" {
		return // nobody to send changes to
	}
	w, rep := s.api.Watch(api.ExtractTrace(s.ctx, events.TraceCarrier(r.Headers())), op == api.OpSessionAttrWatch, req, m)
	if w == nil {
		s.respond(to, rep, isMsgpack, m.CID)
		return
	}
	rep.Body["renew_subject"] = s.renewSubject
	rep.Body["renew_interval"] = s.api.Config().Watch.RenewInterval.Seconds()
	s.respond(to, rep, isMsgpack, m.CID)
	// The watch outlives the request and the endpoint's stop: it ends with the API
	// service, which sends each watcher where to resume.
	go w.Serve(context.Background(), true, func(msg api.WatchMessage) error {
		return s.sendWatch(to, msg, isMsgpack)
	})
}

// sendWatch publishes one watch message. A reply subject reached through the client
// account's service import stays mapped while messages flow (a streamed export): the
// heartbeats keep it so between changes.
func (s *Server) sendWatch(to string, msg api.WatchMessage, isMsgpack bool) error {
	b := []byte(msg.Raw) // a change, made once for its watches
	if b == nil {
		var err error
		if b, err = json.Marshal(msg); err != nil {
			return err
		}
	}
	ctype := "application/json"
	if isMsgpack {
		var body map[string]any
		if err := json.Unmarshal(b, &body); err != nil {
			return err
		}
		var err error
		if b, ctype, err = encode(body, true); err != nil {
			return err
		}
	}
	return s.nc.PublishMsg(&nats.Msg{Subject: to, Data: b, Header: nats.Header{"Content-Type": []string{ctype}}})
}

// renew answers a renewal or a stop: ok, or E007001 when this instance holds no such
// watch (it ended, or the instance restarted): the watcher watches again with its
// position.
func (s *Server) renew(m *nats.Msg) {
	var r renewal
	cid := events.NewID()
	rep := api.Reply{Status: 200, Body: map[string]any{"cid": cid, "status": "ok"}}
	if err := json.Unmarshal(m.Data, &r); err != nil || r.WatchID == "" {
		rep = api.ErrorReply(cid, events.Errorf(events.CodeBadRequest, "a renewal is {\"watch_id\": …}"))
	} else if w := s.api.Lookup(r.WatchID); w == nil {
		rep = api.ErrorReply(cid, events.Errorf(events.CodeNoSession, "no such watch on this instance"))
	} else if r.Stop {
		w.Stop()
	} else {
		w.Renew()
	}
	s.respond(m.Reply, rep, false, cid)
}
