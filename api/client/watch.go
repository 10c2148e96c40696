package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/attrd/attrd/events"
)

// Change is one message of a watch: a change (Op create, update, set or delete, with
// the attributes it made, Found false for a deleted one), or an attribute that expired
// by its time (Op "expired", Attrs holding its name).
type Change struct {
	Seq   uint64      `json:"seq"`
	Time  time.Time   `json:"time"`
	Op    string      `json:"op"`
	CID   string      `json:"cid"`
	Attrs []Attribute `json:"attrs"`
}

// Watcher receives a watch's changes on C, in log order, each once, across reconnects
// and instance restarts (it resumes from its position by itself). C closes when the
// watch ends for good; Err then says why.
type Watcher struct {
	C <-chan Change

	a     *Attr
	names []string
	opts  []Option
	out   chan Change
	stop  context.CancelFunc

	opened bool // once the first watch is open, every later one resumes from pos

	mu  sync.Mutex
	pos uint64
	err error
}

// ErrResumeImpossible ends a watch whose position is older than the log keeps: read
// the attributes again and watch anew.
var ErrResumeImpossible = errors.New("attrd watch: the changes after the position are no longer in the log")

// WatchEnded is why a watch ended for good (a session ended, a user deleted).
type WatchEnded struct{ Reason string }

func (e *WatchEnded) Error() string { return "attrd watch ended: " + e.Reason }

// After resumes a watch after a position (a Change's Seq, or Watcher.Position).
func After(seq uint64) Option { return func(b map[string]any) { b["after"] = seq } }

// Watch watches the attributes (names; none: all) as they change, from now, or from
// After(seq). It returns once the watch is open.
func (a *Attr) Watch(ctx context.Context, names []string, opts ...Option) (*Watcher, error) {
	w := &Watcher{a: a, names: names, opts: opts, out: make(chan Change, 64)}
	w.C = w.out
	first, err := w.open(ctx)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithCancel(context.Background())
	w.stop = cancel
	go w.run(wctx, first)
	return w, nil
}

// Position is the sequence up to which every change has been received.
func (w *Watcher) Position() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pos
}

// Err is why C closed (nil while it is open, or after Stop).
func (w *Watcher) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// Stop ends the watch.
func (w *Watcher) Stop() { w.stop() }

// stream is one open watch on one instance.
type stream struct {
	sub      *nats.Subscription
	msgs     chan *nats.Msg
	id       string
	renewSub string
	renew    time.Duration
	idle     time.Duration // no message for this long: the watch is lost
}

type watchMsg struct {
	Status    string          `json:"status"`
	SubStatus []string        `json:"sub_status"`
	Type      string          `json:"type"`
	WatchID   string          `json:"watch_id"`
	After     *uint64         `json:"after"`
	Seq       uint64          `json:"seq"`
	Prev      uint64          `json:"prev"`
	Reason    string          `json:"reason"`
	Name      string          `json:"name"`
	Time      time.Time       `json:"time"`
	Renew     string          `json:"renew_subject"`
	RenewIvl  float64         `json:"renew_interval"`
	Heartbeat float64         `json:"heartbeat"`
	Result    json.RawMessage `json:"result"`
}

// open opens a watch from the watcher's position (or its options' After, the first
// time) and reads its ready reply.
func (w *Watcher) open(ctx context.Context) (*stream, error) {
	b := w.a.body(w.opts)
	b["current_app"] = w.a.s.c.app
	if w.opened {
		b["after"] = w.Position() // a resume: from where it stands
	}
	switch len(w.names) {
	case 0:
	case 1:
		b["name"] = w.names[0]
	default:
		b["data"] = w.names
	}
	data, err := json.Marshal(b)
	if err != nil {
		return nil, err
	}
	st := &stream{msgs: make(chan *nats.Msg, 1024)}
	inbox := w.a.s.c.nc.NewRespInbox()
	if st.sub, err = w.a.s.c.nc.ChanSubscribe(inbox, st.msgs); err != nil {
		return nil, err
	}
	if err := w.a.s.c.nc.PublishRequest("attrd."+w.a.op("watch"), inbox, data); err != nil {
		st.sub.Unsubscribe()
		return nil, err
	}
	tctx, cancel := context.WithTimeout(ctx, w.a.s.c.Timeout)
	defer cancel()
	select {
	case m := <-st.msgs:
		var r watchMsg
		if err := json.Unmarshal(m.Data, &r); err != nil {
			st.sub.Unsubscribe()
			return nil, fmt.Errorf("attrd watch: unreadable reply: %w", err)
		}
		if r.Status != "ok" {
			st.sub.Unsubscribe()
			if len(r.SubStatus) > 0 {
				return nil, &events.Error{Code: events.Code(r.SubStatus[0]), Msg: "watch"}
			}
			return nil, &events.Error{Code: events.CodeBadRequest, Msg: "watch"}
		}
		st.id, st.renewSub = r.WatchID, r.Renew
		st.renew = durationOfSeconds(r.RenewIvl)
		st.idle = 3 * durationOfSeconds(r.Heartbeat)
		if r.After != nil && !w.opened {
			w.setPos(*r.After)
		}
		w.opened = true
		return st, nil
	case <-tctx.Done():
		st.sub.Unsubscribe()
		return nil, &events.Error{Code: events.CodeOutcomeUnknown, Msg: "watch: no reply"}
	}
}

func (w *Watcher) setPos(p uint64) {
	w.mu.Lock()
	w.pos = max(w.pos, p)
	w.mu.Unlock()
}

// run receives the stream's messages, renews it, and opens it again where it left
// off whenever it is lost, until the watch ends for good or Stop.
func (w *Watcher) run(ctx context.Context, st *stream) {
	defer close(w.out)
	for {
		final := w.follow(ctx, st)
		st.sub.Unsubscribe()
		if ctx.Err() != nil {
			if st.renewSub != "" {
				w.a.s.c.nc.Publish(st.renewSub, []byte(`{"watch_id":"`+st.id+`","stop":true}`))
			}
			return
		}
		if final != nil {
			w.mu.Lock()
			w.err = final
			w.mu.Unlock()
			return
		}
		for pause := 100 * time.Millisecond; ; pause = min(2*pause, 5*time.Second) {
			var err error
			if st, err = w.open(ctx); err == nil {
				break
			}
			if c := events.CodeOf(err); c == events.CodeNoSession || c == events.CodeNotAllowed || c == events.CodeBadApp {
				w.mu.Lock()
				w.err = err
				w.mu.Unlock()
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(pause):
			}
		}
	}
}

// follow handles one stream until it is lost (nil: open it again) or ends for good.
func (w *Watcher) follow(ctx context.Context, st *stream) error {
	renew := time.NewTicker(st.renew)
	defer renew.Stop()
	idle := time.NewTimer(st.idle)
	defer idle.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-idle.C:
			return nil // nothing for three heartbeats: lost
		case <-renew.C:
			rep, err := w.a.s.c.nc.Request(st.renewSub, []byte(`{"watch_id":"`+st.id+`"}`), w.a.s.c.Timeout)
			if errors.Is(err, nats.ErrNoResponders) {
				return nil // the instance is gone
			}
			if err == nil {
				var r watchMsg
				if json.Unmarshal(rep.Data, &r) == nil && r.Status != "ok" {
					return nil // the instance no longer holds it
				}
			}
		case m := <-st.msgs:
			idle.Reset(st.idle)
			var r watchMsg
			if err := json.Unmarshal(m.Data, &r); err != nil {
				return nil
			}
			switch r.Type {
			case "heartbeat":
				if r.After != nil {
					if *r.After < w.Position() {
						return nil
					}
					w.setPos(*r.After)
				}
			case "change":
				if r.Prev != w.Position() {
					return nil // a message was lost on the way: resume from the position
				}
				var c Change
				if err := json.Unmarshal(m.Data, &c); err != nil {
					return nil
				}
				// The position moves first: whoever reads c from C and then asks
				// Position gets c's (a Stop meanwhile leaves it moved, unsent).
				w.setPos(r.Seq)
				select {
				case w.out <- c:
				case <-ctx.Done():
					return nil
				}
			case "expired":
				select {
				case w.out <- Change{Op: "expired", Time: r.Time, Attrs: []Attribute{{Name: r.Name}}}:
				case <-ctx.Done():
					return nil
				}
			case "end":
				switch r.Reason {
				case "session_ended", "user_deleted", "stopped":
					return &WatchEnded{Reason: r.Reason}
				case "resume_impossible":
					return ErrResumeImpossible
				}
				if r.After != nil && *r.After >= w.Position() {
					w.setPos(*r.After)
				}
				return nil // slow, shutdown, unavailable, renewal_missed: resume
			}
		}
	}
}

// durationOfSeconds turns a number of seconds into a duration, at least 100 ms.
func durationOfSeconds(s float64) time.Duration {
	return max(time.Duration(s*float64(time.Second)), 100*time.Millisecond)
}
