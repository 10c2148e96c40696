// Package api holds attrd's commands and queries: authentication (users, passwords,
// sessions, USTs), authorization, validation and encryption, and the append-and-wait
// path by which a write becomes an event and returns the projector's decision. The
// transports (natsapi, and REST) are thin: they turn a wire request into Handle's
// arguments and its answer back into bytes.
package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/leaderread"
	"github.com/attrd/attrd/events/sealed"
)

// Config configures a Service.
type Config struct {
	// Bucket is the projection bucket.
	Bucket string
	// Apps are the accepted values of current_app (default: CRM).
	Apps []string
	// SessionTTL is how long a session lives after login or renew (default 60m).
	SessionTTL time.Duration
	// SessionMaxLifetime is how long after its login a session ends, however often it
	// is renewed (default 24h).
	SessionMaxLifetime time.Duration
	// DecisionTimeout is how long a write waits for its decision before answering
	// "outcome unknown" (default 5s).
	DecisionTimeout time.Duration
	// Limits bound values and batches.
	Limits Limits
	// Keyring seals encrypted values; nil makes encrypt:true an error.
	Keyring *sealed.Keyring
	// DataKeys seal what is personal in events (erasure.go); nil with a Keyring: the
	// service opens its own.
	DataKeys *events.DataKeys
	// Password is the argon2id cost of new password hashes.
	Password PasswordParams
	// PasswordConcurrency bounds password hashes computed at once (default: half the
	// cores); PasswordQueue more may wait up to PasswordWait, the rest are refused.
	PasswordConcurrency int
	PasswordQueue       int
	PasswordWait        time.Duration
	// LoginsPerAddress bounds the password checks in flight from one remote address
	// (default DefaultLoginsPerAddress); one username has at most one.
	LoginsPerAddress int
	// History reads the log for history and point-in-time queries; nil refuses them.
	History HistorySource
	// HistoryConcurrency bounds history folds at once (default: half the cores), and
	// HistoryTimeout each one's time (default 30s).
	HistoryConcurrency int
	HistoryTimeout     time.Duration
	// MaxInFlight bounds requests handled at once (default 4096).
	MaxInFlight int
	// Watch bounds watches (watch.go).
	Watch WatchConfig
	// Local, if set, answers reads of the records this instance's projectors hold
	// committed and are certainly the latest of (see LocalReader); KV answers the rest.
	Local LocalReader
	// Logger; nil uses slog.Default().
	Logger *slog.Logger
	// Metrics, if set, registers the service's Prometheus metrics.
	Metrics prometheus.Registerer
}

// Service runs attrd's operations for the transports.
type Service struct {
	cfg Config
	nc  *nats.Conn
	kv  jetstream.KeyValue
	// kvStream is the bucket's stream, for listings that read headers only.
	kvStream jetstream.Stream
	// eventStream is the log, for the first event of a repeated request; layout is how
	// it is partitioned (from its metadata).
	eventStream jetstream.Stream
	layout      events.Layout
	// logs reads a repeated request's first event and decision (logreads.go).
	logs  *logReads
	log   *slog.Logger
	inbox string
	sub   *nats.Subscription
	// acks receives the stream's acknowledgements of probed appends (ackOfNote).
	acks *leaderread.Replies
	// leader reads KV keys and events as the streams' leaders have them.
	leader  *leaderread.Reader
	metrics *metrics

	mu      sync.Mutex
	waiting map[string][]chan events.Decision // by event id; two retries of one request share it
	// decisionMean is the recent mean time from append to decision, in ns (probeAfter).
	decisionMean atomic.Int64
	// quorum is when (Unix ns) the last acknowledged heartbeat was sent: reads are
	// answered only shortly after one (quorum.go).
	quorum atomic.Int64
	// quorumBack is when (Unix ns) the first heartbeat acknowledged after a loss of the
	// quorum was sent: reads wait quorumSettle after it (quorum.go).
	quorumBack atomic.Int64
	// barriers, on a replicated bucket, sends the read index's barriers, and snaps
	// reads keys from a copy that holds one (readindex.go); nil on one replica.
	// noDirectUntil (Unix ns) is set when the bucket showed direct gets off (an older
	// attrd turned them off): until then reads go to the leader as before.
	barriers      *leaderread.Barriers
	snaps         *leaderread.Snapshots
	noDirectUntil atomic.Int64
	// heartbeatSubject is this instance's heartbeat key: the quorum's proof, the
	// barriers, and the key every read index request names (it always exists).
	heartbeatSubject string

	sessions *sessionCache
	hashes   *Gate
	logins   *loginFlights // password checks in flight
	denied   *rateLimiter  // records of denied attempts
	throttle *throttle     // failed-login counters; nil without their bucket
	// dataKeys seal what is personal in events (erasure.go); nil without a key file.
	dataKeys  *events.DataKeys
	histories *Gate // history folds at once
	// watches are the open watches, fed by feedSub (watch.go, watchfeed.go).
	watches *watchHub
	feedSub *nats.Subscription
	tickets tickets // seal watch tickets (watchticket.go)
	stop    context.CancelFunc
}

// New returns a Service on nc. The bucket and the event stream must exist.
func New(ctx context.Context, nc *nats.Conn, cfg Config) (*Service, error) {
	if cfg.Bucket == "" {
		cfg.Bucket = events.DefaultBucket
	}
	if len(cfg.Apps) == 0 {
		cfg.Apps = []string{"CRM"}
	}
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = 60 * time.Minute
	}
	if cfg.SessionMaxLifetime <= 0 {
		cfg.SessionMaxLifetime = 24 * time.Hour
	}
	if cfg.PasswordConcurrency <= 0 {
		cfg.PasswordConcurrency = DefaultPasswordConcurrency
	}
	if cfg.PasswordQueue <= 0 {
		cfg.PasswordQueue = DefaultPasswordQueue
	}
	if cfg.PasswordWait <= 0 {
		cfg.PasswordWait = DefaultPasswordWait
	}
	if cfg.LoginsPerAddress <= 0 {
		cfg.LoginsPerAddress = DefaultLoginsPerAddress
	}
	if cfg.DecisionTimeout <= 0 {
		cfg.DecisionTimeout = 5 * time.Second
	}
	if cfg.Limits.MaxValueBytes <= 0 {
		cfg.Limits.MaxValueBytes = 64 << 10
	}
	if cfg.Limits.MaxItems <= 0 {
		cfg.Limits.MaxItems = 1000
	}
	if cfg.Limits.MaxBodyBytes <= 0 {
		cfg.Limits.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if cfg.Limits.MaxReplyBytes <= 0 {
		cfg.Limits.MaxReplyBytes = DefaultMaxReplyBytes
	}
	if cfg.Limits.MaxDepth <= 0 {
		cfg.Limits.MaxDepth = DefaultMaxDepth
	}
	for _, c := range []struct {
		v   *int
		def int
	}{{&cfg.Limits.MaxAttrsPerUser, DefaultMaxAttrsPerUser}, {&cfg.Limits.MaxAttrsPerSession, DefaultMaxAttrsPerSession},
		{&cfg.Limits.MaxSessionsPerUser, DefaultMaxSessionsPerUser}} {
		switch {
		case *c.v == 0:
			*c.v = c.def
		case *c.v < 0:
			*c.v = 0 // no cap
		}
	}
	if cfg.Password == (PasswordParams{}) {
		cfg.Password = DefaultPasswordParams
	}
	if cfg.HistoryConcurrency <= 0 {
		cfg.HistoryConcurrency = max(1, runtime.NumCPU()/2)
	}
	if cfg.HistoryTimeout <= 0 {
		cfg.HistoryTimeout = 30 * time.Second
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 4096
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	kv, err := js.KeyValue(ctx, cfg.Bucket)
	if err != nil {
		return nil, fmt.Errorf("projection bucket %s: %w", cfg.Bucket, err)
	}
	kvStream, err := js.Stream(ctx, events.KVStream(cfg.Bucket))
	if err != nil {
		return nil, fmt.Errorf("projection bucket %s: %w", cfg.Bucket, err)
	}
	eventStream, err := js.Stream(ctx, events.StreamName)
	if err != nil {
		return nil, fmt.Errorf("event stream: %w", err)
	}
	s := &Service{cfg: cfg, nc: nc, kv: kv, kvStream: kvStream, eventStream: eventStream, layout: events.LayoutOf(eventStream.CachedInfo().Config), log: cfg.Logger,
		inbox: nats.NewInbox(), waiting: map[string][]chan events.Decision{},
		sessions:  newSessionCache(5*time.Second, 100_000),
		hashes:    NewGate(cfg.PasswordConcurrency, cfg.PasswordQueue, cfg.PasswordWait, "password checks"),
		logins:    newLoginFlights(cfg.LoginsPerAddress),
		histories: NewGate(cfg.HistoryConcurrency, -1, 2*time.Second, "history requests"),
		denied:    newRateLimiter(deniedPerMinute, time.Minute, 100_000)}
	s.dataKeys = cfg.DataKeys
	if s.dataKeys == nil && cfg.Keyring != nil {
		// With the key file, what is personal in every event is sealed with its
		// person's data key (erasure.go).
		if s.dataKeys, err = events.OpenDataKeys(ctx, js, cfg.Keyring); err != nil {
			return nil, fmt.Errorf("data keys: %w", err)
		}
	}
	if s.dataKeys == nil {
		s.log.Warn("events keep personal data in clear: a deleted user's earlier events keep it", "why", "no key file, or no data keys bucket")
	}
	tst, serr := js.Stream(ctx, events.KVStream(events.ThrottleBucket))
	if tkv, err := js.KeyValue(ctx, events.ThrottleBucket); err == nil && serr == nil {
		s.throttle = &throttle{kv: tkv, st: tst, perUser: ThrottleFreeUserFailures, perAddr: ThrottleFreeAddrFailures, maxBackoff: ThrottleMaxBackoff}
	} else {
		s.log.Warn("no login throttling: its bucket is missing", "bucket", events.ThrottleBucket, "err", err)
	}
	wctx, stop := context.WithCancel(context.Background())
	s.stop = stop
	// A cluster that has just formed, or is electing a leader, may not create the
	// watch's consumer at once: try again until ctx ends.
	for pause := 100 * time.Millisecond; ; pause = min(2*pause, 2*time.Second) {
		err := s.sessions.watch(wctx, kv)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			stop()
			return nil, fmt.Errorf("watch sessions: %w", err)
		case <-time.After(pause):
			s.log.Warn("watch sessions: trying again", "err", err)
		}
	}
	// One subscription receives every decision meant for this instance, a batch at a
	// time; each decision's event id finds the waiting request.
	s.sub, err = nc.Subscribe(s.inbox, s.onDecisions)
	if err != nil {
		return nil, err
	}
	if err := s.sub.SetPendingLimits(-1, -1); err != nil {
		return nil, err
	}
	if s.acks, err = leaderread.NewReplies(nc, ackOfNote); err != nil {
		return nil, err
	}
	if s.leader, err = leaderread.New(nc); err != nil {
		return nil, err
	}
	s.metrics = newMetrics(cfg.Metrics, s)
	s.watches = newWatchHub(s)
	if s.feedSub, err = s.watches.follow(nc); err != nil {
		return nil, err
	}
	go s.countRefusals(wctx)
	hb := events.KVSubject(cfg.Bucket, events.HeartbeatKey(events.NewID()))
	s.heartbeatSubject = hb
	s.logs = &logReads{layout: s.layout,
		leader: func(ctx context.Context, req leaderread.Request) (*jetstream.RawStreamMsg, error) {
			return s.leader.Get(ctx, events.StreamName, req)
		},
		lastSeq: func(ctx context.Context) (uint64, error) {
			info, err := s.eventStream.Info(ctx)
			if err != nil {
				return 0, err
			}
			return info.State.LastSeq, nil
		}}
	if kvStream.CachedInfo().Config.Replicas > 1 {
		if s.snaps, err = leaderread.NewSnapshots(nc); err != nil {
			return nil, err
		}
		s.barriers = leaderread.NewBarriers(s.sendBarrier(js, hb))
		// Reads through the leader (a write's, a retry's) that every server refuses
		// while the meta group has no leader go through the read index instead.
		s.leader.ReadIndexWhenUnavailable(kvStream.CachedInfo().Config.Name, hb, s.barriers, s.snaps)
		// And a repeated request's reads of the log from copies (logreads.go).
		s.logs.copies = s.snaps
	}
	if err := s.heartbeat(ctx, js, hb); err != nil {
		s.log.Warn("no quorum heartbeat yet: reads wait for one", "err", err)
	}
	go s.keepQuorum(wctx, js, hb)
	return s, nil
}

// Config returns the service's configuration with defaults applied.
func (s *Service) Config() Config { return s.cfg }

// Close stops receiving decisions and watching sessions.
func (s *Service) Close() error {
	s.stop()
	s.watches.close(0)
	errs := []error{s.sub.Unsubscribe(), s.feedSub.Unsubscribe(), s.acks.Close(), s.leader.Close()}
	if s.snaps != nil {
		errs = append(errs, s.snaps.Close())
	}
	return errors.Join(errs...)
}

// CheckBodySize refuses a request body over the limit (E008002); transports call it, or
// bound their reads by Config().Limits.MaxBodyBytes, before parsing.
func (s *Service) CheckBodySize(n int) error {
	if n > s.cfg.Limits.MaxBodyBytes {
		s.metrics.refused(RefusedOversize)
		return events.Errorf(events.CodeInvalidInput, "the body has %d bytes, the limit is %d", n, s.cfg.Limits.MaxBodyBytes)
	}
	return nil
}

// DefaultMaxReplyBytes bounds a reply unless configured.
const DefaultMaxReplyBytes = 4 << 20

// maxReply is the largest reply: the configured bound, and never more than the NATS
// server carries in one message (less room for headers).
func (s *Service) maxReply() int {
	return int(min(int64(s.cfg.Limits.MaxReplyBytes), s.nc.MaxPayload()-16<<10))
}

// CheckReplySize refuses a reply body over the reply bound (E008002): a transport calls
// it on the encoded reply, the last guard against an answer nobody could receive.
func (s *Service) CheckReplySize(n int) error {
	if max := s.maxReply(); n > max {
		return events.Errorf(events.CodeInvalidInput, "the reply has %d bytes, over the limit of %d: ask for less", n, max)
	}
	return nil
}

// AppAllowed reports whether app is a configured application.
func (s *Service) AppAllowed(app string) bool { return slices.Contains(s.cfg.Apps, app) }

func (s *Service) onDecisions(m *nats.Msg) {
	var ds []events.Decision
	if err := events.Unmarshal(m.Data, &ds); err != nil {
		s.log.Warn("unreadable decisions", "err", err)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range ds {
		for _, ch := range s.waiting[d.EventID] {
			select {
			case ch <- d:
			default:
			}
		}
	}
}

// commit appends ev to the log and waits for the projector's decision on it. A
// decision that does not come within DecisionTimeout is ErrOutcomeUnknown: the event
// may still apply, and its request id finds out. A decision made for another request
// that used the same request id (another fingerprint) is not this request's: E008002.
func (s *Service) commit(ctx context.Context, ev *events.Event) (events.Decision, error) {
	d, err := s.appendAndWait(ctx, ev)
	if err == nil && ev.RequestKey != "" && d.Fingerprint != ev.Fingerprint {
		return events.Decision{}, events.Errorf(events.CodeInvalidInput, "the request id was used for a different request")
	}
	return d, err
}

// appendAndWait appends ev and waits for its decision, or for the decision kept for its
// request key when the stream says the event is a duplicate.
func (s *Service) appendAndWait(ctx context.Context, ev *events.Event) (events.Decision, error) {
	ev.ID = ev.RequestKey // a retry's event has the same id
	if ev.ID == "" {
		ev.ID = events.NewID()
	}
	ev.Version = events.SchemaVersion
	if ev.Time == 0 {
		ev.Time = time.Now().UnixNano()
	}
	s.keyFingerprint(ctx, ev)
	data, err := s.encode(ctx, ev)
	if err != nil {
		return events.Decision{}, err
	}
	msg := &nats.Msg{Subject: s.layout.Subject(ev), Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, string(ev.Type))
	msg.Header.Set(events.HeaderVersion, fmt.Sprint(events.SchemaVersion))
	msg.Header.Set(events.HeaderReply, s.inbox)
	// The event carries the request's trace context: the fold that decides it, on
	// whichever instance holds the partition, continues the trace.
	InjectTrace(ctx, events.TraceCarrier(msg.Header))

	ch := make(chan events.Decision, 1)
	s.mu.Lock()
	s.waiting[ev.ID] = append(s.waiting[ev.ID], ch)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		rest := slices.DeleteFunc(s.waiting[ev.ID], func(c chan events.Decision) bool { return c == ch })
		if len(rest) == 0 {
			delete(s.waiting, ev.ID)
		} else {
			s.waiting[ev.ID] = rest
		}
	}()

	timer := time.NewTimer(s.cfg.DecisionTimeout)
	defer timer.Stop()
	// Nats-Msg-Id is the event's id: its ULID, or, with a request id, derived from it,
	// so that the stream de-duplicates a retry within its window (it appends nothing).
	// The event is published with no reply subject: the decision is the
	// acknowledgement, and the server sends no ack. Should the stream refuse the event,
	// or drop it as a duplicate, no decision comes.
	msg.Header.Set(nats.MsgIdHdr, ev.ID)
	if err := s.nc.PublishMsg(msg); err != nil {
		return events.Decision{}, appendError(err)
	}
	// A request id may be a retry whose event is in the log already: the stream drops
	// it, and the decision is the first event's. When no decision has come after a
	// moment (probeAfter), the event is published again with a reply subject: the
	// stream's ack of this probe says whether it is a duplicate, and of which event (or
	// it appends the event now, if the first publish was lost). Every first request is
	// spared the ack; a retry waits probeAfter longer.
	//
	// Any event is probed so, not only a retry's: a publish lost in an election (the
	// stream without a leader) is stored by its probe once there is one, rather than
	// the request waiting out the decision timeout. A probe that gets no ack at all
	// (sent during the election, answered by nobody) is sent again every
	// probeAgain, so that the request goes on within a moment of the new leader.
	probe := time.After(s.probeAfter())
	var acks, ackc <-chan *nats.Msg // ackc: acks while a probe is out
	sent := time.Now()
	for {
		select {
		case d := <-ch:
			s.decided(time.Since(sent))
			s.metrics.decided(time.Since(sent))
			return d, nil
		case <-probe:
			s.metrics.probed()
			if acks == nil { // the first probe: every probe of this append shares it
				var forget func()
				acks, msg.Reply, forget = s.acks.Await(1)
				defer forget()
			}
			ackc = acks
			if err := s.nc.PublishMsg(msg); err != nil {
				ackc = nil // the decision, or the timer, tells
			}
			probe = time.After(probeAgain)
		case m := <-ackc:
			a, ok := decodeAck(m)
			if !ok {
				continue // an ack of a plain store after all
			}
			ackc, probe = nil, nil
			var apiErr *jetstream.APIError
			switch {
			case a.duplicate:
				// A duplicate's ack names the first event's sequence.
				s.metrics.keptAnswer()
				return s.recorded(ctx, a.seq, ev.RequestKey, timer.C, data, ch)
			case errors.As(a.err, &apiErr) && apiErr.ErrorCode == 10158: // JSStreamDuplicateMessageConflict: "duplicate message id is in process"
				// The first publish is still being stored: its decision will tell.
			case a.err != nil:
				// The stream cannot take events now (no leader, no quorum): whether
				// the first publish was stored is unknown.
				return events.Decision{}, appendError(a.err)
			}
			// Stored now (the first publish was lost): the decision will tell.
		case <-timer.C:
			return events.Decision{}, events.Errorf(events.CodeOutcomeUnknown, "no decision on event %s within %s", ev.ID, s.cfg.DecisionTimeout)
		case <-ctx.Done():
			return events.Decision{}, events.Errorf(events.CodeOutcomeUnknown, "gave up waiting for event %s: %v", ev.ID, ctx.Err())
		}
	}
}

// minProbeAfter is the shortest a request waits for its decision before it asks the
// stream whether its event is stored, and whether as a duplicate (probeAfter).
const minProbeAfter = 100 * time.Millisecond

// probeAgain is how long a probe waits for its ack before it is sent again.
const probeAgain = 500 * time.Millisecond

// probeAfter is how long a request with a request id waits for its decision before its
// probe: four times the recent mean time to a decision, at least minProbeAfter and at
// most half the decision timeout, so that under load (a batch of 100 items can take
// hundreds of milliseconds) first requests do not probe.
func (s *Service) probeAfter() time.Duration {
	return min(max(4*time.Duration(s.decisionMean.Load()), minProbeAfter), s.cfg.DecisionTimeout/2)
}

// decided folds the time one decision took into the recent mean (a moving average over
// about the last 16).
func (s *Service) decided(took time.Duration) {
	m := s.decisionMean.Load()
	s.decisionMean.Store(m + (int64(took)-m)/16)
}

// appendAck is what the stream answered a probe: a duplicate and the first event's
// sequence, or an error.
type appendAck struct {
	duplicate bool
	seq       uint64
	err       error
}

// ackOfNote keeps the acks of probes that a request must see: a duplicate or an error,
// found by a byte search (a plain ack, the probe stored the event, is dropped: the
// decision will answer), and a 503 status (no stream answered).
func ackOfNote(m *nats.Msg) bool {
	return len(m.Data) == 0 && m.Header.Get("Status") != "" ||
		bytes.Contains(m.Data, []byte(`"duplicate"`)) || bytes.Contains(m.Data, []byte(`"error"`))
}

// decodeAck reads an ack of note; ok is false when it turns out a plain one.
func decodeAck(m *nats.Msg) (a appendAck, ok bool) {
	if len(m.Data) == 0 {
		return appendAck{err: fmt.Errorf("%w (status %s)", nats.ErrNoResponders, m.Header.Get("Status"))}, true
	}
	var ack struct {
		Seq       uint64              `json:"seq"`
		Duplicate bool                `json:"duplicate"`
		Error     *jetstream.APIError `json:"error"`
	}
	switch err := json.Unmarshal(m.Data, &ack); {
	case err != nil:
		return appendAck{err: fmt.Errorf("unreadable ack: %w", err)}, true
	case ack.Error != nil:
		return appendAck{err: ack.Error}, true
	}
	return appendAck{duplicate: true, seq: ack.Seq}, ack.Duplicate
}

// appendError explains a failed append: an event over the server's maximum payload is
// the caller's (too much in one request); for anything else the event may or may not
// be in the log (a lost ack, a leader change, a lost quorum): outcome unknown, so that
// the client retries with its request id.
func appendError(err error) error {
	if errors.Is(err, nats.ErrMaxPayload) {
		return events.Errorf(events.CodeInvalidInput, "the request is too large for one event: %v", err)
	}
	return events.Errorf(events.CodeOutcomeUnknown, "append event: %w", err)
}

// recorded returns the decision on the event at seq, the first of a repeated request,
// waiting for it if it is still being decided. The projector records every rejection
// on the user's decision subject, so once the log is folded past seq the decision is
// that record, or "accepted" without one; the result fields come from the event itself.
// Events folded before decisions were recorded (an older attrd) are looked up in the
// decisions it kept per request key. When the event at seq is own (the bytes this
// request published: its probe found its own first publish), or whenever decided
// delivers, the decision sent to this instance answers instead.
func (s *Service) recorded(ctx context.Context, seq uint64, rk string, deadline <-chan time.Time, own []byte, decided <-chan events.Decision) (events.Decision, error) {
	msg, err := s.logs.eventAt(ctx, seq)
	if err != nil {
		return events.Decision{}, fmt.Errorf("read the first event of a repeated request: %w", err)
	}
	if own != nil && bytes.Equal(msg.Data, own) {
		// The duplicate is this request's own first publish (a probe of a slow
		// decision): the decision comes to this instance as for any request.
		select {
		case d := <-decided:
			return d, nil
		case <-deadline:
			return events.Decision{}, events.Errorf(events.CodeOutcomeUnknown, "no decision on the event at sequence %d in time", seq)
		case <-ctx.Done():
			return events.Decision{}, events.Errorf(events.CodeOutcomeUnknown, "gave up waiting: %v", ctx.Err())
		}
	}
	first, err := events.Decode(msg.Data)
	if err != nil {
		return events.Decision{}, fmt.Errorf("the first event of a repeated request: %w", err)
	}
	d := events.Decision{Seq: seq, EventID: first.ID, UserID: first.UserID, ExpiresAt: first.ExpiresAt, Fingerprint: first.Fingerprint}
	part := events.PartitionName(s.layout.Partition(first.UserID))
	since, err := s.recordingSince(ctx, part)
	if err != nil {
		return events.Decision{}, err
	}
	if since == 0 || seq < since {
		return s.keptDecision(ctx, rk, deadline)
	}
	poll := time.NewTicker(50 * time.Millisecond)
	defer poll.Stop()
	for {
		applied, err := s.folded(ctx, part)
		if err != nil {
			return events.Decision{}, err
		}
		if applied >= seq {
			d.Code, err = s.logs.rejection(ctx, first.UserID, seq, msg.Subject)
			return d, err
		}
		select {
		case <-poll.C:
		case d := <-decided:
			return d, nil
		case <-deadline:
			return events.Decision{}, events.Errorf(events.CodeOutcomeUnknown, "no decision yet for the repeated request")
		case <-ctx.Done():
			return events.Decision{}, events.Errorf(events.CodeOutcomeUnknown, "gave up waiting: %v", ctx.Err())
		}
	}
}

// recordingSince returns from which sequence the projector of a partition records
// decisions (0: none; the record is written once and never changes).
func (s *Service) recordingSince(ctx context.Context, partition string) (uint64, error) {
	r, err := s.read(ctx, events.RecordingKey(partition))
	if rr, ok := r.(*events.RecordingRecord); ok {
		return rr.Since, err
	}
	return 0, err
}

// folded returns how far a partition's log is folded, as its projector's lease says.
func (s *Service) folded(ctx context.Context, partition string) (uint64, error) {
	var lease events.LeaseRecord
	v, err := s.leader.LastValue(ctx, s.cfg.Bucket, events.LeaseKey(partition))
	if err == nil && v != nil {
		err = events.Unmarshal(v, &lease)
	}
	return lease.Applied, err
}

// keptDecision returns the decision an older attrd kept under the request key,
// waiting for it if the first request is still being decided.
func (s *Service) keptDecision(ctx context.Context, rk string, deadline <-chan time.Time) (events.Decision, error) {
	if rk == "" {
		return events.Decision{}, errors.New("duplicate event without a request key")
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := s.kv.Watch(wctx, events.DecisionKey(rk))
	if err != nil {
		return events.Decision{}, err
	}
	defer w.Stop()
	for {
		select {
		case e := <-w.Updates():
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var d events.Decision
			if err := events.Unmarshal(e.Value(), &d); err != nil {
				return events.Decision{}, err
			}
			return d, nil
		case <-deadline:
			return events.Decision{}, events.Errorf(events.CodeOutcomeUnknown, "no decision yet for the repeated request")
		case <-ctx.Done():
			return events.Decision{}, events.Errorf(events.CodeOutcomeUnknown, "gave up waiting: %v", ctx.Err())
		}
	}
}

// apply appends ev and returns its decision, a rejection as the operation's error.
func (s *Service) apply(ctx context.Context, ev *events.Event) (events.Decision, error) {
	d, err := s.commit(ctx, ev)
	if err == nil && d.Code != "" {
		err = &events.Error{Code: d.Code, Msg: "rejected by the projector"}
	}
	return d, err
}

// LocalReader reads projection records this instance holds in memory: ok is false
// when it cannot say that its record (nil: absent) is the latest committed one.
type LocalReader interface {
	Read(key string) (rec any, ok bool)
}

// read returns the record under key, or nil if there is none: for a read on a
// replicated bucket, through the read index; else from this instance's own projector
// when it folds the key's partition (the latest committed record, with no round trip),
// or from KV.
func (s *Service) read(ctx context.Context, key string) (any, error) {
	if floor := readFloor(ctx); floor > 0 {
		// A read on a replicated bucket: from a copy holding its barrier
		// (readindex.go), not from this instance's projector, which may have been
		// deposed without knowing it yet.
		if rec, ok, err := s.readIndexed(ctx, key, floor); ok {
			return rec, err
		}
	}
	if s.cfg.Local != nil {
		if rec, ok := s.cfg.Local.Read(key); ok {
			return rec, nil
		}
	}
	v, err := s.leader.LastValue(ctx, s.cfg.Bucket, key)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", key, err)
	}
	if v == nil {
		return nil, nil
	}
	return events.DecodeRecord(key, v)
}

func (s *Service) readUser(ctx context.Context, uid string) (*events.UserRecord, error) {
	if uid == "" {
		return nil, nil
	}
	r, err := s.read(ctx, events.UserKey(uid))
	u, _ := r.(*events.UserRecord)
	return u, err
}

func (s *Service) readSession(ctx context.Context, sid string) (*events.SessionRecord, error) {
	r, err := s.read(ctx, events.SessionKey(sid))
	ss, _ := r.(*events.SessionRecord)
	return ss, err
}
