package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/attrd/attrd/events"
)

// Watches: a client asks for a user's or a session's attribute changes and receives
// them as they are decided, in log order, each once. Where they come from (the
// projectors' feed, and the log for what a watch missed) is watchfeed.go; how a
// transport carries them is the transport's (NATS: natsapi; REST: Server-Sent Events).

// Watch operations.
const (
	OpUserAttrWatch    Op = "user.attr.watch"
	OpSessionAttrWatch Op = "session.attr.watch"
)

// Watch bounds, unless configured.
const (
	DefaultWatchesPerUser     = 64
	DefaultWatchesPerInstance = 20_000
	// DefaultWatchBuffer is how many changes may wait for one watch's transport before
	// the watch is cut off as too slow.
	DefaultWatchBuffer = 256
	// DefaultWatchHeartbeat is how often a watch says it is alive, and where it stands,
	// when nothing else was sent (a NATS reply subject reached through a service import
	// lasts two minutes after the last message sent to it).
	DefaultWatchHeartbeat = 5 * time.Second
	// DefaultWatchRenewInterval is how often a NATS watcher renews its watch; a watch
	// not renewed for three intervals ends (the client is gone).
	DefaultWatchRenewInterval = 30 * time.Second
)

// Why a watch ended (WatchMessage.Reason).
const (
	EndSessionEnded     = "session_ended"     // the caller's session, or the watched one, ended
	EndUserDeleted      = "user_deleted"      // the watched user, or the caller's, was deleted
	EndSlow             = "slow"              // changes came faster than the transport took them
	EndRenewalMissed    = "renewal_missed"    // a NATS watcher stopped renewing
	EndStopped          = "stopped"           // the watcher asked to stop
	EndShutdown         = "shutdown"          // the instance is stopping
	EndUnavailable      = "unavailable"       // the log could not be read for what the watch missed
	EndResumeImpossible = "resume_impossible" // changes after `after` are no longer in the log
	// EndGone counts, in the metrics, watches whose client went away (nothing is sent).
	EndGone = "gone"
)

// WatchMessage is one message of a watch, as both transports send it (JSON).
type WatchMessage struct {
	// Type is ready (the first), change, expired, heartbeat or end.
	Type string `json:"type"`
	// Seq is a change's event sequence; Prev the position the watch told before it
	// (a change's sequence, or the After of a ready or heartbeat): a message a client
	// did not get shows as a Prev other than the position it has.
	Seq  uint64 `json:"seq,omitempty"`
	Prev uint64 `json:"prev,omitempty"`
	// After is, on ready, heartbeat and end, the position: every change up to it has
	// been sent; a new watch with this after resumes without a loss or a repeat.
	After *uint64 `json:"after,omitempty"`
	Time  string  `json:"time,omitempty"` // when the change was made, or the attribute expired
	Op    string  `json:"op,omitempty"`   // create, update, set or delete
	CID   string  `json:"cid,omitempty"`  // the cid of the request that made the change
	// Attrs are the attributes the change made, each as get shows it (found false:
	// deleted): a JSON list, made once for every watch that shows it alike.
	Attrs json.RawMessage `json:"attrs,omitempty"`
	// Raw, on a change, is the whole message as JSON, made from parts shared by every
	// watch that shows the change alike with this watch's Prev spliced in: transports
	// that send JSON send it as it is.
	Raw    json.RawMessage `json:"-"`
	Name   string          `json:"name,omitempty"`   // expired: the attribute
	Reason string          `json:"reason,omitempty"` // end
}

// Watch is one open watch. A transport runs Serve until it returns.
type Watch struct {
	ID      string
	hub     *watchHub
	uid     string // the watched user
	sid     string // the watched session ("": the user's attributes)
	part    int    // the watched user's partition
	cpart   int    // the caller's partition (its session's end and renewals come there)
	caller  string // the caller's user id
	csid    string // the caller's session id
	names   map[string]bool
	decrypt bool
	start   uint64

	out  chan *shared
	wake chan struct{}
	done chan struct{}

	callerEnds atomic.Int64 // Unix ns: the caller's session's end
	targetEnds atomic.Int64 // Unix ns: the watched session's end (0: a user watch)
	renewed    atomic.Int64 // Unix ns: the last renewal (NATS)

	// Under hub.mu: pushed is the last sequence handed to out (or skipped as of no
	// interest); catching says a reader of the log hands changes instead (watchfeed.go),
	// while the feed's wait in pending; regap, a gap the reader must also cover.
	pushed   uint64
	catching bool
	pending  []*shared
	regap    uint64
	reason   string // why it ended ("": not yet)
	drain    bool   // send what is queued before the end
	released sync.Once
}

// Start is the position the watch starts after: changes after it follow.
func (w *Watch) Start() uint64 { return w.start }

// Renew notes that a NATS watcher is still there.
func (w *Watch) Renew() { w.renewed.Store(time.Now().UnixNano()) }

// Stop ends the watch at the watcher's wish.
func (w *Watch) Stop() { w.hub.end(w, EndStopped, true) }

// Release ends the watch as gone, if nothing else ended it, and tells a closing hub
// its transport is done with it: Serve's last step, or a transport's that never
// served it.
func (w *Watch) Release() {
	w.hub.end(w, EndGone, false)
	w.released.Do(w.hub.serving.Done)
}

// Watch opens a watch of the caller's or a user's attributes (session false) or of a
// session's, authorized as get is, from after (nil: from now). It returns the watch,
// or the error reply.
func (s *Service) Watch(ctx context.Context, session bool, req *Request, m Meta) (w *Watch, rep Reply) {
	op := OpUserAttrWatch
	if session {
		op = OpSessionAttrWatch
	}
	if m.CID == "" {
		m.CID = events.NewID()
	}
	start := time.Now()
	defer func() { s.metrics.answered(op, m.Transport, rep, time.Since(start), "") }()
	w, err := s.openWatch(ctx, session, req, &m)
	if err != nil {
		var ad *accessDenied
		if errors.As(err, &ad) {
			s.deniedAccess(ctx, ad.c, op, &m, ad.uid, ad.sid)
		}
		return nil, ErrorReply(m.CID, err)
	}
	return w, Reply{Status: 200, Body: map[string]any{"cid": m.CID, "status": "ok", "type": "ready", "watch_id": w.ID, "after": w.start,
		"heartbeat": s.cfg.Watch.Heartbeat.Seconds()}}
}

func (s *Service) openWatch(ctx context.Context, session bool, req *Request, m *Meta) (*Watch, error) {
	if err := s.checkApp(req); err != nil {
		return nil, err
	}
	if req.After != nil && *req.After < 0 {
		return nil, events.Errorf(events.CodeInvalidInput, "after must be a sequence, 0 or more")
	}
	ctx, t, err := s.readTarget(ctx, session, req)
	if err != nil {
		return nil, err
	}
	w := &Watch{ID: events.NewID(), hub: s.watches, uid: t.uid, sid: t.sid, part: s.layout.Partition(t.uid),
		caller: t.c.user.UserID, cpart: s.layout.Partition(t.c.user.UserID), csid: t.c.sid, decrypt: req.Decrypt == nil || *req.Decrypt,
		out: make(chan *shared, s.cfg.Watch.Buffer), wake: make(chan struct{}, 1), done: make(chan struct{})}
	if req.Name != nil || req.HasData {
		names, _, err := req.names(s.cfg.Limits)
		if err != nil {
			return nil, err
		}
		w.names = make(map[string]bool, len(names))
		for _, n := range names {
			w.names[n] = true
		}
	}
	w.callerEnds.Store(t.c.session.ExpiresAt)
	if t.session != nil {
		w.targetEnds.Store(t.session.ExpiresAt)
	}
	if req.After != nil {
		if err := s.checkAfter(ctx, w.part, uint64(*req.After)); err != nil {
			return nil, err
		}
	}
	w.Renew()
	if err := s.watches.register(ctx, w, req.After); err != nil {
		return nil, err
	}
	return w, nil
}

// checkAfter refuses a position beyond the log (E008002): a client's mistake, which
// would otherwise wait in silence for changes numbered past it.
func (s *Service) checkAfter(ctx context.Context, part int, after uint64) error {
	pos, err := s.watches.position0(ctx, part)
	if err != nil || after <= pos {
		return err
	}
	info, err := s.eventStream.Info(ctx)
	if err != nil {
		return err
	}
	if after > info.State.LastSeq {
		return events.Errorf(events.CodeInvalidInput, "after %d is beyond the log (its last sequence is %d)", after, info.State.LastSeq)
	}
	return nil
}

// Serve sends the watch's messages with send until the watch ends, ctx ends (the
// transport's client went away) or send fails: after the ready reply (the transport's,
// Watch's Reply), changes, expiries, heartbeats, and a last message saying why it
// ended and where to resume. With renewals (NATS), a watch not renewed for three
// renewal intervals ends.
func (w *Watch) Serve(ctx context.Context, renewals bool, send func(WatchMessage) error) {
	defer w.Release()
	// told is the position the client last heard (Prev of the next change); consumed,
	// the last change taken from out, sent or of no interest.
	told, consumed := w.start, w.start
	pos := func() *uint64 { p := w.hub.position(w, consumed); told, consumed = p, p; return &p }
	var renew time.Duration
	if renewals {
		renew = 3 * w.hub.s.cfg.Watch.RenewInterval
	}
	expiries := map[string]int64{}
	hb := time.NewTicker(w.hub.s.cfg.Watch.Heartbeat)
	defer hb.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	arm := func() {
		next := w.callerEnds.Load()
		if t := w.targetEnds.Load(); t != 0 && t < next {
			next = t
		}
		for _, x := range expiries {
			next = min(next, x)
		}
		timer.Reset(time.Until(time.Unix(0, next)))
	}
	arm()
	sendChange := func(c *shared) error {
		consumed = max(consumed, c.Seq)
		msg, ok := w.render(c, told)
		if !ok {
			return nil
		}
		for _, a := range c.Attrs {
			if w.names != nil && !w.names[a.Name] {
				continue
			}
			if r := a.Record; r != nil && r.ExpiresAt != 0 {
				expiries[a.Name] = r.ExpiresAt
			} else {
				delete(expiries, a.Name)
			}
		}
		told = c.Seq
		return send(msg)
	}
	for {
		select {
		case c := <-w.out:
			if err := sendChange(c); err != nil {
				return
			}
			arm()
		case <-w.wake:
			arm()
		case <-timer.C:
			now := time.Now().UnixNano()
			if w.callerEnds.Load() <= now || w.targetEnds.Load() != 0 && w.targetEnds.Load() <= now {
				w.hub.end(w, EndSessionEnded, true)
				continue
			}
			for name, x := range expiries {
				if x <= now {
					delete(expiries, name)
					if send(WatchMessage{Type: "expired", Name: name, Time: formatTime(x)}) != nil {
						return
					}
				}
			}
			arm()
		case <-hb.C:
			if renew > 0 && time.Since(time.Unix(0, w.renewed.Load())) > renew {
				w.hub.end(w, EndRenewalMissed, false)
				continue
			}
			if send(WatchMessage{Type: "heartbeat", After: pos()}) != nil {
				return
			}
		case <-w.done:
			w.hub.mu.Lock()
			reason, drain := w.reason, w.drain
			w.hub.mu.Unlock()
			for drain {
				select {
				case c := <-w.out:
					if sendChange(c) != nil {
						return
					}
					continue
				default:
				}
				break
			}
			end := WatchMessage{Type: "end", Reason: reason, After: &consumed}
			if drain {
				end.After = pos()
			}
			_ = send(end)
			return
		case <-ctx.Done():
			return
		}
	}
}

// shared is a change as the feed hands it to every watch of its target: its message
// is made once per way of showing it (decrypted or not; which attributes), however
// many watches send it; each splices in its own Prev.
type shared struct {
	*events.Change
	mu    sync.Mutex
	shown map[string]*shownChange
}

// shownChange is a change's message made for one way of showing it: its attributes'
// JSON, and the whole message's JSON before and after the value of prev.
type shownChange struct {
	attrs      json.RawMessage
	head, tail []byte
}

// render makes a change's message, keeping the attributes the watch names; ok false
// when none is left.
func (w *Watch) render(c *shared, prev uint64) (WatchMessage, bool) {
	msg := WatchMessage{Type: "change", Seq: c.Seq, Prev: prev, Time: formatTime(c.Time), CID: c.CID, Op: opOf(c.Type)}
	key := []byte{'p'}
	if w.decrypt {
		key[0] = 'd'
	}
	if w.names != nil {
		for _, a := range c.Attrs {
			if w.names[a.Name] {
				key = append(append(key, 0), a.Name...)
			}
		}
		if len(key) == 1 {
			return msg, false
		}
	}
	c.mu.Lock()
	sc, ok := c.shown[string(key)]
	if !ok {
		sc = w.show(c, msg)
		if sc == nil {
			c.mu.Unlock()
			return msg, false
		}
		if c.shown == nil {
			c.shown = map[string]*shownChange{}
		}
		c.shown[string(key)] = sc
	}
	c.mu.Unlock()
	msg.Attrs = sc.attrs
	raw := make([]byte, 0, len(sc.head)+20+len(sc.tail))
	raw = strconv.AppendUint(append(raw, sc.head...), prev, 10)
	msg.Raw = append(raw, sc.tail...)
	return msg, true
}

// show makes c's message as this watch shows it (nil: it could not be encoded).
func (w *Watch) show(c *shared, msg WatchMessage) *shownChange {
	var attrs []map[string]any
	for _, a := range c.Attrs {
		if w.names != nil && !w.names[a.Name] {
			continue
		}
		if a.Record == nil {
			attrs = append(attrs, map[string]any{"name": a.Name, "found": false})
			continue
		}
		v, err := attrView(w.hub.s.cfg.Keyring, w.uid, w.sid, a.Name, a.Record, w.decrypt)
		if err != nil {
			w.hub.s.log.Warn("watch: a value could not be shown", "watch", w.ID, "name", a.Name, "err", err)
			v = map[string]any{"name": a.Name, "found": true, "value_unavailable": true}
		}
		attrs = append(attrs, v)
	}
	js, err := json.Marshal(attrs)
	if err != nil {
		w.hub.s.log.Warn("watch: a change could not be encoded", "watch", w.ID, "seq", c.Seq, "err", err)
		return nil
	}
	str := func(s string) []byte { b, _ := json.Marshal(s); return b }
	sc := &shownChange{attrs: js}
	sc.head = fmt.Appendf(nil, `{"type":"change","seq":%d,"prev":`, c.Seq)
	sc.tail = fmt.Appendf(nil, `,"time":%s,"op":%s,"cid":%s,"attrs":%s}`, str(msg.Time), str(msg.Op), str(msg.CID), js)
	return sc
}

// opOf names an attribute event's operation as the API does.
func opOf(t events.Type) string {
	switch t {
	case events.AttrCreated:
		return VerbCreate
	case events.AttrUpdated:
		return VerbUpdate
	case events.AttrSet:
		return VerbSet
	case events.AttrDeleted:
		return VerbDelete
	}
	return string(t)
}

// watchHub holds an instance's watches, indexed by what ends or feeds them.
type watchHub struct {
	s *Service // its cfg.Watch bounds the watches

	mu        sync.Mutex
	byID      map[string]*Watch
	byTarget  map[string][]*Watch // watched user id
	byCaller  map[string][]*Watch // caller's user id
	bySession map[string][]*Watch // caller's and watched session ids
	parts     map[int]*feedPart
	// interest counts, per partition, the watches whose user or caller is in it: the
	// partitions whose announcements are read whole.
	interest map[int]int
	closed   bool
	serving  sync.WaitGroup // watches' Serve calls
}

// WatchConfig bounds watches.
type WatchConfig struct {
	// PerUser bounds the watches one user (the caller) has open on an instance, and
	// PerInstance all of them (0: the defaults; negative: no bound).
	PerUser     int
	PerInstance int
	// Buffer is how many changes may wait for a watch's transport (default 256).
	Buffer int
	// Heartbeat is how often an idle watch sends a heartbeat (default 15 s);
	// RenewInterval how often a NATS watcher renews (default 30 s; three missed end it).
	Heartbeat     time.Duration
	RenewInterval time.Duration
}

// newWatchHub returns s's watches, with the watch bounds' defaults applied to s.cfg.
func newWatchHub(s *Service) *watchHub {
	cfg := &s.cfg.Watch
	if cfg.PerUser == 0 {
		cfg.PerUser = DefaultWatchesPerUser
	}
	if cfg.PerInstance == 0 {
		cfg.PerInstance = DefaultWatchesPerInstance
	}
	if cfg.Buffer <= 0 {
		cfg.Buffer = DefaultWatchBuffer
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = DefaultWatchHeartbeat
	}
	if cfg.RenewInterval <= 0 {
		cfg.RenewInterval = DefaultWatchRenewInterval
	}
	return &watchHub{s: s, byID: map[string]*Watch{}, byTarget: map[string][]*Watch{}, byCaller: map[string][]*Watch{},
		bySession: map[string][]*Watch{}, parts: map[int]*feedPart{}, interest: map[int]int{}}
}

// Lookup returns an open watch by id (nil: none here).
func (s *Service) Lookup(id string) *Watch {
	s.watches.mu.Lock()
	defer s.watches.mu.Unlock()
	return s.watches.byID[id]
}

// Watches returns the number of open watches.
func (s *Service) Watches() int {
	s.watches.mu.Lock()
	defer s.watches.mu.Unlock()
	return len(s.watches.byID)
}

// register adds w, starting after the partition's position, or after `after` when
// given; an `after` behind the position makes the log's reader hand the changes
// between first (watchfeed.go).
func (h *watchHub) register(ctx context.Context, w *Watch, after *int64) error {
	pos, err := h.position0(ctx, w.part)
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.closed:
		return events.Errorf(events.CodeOutcomeUnknown, "the instance is stopping: watch elsewhere")
	case h.s.cfg.Watch.PerInstance > 0 && len(h.byID) >= h.s.cfg.Watch.PerInstance:
		return events.Errorf(events.CodeInvalidInput, "this instance has %d watches open, its limit", len(h.byID))
	case h.s.cfg.Watch.PerUser > 0 && len(h.byCaller[w.caller]) >= h.s.cfg.Watch.PerUser:
		return events.Errorf(events.CodeInvalidInput, "%d watches open, the limit per user", len(h.byCaller[w.caller]))
	}
	part := h.parts[w.part]
	pos = max(pos, part.last)
	w.start, w.pushed = pos, pos
	if after != nil {
		w.start, w.pushed = uint64(*after), uint64(*after)
		if w.start < pos {
			w.catching = true
			go h.resume(w, w.start, pos)
		}
	}
	h.serving.Add(1) // under mu, before close: released by Serve (or the transport)
	h.byID[w.ID] = w
	h.byTarget[w.uid] = append(h.byTarget[w.uid], w)
	h.byCaller[w.caller] = append(h.byCaller[w.caller], w)
	h.bySession[w.csid] = append(h.bySession[w.csid], w)
	if w.sid != "" && w.sid != w.csid {
		h.bySession[w.sid] = append(h.bySession[w.sid], w)
	}
	part.watching++
	h.interest[w.part]++
	h.interest[w.cpart]++
	h.s.metrics.watching(len(h.byID))
	return nil
}

// position returns where w stands, given the last change its transport took: the
// partition's position when nothing waits for it, else that change.
func (h *watchHub) position(w *Watch, consumed uint64) uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	if w.catching || len(w.out) > 0 || w.pushed > consumed {
		return consumed
	}
	return max(consumed, h.parts[w.part].last)
}

// end ends w for reason (once): drain sends what is queued first.
func (h *watchHub) end(w *Watch, reason string, drain bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.endLocked(w, reason, drain)
}

func (h *watchHub) endLocked(w *Watch, reason string, drain bool) {
	if w.reason != "" {
		return
	}
	w.reason, w.drain = reason, drain
	close(w.done)
	delete(h.byID, w.ID)
	unindex(h.byTarget, w.uid, w)
	unindex(h.byCaller, w.caller, w)
	unindex(h.bySession, w.csid, w)
	if w.sid != "" && w.sid != w.csid {
		unindex(h.bySession, w.sid, w)
	}
	if p := h.parts[w.part]; p != nil {
		p.watching--
	}
	h.interest[w.part]--
	h.interest[w.cpart]--
	w.pending = nil
	h.s.metrics.watchEnded(reason, len(h.byID))
}

// unindex takes w out of index[key].
func unindex(index map[string][]*Watch, key string, w *Watch) {
	ws := index[key]
	for i, x := range ws {
		if x == w {
			ws[i] = ws[len(ws)-1]
			ws[len(ws)-1] = nil
			ws = ws[:len(ws)-1]
			break
		}
	}
	if len(ws) == 0 {
		delete(index, key)
		return
	}
	index[key] = ws
}

// close ends every watch (the instance is stopping): each sends what it has and
// where to resume, for up to wait.
func (h *watchHub) close(wait time.Duration) {
	h.mu.Lock()
	h.closed = true
	for _, w := range h.byID {
		h.endLocked(w, EndShutdown, true)
	}
	h.mu.Unlock()
	done := make(chan struct{})
	go func() { h.serving.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(wait):
	}
}

// EndWatches ends every watch, each with where to resume (on another instance), and
// waits a moment for their last messages to go out: the first step of a shutdown,
// before the transports stop.
func (s *Service) EndWatches() { s.watches.close(2 * time.Second) }
