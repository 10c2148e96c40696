package projector

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// ErrConsumerStalled says the run's consumer delivered nothing for a while although
// the partition's log holds events past the fold: the run stops, and the next one
// creates a consumer again.
var ErrConsumerStalled = errors.New("the event consumer delivers nothing while the log holds events past the fold")

// stallIdle is how long a run must have had no delivery before it asks whether the
// log holds more; stallCheck, how often it asks then. A stall is declared when two
// checks in a row find the log ahead of an Applied that did not move: 3 to 4 s.
const (
	stallIdle  = 2 * time.Second
	stallCheck = time.Second
)

// stallWatch follows a run's deliveries to notice a consumer that stalls.
//
// NATS subtlety: a run's consumer (one replica, in memory) reads the stream's replica
// on its own node. Placed on a node back from a network cut, whose replica is still
// catching up (or stuck retrying its catch-up), it delivers nothing new while its
// pull's heartbeats go on, so nothing else ends the run; the partition's writes would
// wait for that replica, on every instance.
type stallWatch struct {
	lastDelivery time.Time
	behindAt     uint64 // Applied when the log was last seen ahead of it; 0: not seen
}

// delivered notes a delivery.
func (w *stallWatch) delivered() { w.lastDelivery, w.behindAt = time.Now(), 0 }

// checkStall asks, once the run has been idle for stallIdle, for the partition's last
// event as the stream's leader has it, and returns ErrConsumerStalled when it is past
// Applied twice in a row with Applied unmoved.
func (p *Projector) checkStall(ctx context.Context, w *stallWatch, evs jetstream.Stream) error {
	if time.Since(w.lastDelivery) < stallIdle {
		return nil
	}
	m, err := lastOf(ctx, p.load.reads, evs, p.layout.PartitionSubjects(p.cfg.Partition))
	if err != nil {
		return nil // nothing on the partition yet, or no answer now: ask again later
	}
	applied := p.Applied()
	if m.Sequence <= applied {
		w.behindAt = 0
		return nil
	}
	if w.behindAt != applied {
		w.behindAt = applied
		return nil
	}
	return fmt.Errorf("%w: the partition's last event is at %d, folded to %d, nothing delivered for %s",
		ErrConsumerStalled, m.Sequence, applied, time.Since(w.lastDelivery).Round(100*time.Millisecond))
}
