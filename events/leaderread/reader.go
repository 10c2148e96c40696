// Package leaderread reads a JetStream stream's messages as its leader has them: it
// takes the leader's answer over a member's "no leader" 503, and notices two servers
// answering as the leader (one back from a network cut, from its old copy). The
// service's reads and the projector's loads share it (DESIGN-NOTES "Network partitions").
package leaderread

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// Reader sends the JetStream API requests that read a stream's message (a key's
// last value, an event by sequence) and takes the stream leader's answer.
//
// NATS subtlety: such a request ($JS.API.STREAM.MSG.GET) reaches every server of the
// cluster, and any member of the stream's Raft group that knows no leader answers it
// "503 JetStream system temporarily unavailable" at once, while only the leader
// answers with the message. A plain request takes the first answer. A node healed
// from a network cut is such a member for seconds (its group catches up with the
// leader, retrying), so every read through it failed although the leader, one route
// away, would have answered. Here a member's 503 only counts when no other answer
// comes within leaderGrace of it.
//
// NATS subtlety: a stream leader cut off from the others by a network partition goes
// on believing it leads (it steps down only after 10 s without a quorum), and when the
// cut heals it answers reads from its old copy until it hears of the new leader, as
// the new leader does from the current one. Both answers come, and the first is taken:
// so every read listens a while longer (TwoLeadersLinger) for a second answer, and one
// that differs from the first (another sequence, or found against not found) shows two
// servers answering as the leader; reads are then refused (E008004) for
// twoLeadersHold (quorum.go). The reads answered before the second answer came are the
// residual risk (DESIGN-NOTES "Network partitions").
type Reader struct {
	nc      *nats.Conn
	answers *Replies
	// lingering holds the reads answered within TwoLeadersLinger, oldest first, to
	// compare any later answer with the one taken.
	mu        sync.Mutex
	lingering []lingeringRead
	// twoLeaders is when (Unix ns) two different answers to one read last came.
	twoLeaders atomic.Int64
	stop       chan struct{}
	// elected holds, by stream, until when its reads are verified (suspectFor after an
	// advisory of a leader elected); every stream's are until allUntil, after a
	// reconnect (reconnects: how many were seen), which may have missed advisories.
	elected  map[string]time.Time
	allUntil time.Time
	// electedC is closed at the next leader election of any stream (Elected).
	electedC   chan struct{}
	reconnects uint64
	statsAt    atomic.Int64 // when (Unix ns) the connection's reconnects were last read
	electSub   *nats.Subscription
	// indexed holds, by stream, the read index its reads fall back on when every
	// server refuses them (unavailable.go).
	indexed map[string]*indexed
	// msgGet is the message read's subject, but for the stream's name.
	msgGet string
}

// lingeringRead is a read answered, still listening for a second answer.
type lingeringRead struct {
	until  time.Time
	ch     <-chan *nats.Msg
	forget func()
	taken  answerPrint
}

// answerPrint is what two answers to one read must agree on.
type answerPrint struct {
	found bool
	seq   uint64
}

// TwoLeadersLinger is how long a read listens for a second answer after the one it took.
const TwoLeadersLinger = 200 * time.Millisecond

// leaderGrace is how long a read waits for the leader's answer after a member said
// it knows no leader: a route's hop, with room.
const leaderGrace = 100 * time.Millisecond

// readTimeout bounds a read whose context has no deadline (jetstream's default).
const readTimeout = 5 * time.Second

// New returns a Reader on nc, listening for the streams' leader elections; Close
// stops it.
func New(nc *nats.Conn) (*Reader, error) {
	answers, err := NewReplies(nc, nil)
	if err != nil {
		return nil, err
	}
	lr := &Reader{nc: nc, answers: answers, stop: make(chan struct{}), elected: map[string]time.Time{},
		electedC: make(chan struct{}), msgGet: "$JS.API.STREAM.MSG.GET."}
	go lr.compareLate()
	// NATS subtlety: the new leader of a stream announces itself on this advisory, in
	// the stream's account, while the old one may still believe it leads (cut off, it
	// steps down only after 10 to 20 s without a quorum).
	if lr.electSub, err = nc.Subscribe("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.*", func(m *nats.Msg) {
		stream := m.Subject[strings.LastIndexByte(m.Subject, '.')+1:]
		lr.mu.Lock()
		lr.elected[stream] = time.Now().Add(suspectFor)
		close(lr.electedC)
		lr.electedC = make(chan struct{})
		lr.mu.Unlock()
	}); err != nil {
		return nil, err
	}
	return lr, nil
}

// Elected returns a channel closed when a stream next announces a new leader: for
// those who wait for an election to try again, rather than for a timer.
func (lr *Reader) Elected() <-chan struct{} {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	return lr.electedC
}

// SuspectAll verifies every stream's reads for suspectFor from now: for a connection
// whose server was cut off from the others (it heard none of their elections, and
// may itself still take itself for a leader), as after a reconnect.
func (lr *Reader) SuspectAll() {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	lr.allUntil = time.Now().Add(suspectFor)
}

// suspectFor is how long after a stream elected a leader its reads are verified: an
// old leader cut off from the others steps down at the latest 20 s after it lost
// them, and the new one is elected at the earliest 4 s after.
const suspectFor = 25 * time.Second

// reconnectCheck is how often reads look at whether the connection reconnected.
const reconnectCheck = 100 * time.Millisecond

// verifyLinger is how long a verified read waits for a second answer.
const verifyLinger = 50 * time.Millisecond

// Suspected reports whether stream elected a leader within suspectFor, or this
// connection reconnected within it (it may have missed the advisory).
func (lr *Reader) Suspected(stream string) bool {
	// The connection's statistics take its lock, which every publish takes too: they
	// are read at most every reconnectCheck, not on every read.
	now := time.Now()
	r, checked := uint64(0), false
	if at := lr.statsAt.Load(); now.UnixNano()-at > int64(reconnectCheck) && lr.statsAt.CompareAndSwap(at, now.UnixNano()) {
		r, checked = lr.nc.Stats().Reconnects, true
	}
	lr.mu.Lock()
	defer lr.mu.Unlock()
	if checked && r != lr.reconnects {
		lr.reconnects, lr.allUntil = r, now.Add(suspectFor)
	}
	if time.Now().Before(lr.allUntil) {
		return true
	}
	until, ok := lr.elected[stream]
	if ok && time.Now().After(until) {
		delete(lr.elected, stream)
		return false
	}
	return ok
}

// verify waits verifyLinger for a second answer to a read that took one: one that
// differs shows two leaders, and the read is refused (E008004, nothing read).
func (lr *Reader) verify(ch <-chan *nats.Msg, taken answerPrint) error {
	t := time.NewTimer(verifyLinger)
	defer t.Stop()
	for {
		select {
		case m := <-ch:
			if p, ok := printOf(m); ok && p != taken {
				lr.twoLeaders.Store(time.Now().UnixNano())
				return events.Errorf(events.CodeOutcomeUnknown, "%w: nothing read, try again", events.ErrTwoLeaders)
			}
		case <-t.C:
			return nil
		}
	}
}

// Close stops the Reader's subscriptions.
func (lr *Reader) Close() error {
	close(lr.stop)
	return errors.Join(lr.electSub.Unsubscribe(), lr.answers.Close())
}

// linger keeps a read answered listening for a second answer until TwoLeadersLinger.
func (lr *Reader) linger(ch <-chan *nats.Msg, forget func(), taken answerPrint) {
	lr.mu.Lock()
	lr.lingering = append(lr.lingering, lingeringRead{until: time.Now().Add(TwoLeadersLinger), ch: ch, forget: forget, taken: taken})
	lr.mu.Unlock()
}

// compareLate looks at the answers that came after each read's first, as the reads'
// lingering ends, until close.
func (lr *Reader) compareLate() {
	t := time.NewTicker(TwoLeadersLinger / 8)
	defer t.Stop()
	for {
		select {
		case <-lr.stop:
			return
		case now := <-t.C:
			lr.mu.Lock()
			n := 0
			for n < len(lr.lingering) && !lr.lingering[n].until.After(now) {
				n++
			}
			done := lr.lingering[:n:n]
			lr.lingering = lr.lingering[n:]
			lr.mu.Unlock()
			for _, r := range done {
				r.forget()
				lr.compare(r)
			}
		}
	}
}

// compare notes two leaders when an answer r got after the one it took differs from it.
func (lr *Reader) compare(r lingeringRead) {
	for {
		select {
		case m := <-r.ch:
			if p, ok := printOf(m); ok && p != r.taken {
				lr.twoLeaders.Store(time.Now().UnixNano())
			}
		default:
			return
		}
	}
}

// printOf reads what an answer says of the message: false for an answer that is not
// about it (a member's 503, an error).
func printOf(m *nats.Msg) (answerPrint, bool) { return printOfResult(events.DecodeMsgGet(m)) }

// printOfResult is printOf of an answer decoded.
func printOfResult(msg *jetstream.RawStreamMsg, err error) (answerPrint, bool) {
	switch {
	case err == nil:
		return answerPrint{found: true, seq: msg.Sequence}, true
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return answerPrint{}, true
	default:
		return answerPrint{}, false
	}
}

// twoLeadersSince is how long ago two servers last answered one read differently.
func (lr *Reader) TwoLeadersSince() time.Duration {
	at := lr.twoLeaders.Load()
	if at == 0 {
		return time.Duration(1<<63 - 1)
	}
	return time.Since(time.Unix(0, at))
}

// Request is the body of a message read: by sequence, the next on a subject from a
// sequence, or the last on a subject.
type Request struct {
	Seq        uint64 `json:"seq,omitempty"`
	NextBySubj string `json:"next_by_subj,omitempty"`
	LastBySubj string `json:"last_by_subj,omitempty"`
}

// Get reads a message of stream as its leader has it; jetstream.ErrMsgNotFound when
// there is none.
func (lr *Reader) Get(ctx context.Context, stream string, req Request) (*jetstream.RawStreamMsg, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, readTimeout)
		defer cancel()
	}
	for {
		msg, again, err := lr.attempt(ctx, stream, body)
		if again {
			continue
		}
		if req.LastBySubj != "" && RefusedUnavailable(err) {
			if ix := lr.indexedFor(stream); ix != nil {
				return ix.last(ctx, stream, req.LastBySubj, err)
			}
		}
		return msg, err
	}
}

// resendAfter is how long a read waits for any answer before it is sent again, with
// a reply subject of its own (answers to the one before are dropped).
//
// NATS subtlety: while a stream's leader is cut off and the others have not yet
// elected a new one (4–9 s), no server answers a read at all: the followers still
// take the old leader for the leader and say nothing. A read sent then would wait out
// its whole time even if a leader is elected a moment later; sent again, it is
// answered within resendAfter of the election.
const resendAfter = 250 * time.Millisecond

// attempt sends one read and takes its answer (see Get); again is true when nothing
// at all answered within resendAfter, and the read is to be sent again.
func (lr *Reader) attempt(ctx context.Context, stream string, body []byte) (msg *jetstream.RawStreamMsg, again bool, err error) {
	ch, reply, forget := lr.answers.Await(4) // the leader's, a second leader's, and members' 503s
	lingers := false
	defer func() {
		if !lingers {
			forget()
		}
	}()
	if err := lr.nc.PublishRequest(lr.msgGet+stream, reply, body); err != nil {
		return nil, false, err
	}
	resend := time.NewTimer(resendAfter)
	defer resend.Stop()
	var unavailable error
	var grace <-chan time.Time
	for {
		select {
		case m := <-ch:
			msg, err := events.DecodeMsgGet(m)
			if RefusedUnavailable(err) {
				if unavailable == nil {
					unavailable, grace = err, time.After(leaderGrace)
				}
				continue
			}
			if p, ok := printOfResult(msg, err); ok {
				if lr.Suspected(stream) {
					// A stream that elected a leader lately may have an old one still
					// answering: look for its answer before giving this one.
					if err := lr.verify(ch, p); err != nil {
						return nil, false, err
					}
				}
				lingers = true
				lr.linger(ch, forget, p)
			}
			return msg, false, err
		case <-resend.C:
			if unavailable == nil {
				return nil, true, nil // nobody answered: send it again
			}
		case <-grace:
			return nil, false, unavailable
		case <-ctx.Done():
			if unavailable != nil {
				return nil, false, unavailable
			}
			return nil, false, ctx.Err()
		}
	}
}

// LastValue reads a KV key's value as the bucket stream's leader has it: nil when
// the key has none (never written, deleted, purged or expired).
func (lr *Reader) LastValue(ctx context.Context, bucket, key string) ([]byte, error) {
	m, err := lr.Get(ctx, events.KVStream(bucket), Request{LastBySubj: events.KVSubject(bucket, key)})
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	// A delete or purge leaves a marker with an operation header, an expiry or a
	// removal one with a reason (jetstream's kv.get reads them the same way).
	if events.IsMarker(m.Header) {
		return nil, nil
	}
	return m.Data, nil
}
