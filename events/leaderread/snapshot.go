package leaderread

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Snapshots reads the last messages of many subjects of a stream at once, from any
// server that holds the stream, and takes the answer only from a copy that holds every
// message up to a sequence the caller names (its floor): a read index. Unlike a leader
// read, it needs no leader and no timing: a copy that is behind (a follower catching
// up, a leader cut off by a network partition and back, answering from its old copy)
// is recognised by what it holds, not by who answers first.
//
// NATS subtlety: the stream must allow direct gets (allow_direct). A direct get is
// answered by one server of the stream's replicas (a queue group, the client's own
// server first), from its own copy, leader or not. Asked for the last message of a
// list of subjects (multi_last), the server answers from one moment of its copy (it
// holds the stream's read lock), and its closing message (204 EOB) names the last
// sequence of that copy (Nats-UpTo-Sequence): the floor is checked against it.
type Snapshots struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	answers *Replies
}

// NewSnapshots returns a Snapshots reading on nc; Close stops it.
func NewSnapshots(nc *nats.Conn) (*Snapshots, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	answers, err := NewReplies(nc, nil)
	if err != nil {
		return nil, err
	}
	return &Snapshots{nc: nc, js: js, answers: answers}, nil
}

// Close unsubscribes.
func (s *Snapshots) Close() error { return s.answers.Close() }

// ErrBehind says no server answered from a copy holding the floor before the read's
// time was up: the servers that answered were behind.
var ErrBehind = errors.New("the stream's copies that answered are behind the sequence the read needs")

// ErrNoDirect says the stream does not allow direct gets (its configuration says so,
// read when nobody answered one): the caller reads another way.
var ErrNoDirect = errors.New("the stream does not allow direct gets")

// ErrTooMany says the subjects asked for (with wildcards) have more messages than one
// answer holds (1024).
var ErrTooMany = errors.New("more messages than one direct get answers")

// maxAnswer is the most messages the server puts in one answer.
const maxAnswer = 1024

// maxSubjects is how many subjects one request asks for: the server answers at most
// 1024 messages to one, and the request's body must stay small.
const maxSubjects = 256

// behindPause is the longest a read waits before it asks again a server that was behind.
const behindPause = 10 * time.Millisecond

// Last returns, by subject, the last message of each of subjects that has one in
// stream (delete and expiry markers included), read from copies that hold every
// message up to floor. anchor is a subject known to hold a message at or below floor
// (asked along with every request, so that every answer names its copy's last
// sequence); with floor 0 nothing is checked and anchor may be "". It fails with
// ErrBehind when ctx ends before a copy holding floor answered, ErrNoDirect when the
// stream does not allow direct gets, ErrTooMany when a wildcard matches more than one
// answer holds.
func (s *Snapshots) Last(ctx context.Context, stream, anchor string, subjects []string, floor uint64) (map[string]*jetstream.RawStreamMsg, error) {
	out := make(map[string]*jetstream.RawStreamMsg, len(subjects))
	// A request's body stays well within the connection's largest message.
	budget := int(s.nc.MaxPayload()/4) - len(anchor)
	for start := 0; start < len(subjects); {
		end, size := start, 0
		for end < len(subjects) && end-start < maxSubjects && (end == start || size+len(subjects[end])+3 <= budget) {
			size += len(subjects[end]) + 3
			end++
		}
		ask := subjects[start:end:end]
		if anchor != "" && !slices.Contains(ask, anchor) {
			ask = append(ask, anchor)
		}
		if err := s.snapshot(ctx, stream, ask, floor, out); err != nil {
			return nil, err
		}
		start = end
	}
	if anchor != "" && !slices.Contains(subjects, anchor) {
		delete(out, anchor)
	}
	return out, nil
}

// snapshot asks for one request's subjects until a copy holding floor answers.
func (s *Snapshots) snapshot(ctx context.Context, stream string, subjects []string, floor uint64, out map[string]*jetstream.RawStreamMsg) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, readTimeout)
		defer cancel()
	}
	body, err := json.Marshal(struct {
		MultiLast []string `json:"multi_last"`
	}{subjects})
	if err != nil {
		return err
	}
	var behind uint64
	answered := false
	// A replica answers a moment after the leader acknowledged: ask again soon, then
	// less often.
	pause := behindPause / 16
	room := answerRoom(subjects)
	for {
		got, upTo, err := s.ask(ctx, stream, body, room)
		switch {
		case err == nil && upTo >= floor:
			for subj, m := range got {
				out[subj] = m
			}
			return nil
		case err == nil:
			behind, answered = upTo, true
		case errors.Is(err, errAgain):
		default:
			return err
		}
		select {
		case <-ctx.Done():
			if !answered {
				return fmt.Errorf("direct get of %s: no answer: %w", stream, ctx.Err())
			}
			return fmt.Errorf("%w: %s holds up to %d where answered, the read needs %d: %w", ErrBehind, stream, behind, floor, ctx.Err())
		case <-time.After(pause):
			pause = min(2*pause, behindPause)
		}
	}
}

// upToSequenceHeader names, on a multi-last answer's end, the last sequence of the copy
// that answered.
const upToSequenceHeader = "Nats-UpTo-Sequence"

// errAgain says an attempt got no usable answer in time: ask again.
var errAgain = errors.New("no answer")

// answerRoom is how many messages the answer to a request for subjects may hold, its
// end included: one a subject, or, with a wildcard among them, the most one answer
// holds. A message dropped for want of room would read as no message. (Keys are
// escaped in subjects: '*' and '>' are wildcards only.)
func answerRoom(subjects []string) int {
	for _, subj := range subjects {
		if strings.ContainsAny(subj, "*>") {
			return maxAnswer + 1
		}
	}
	return len(subjects) + 1
}

// ask sends one multi-last request and collects its answer (room messages at most):
// the messages by subject and the last sequence of the copy that answered (0 when it
// had none of the subjects).
func (s *Snapshots) ask(ctx context.Context, stream string, body []byte, room int) (map[string]*jetstream.RawStreamMsg, uint64, error) {
	msgs, end, err := s.request(ctx, stream, body, room)
	if err != nil || end == nil {
		return nil, 0, err // end nil: none of the subjects holds a message in that copy
	}
	if np := end.Get("Nats-Num-Pending"); np != "" && np != "0" {
		return nil, 0, fmt.Errorf("%w (%s: %s more)", ErrTooMany, stream, np)
	}
	upTo, err := strconv.ParseUint(end.Get(upToSequenceHeader), 10, 64)
	if err != nil {
		return nil, 0, fmt.Errorf("direct get of %s: end of batch without %s", stream, upToSequenceHeader)
	}
	got := make(map[string]*jetstream.RawStreamMsg, len(msgs))
	for _, m := range msgs {
		got[m.Subject] = m
	}
	return got, upTo, nil
}

// request sends one direct get of many messages and collects its answer (room
// messages at most): the messages in the order sent and the end of the batch's
// headers; none and a nil end when the copy that answered has no message to send
// (404). errAgain when nobody answered in time.
func (s *Snapshots) request(ctx context.Context, stream string, body []byte, room int) ([]*jetstream.RawStreamMsg, nats.Header, error) {
	ch, reply, forget := s.answers.Await(room)
	defer forget()
	if err := s.nc.PublishRequest("$JS.API.DIRECT.GET."+stream, reply, body); err != nil {
		return nil, nil, err
	}
	wait := time.NewTimer(resendAfter)
	defer wait.Stop()
	var got []*jetstream.RawStreamMsg
	for {
		select {
		case m := <-ch:
			status := m.Header.Get("Status")
			switch {
			case status == "":
				msg, err := directMsg(m)
				if err != nil {
					return nil, nil, err
				}
				got = append(got, msg)
				continue
			case status == "204":
				return got, m.Header, nil
			case status == "404":
				return nil, nil, nil
			case status == "413":
				return nil, nil, fmt.Errorf("%w (%s)", ErrTooMany, stream)
			case status == "503" && len(m.Data) == 0 && len(got) == 0:
				// Nobody answers: the stream allows no direct gets, or none of its
				// servers is in reach now (ask again).
				if st, err := s.js.Stream(ctx, stream); err == nil && !st.CachedInfo().Config.AllowDirect {
					return nil, nil, fmt.Errorf("%w (%s)", ErrNoDirect, stream)
				}
				return nil, nil, errAgain
			default:
				return nil, nil, fmt.Errorf("direct get of %s: %s %s", stream, status, m.Header.Get("Description"))
			}
		case <-wait.C:
			return nil, nil, errAgain // nobody answered (a request lost in an election, a dropped message)
		case <-ctx.Done():
			return nil, nil, errAgain
		}
	}
}

// directMsg reads one message of a direct get's answer: the stream's headers name it.
func directMsg(m *nats.Msg) (*jetstream.RawStreamMsg, error) {
	seq, err := strconv.ParseUint(m.Header.Get(jetstream.SequenceHeader), 10, 64)
	subj := m.Header.Get(jetstream.SubjectHeader)
	if err != nil || subj == "" {
		return nil, fmt.Errorf("direct get: a message without its subject or sequence")
	}
	t, _ := time.Parse(time.RFC3339Nano, m.Header.Get(jetstream.TimeStampHeaer))
	h := nats.Header{}
	for k, v := range m.Header {
		switch k {
		case jetstream.StreamHeader, jetstream.SequenceHeader, jetstream.SubjectHeader, jetstream.TimeStampHeaer,
			jetstream.LastSequenceHeader, "Nats-Num-Pending":
		default:
			h[k] = v
		}
	}
	return &jetstream.RawStreamMsg{Subject: subj, Sequence: seq, Header: h, Data: m.Data, Time: t}, nil
}
