package projector

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// A run that cannot create its consumer reads its partition's log with direct gets:
// the tail.
//
// NATS subtlety: creating a consumer, even one of one replica in memory, is a proposal
// to the meta group. While the meta group has no leader (its leader's node cut off, an
// election after a heal: 4–9 s), no consumer can be created, though the event stream
// and the bucket have leaders and take writes; a run starting then (a partition taken
// over, a run whose consumer was lost with its node) would wait for that election. A
// direct get asks no meta group: any replica answers it from its copy, and a copy's
// messages are the stream's, in order (a replica stores a message once its group
// committed it); a copy behind only has fewer. The tail is the slower way (a request a
// read, and every event a second time as the bell), so a run on it stops after tailFor
// and the next tries a consumer again.

// tailFor is how long a run reads the log by direct gets before it stops, so that the
// next run creates a consumer.
const tailFor = 15 * time.Second

// Between reads that found nothing new: tailPoll without a bell (one missed), and,
// after a bell, tailFirstPause doubling up to tailPoll (the event rang as it was
// published, and is stored a moment later).
const (
	tailPoll       = 50 * time.Millisecond
	tailFirstPause = 250 * time.Microsecond
)

// errTailEnded ends a run that read the log by direct gets for tailFor: the next run
// is started at once.
var errTailEnded = errors.New("the run read its log by direct gets for its time: the next creates a consumer")

// tailLog sends the partition's events from start on to msgs, in order, numbered 1, 2,
// 3, … as a consumer numbers its deliveries, until ctx ends. A failure (the stream
// serves no direct gets) goes to broken.
func (p *Projector) tailLog(ctx context.Context, stream string, start uint64, msgs chan<- jetstream.Msg, broken chan<- error) {
	fail := func(err error) {
		select {
		case broken <- err:
		default:
		}
	}
	subject := p.layout.PartitionSubjects(p.cfg.Partition)
	// The bell: every event published on the partition, as it is published.
	bell := make(chan struct{}, 1)
	sub, err := p.nc.Subscribe(subject, func(*nats.Msg) {
		select {
		case bell <- struct{}{}:
		default:
		}
	})
	if err != nil {
		fail(err)
		return
	}
	defer sub.Unsubscribe()
	next, n := start, uint64(0)
	rang, pause := false, tailFirstPause
	for {
		got, more, err := p.load.snaps.Next(ctx, stream, subject, next, 2*p.cfg.MaxBatch)
		if err != nil {
			if ctx.Err() == nil {
				fail(err)
			}
			return
		}
		for _, m := range got {
			n++
			select {
			case msgs <- &logMsg{raw: m, n: n}:
			case <-ctx.Done():
				return
			}
			next = m.Sequence + 1
		}
		if len(got) > 0 || more {
			rang, pause = false, tailFirstPause
			continue
		}
		wait := tailPoll
		if rang {
			wait, pause = pause, min(2*pause, tailPoll)
		}
		select {
		case <-ctx.Done():
			return
		case <-bell:
			rang, pause = true, tailFirstPause
		case <-time.After(wait):
		}
	}
}

// logMsg is an event read from the log by a direct get, as the fold takes a
// consumer's delivery: numbered by the tail (its delivery sequence), delivered once.
// Acks are nothing: the intent record is the position.
type logMsg struct {
	raw *jetstream.RawStreamMsg
	n   uint64
}

func (m *logMsg) Metadata() (*jetstream.MsgMetadata, error) {
	return &jetstream.MsgMetadata{Sequence: jetstream.SequencePair{Stream: m.raw.Sequence, Consumer: m.n},
		NumDelivered: 1, Timestamp: m.raw.Time}, nil
}
func (m *logMsg) Data() []byte                     { return m.raw.Data }
func (m *logMsg) Headers() nats.Header             { return m.raw.Header }
func (m *logMsg) Subject() string                  { return m.raw.Subject }
func (m *logMsg) Reply() string                    { return "" }
func (m *logMsg) Ack() error                       { return nil }
func (m *logMsg) DoubleAck(context.Context) error  { return nil }
func (m *logMsg) Nak() error                       { return nil }
func (m *logMsg) NakWithDelay(time.Duration) error { return nil }
func (m *logMsg) InProgress() error                { return nil }
func (m *logMsg) Term() error                      { return nil }
func (m *logMsg) TermWithReason(string) error      { return nil }
