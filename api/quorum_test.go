package api

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// TestReadsWaitAfterTheQuorumComesBack: after the heartbeats failed for longer than
// quorumBound (a network cut of this instance's node), the first acknowledged one
// does not let reads through at once: the old leader of a stream, on the node back
// from the cut, may answer them from its old copy until it hears of the new leader.
// Reads are answered again quorumSettle after it. A first heartbeat at start is no
// return: reads go at once.
func TestReadsWaitAfterTheQuorumComesBack(t *testing.T) {
	_, nc, _ := embeddedStore(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := &Service{leader: mustLeaderReads(t, nc), inbox: "test"}
	subject := events.KVSubject(events.DefaultStoreConfig().Bucket, "h.test")

	if err := s.heartbeat(ctx, js, subject); err != nil {
		t.Fatal(err)
	}
	if _, err := s.reading(ctx); err != nil {
		t.Fatalf("a read after the first heartbeat at start: %v", err)
	}

	// The heartbeats stop being acknowledged for longer than quorumBound...
	s.quorum.Store(time.Now().Add(-2 * quorumBound).UnixNano())
	if _, err := s.reading(ctx); !isOutcomeUnknown(err) {
		t.Fatalf("a read without a recent heartbeat: %v, want E008004", err)
	}
	// ...and come back.
	back := time.Now()
	if err := s.heartbeat(ctx, js, subject); err != nil {
		t.Fatal(err)
	}
	if _, err := s.reading(ctx); !isOutcomeUnknown(err) {
		t.Fatalf("a read right after the quorum came back: %v, want E008004", err)
	}
	for time.Since(back) < quorumSettle+time.Second {
		if err := s.heartbeat(ctx, js, subject); err != nil {
			t.Fatal(err)
		}
		if _, err := s.reading(ctx); err == nil {
			if took := time.Since(back); took < quorumSettle {
				t.Fatalf("reads answered %s after the quorum came back, want %s", took, quorumSettle)
			}
			return
		}
		time.Sleep(quorumEvery)
	}
	t.Fatalf("reads still refused %s after the quorum came back", time.Since(back))
}

func isOutcomeUnknown(err error) bool {
	var e *events.Error
	return errors.As(err, &e) && e.Code == events.CodeOutcomeUnknown
}
