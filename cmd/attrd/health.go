package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// readiness decides whether this instance can get writes decided now: its NATS
// connections up, the event stream answering, some instance holding every partition's
// lease, and every event that was in the log maxLag ago folded (as each partition's
// holder reports in its lease). It samples every partition's last sequence every
// interval; /readyz answers from the latest verdict, so a probe costs nothing.
type readiness struct {
	// last returns the log's last sequence and, of each partition, the sequence of its
	// last message (0: none).
	last     func(ctx context.Context) (uint64, []uint64, error)
	applied  func(ctx context.Context, partition int) (uint64, bool, error) // how far a partition is folded, and whether a projector holds its lease
	conns    []*nats.Conn
	maxLag   time.Duration
	interval time.Duration

	mu      sync.Mutex
	ready   bool
	reason  string
	samples []lastSeqs // the partitions' last sequences over the past few maxLag
}

type lastSeqs struct {
	at   time.Time
	seqs []uint64 // by partition
}

// Defaults of the readiness check.
const (
	readyMaxLag   = 3 * time.Second
	readyInterval = 250 * time.Millisecond
)

func newReadiness(js jetstream.JetStream, layout events.Layout, applied func(context.Context, int) (uint64, bool, error), conns ...*nats.Conn) *readiness {
	return &readiness{
		last: func(ctx context.Context) (uint64, []uint64, error) {
			// Stream info (which js.Stream fetches) is answered by the stream's leader:
			// on a cluster without quorum it fails, which is exactly when writes cannot
			// be decided.
			st, err := js.Stream(ctx, events.StreamName)
			if err != nil {
				return 0, nil, err
			}
			last := st.CachedInfo().State.LastSeq
			if layout.N() == 1 {
				return last, []uint64{last}, nil
			}
			seqs := make([]uint64, layout.N())
			for p := range seqs {
				m, err := st.GetLastMsgForSubject(ctx, layout.PartitionSubjects(p))
				switch {
				case errors.Is(err, jetstream.ErrMsgNotFound):
				case err != nil:
					return 0, nil, err
				default:
					seqs[p] = m.Sequence
				}
			}
			return last, seqs, nil
		},
		applied: applied, conns: conns, maxLag: readyMaxLag, interval: readyInterval, reason: "starting",
	}
}

// run samples until ctx ends.
func (r *readiness) run(ctx context.Context) {
	t := time.NewTicker(r.interval)
	defer t.Stop()
	for {
		r.check(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// check takes one sample and sets the verdict.
func (r *readiness) check(ctx context.Context) {
	ready, reason := r.judge(ctx)
	r.mu.Lock()
	r.ready, r.reason = ready, reason
	r.mu.Unlock()
}

func (r *readiness) judge(ctx context.Context) (bool, string) {
	for _, nc := range r.conns {
		if !nc.IsConnected() {
			return false, "not connected to NATS"
		}
	}
	cctx, cancel := context.WithTimeout(ctx, r.interval+time.Second)
	defer cancel()
	_, seqs, err := r.last(cctx)
	if err != nil {
		return false, "the event stream does not answer"
	}
	now := time.Now()
	r.mu.Lock()
	r.samples = append(r.samples, lastSeqs{now, seqs})
	// Keep the newest sample at least maxLag old, and everything after it.
	for len(r.samples) > 1 && now.Sub(r.samples[1].at) >= r.maxLag {
		r.samples = r.samples[1:]
	}
	due := r.samples[0] // the partitions' ends maxLag ago (or the oldest known)
	r.mu.Unlock()
	for p := range seqs {
		applied, running, err := r.applied(cctx, p)
		if err != nil {
			return false, fmt.Sprintf("the lease of partition %d cannot be read", p)
		}
		if !running {
			return false, fmt.Sprintf("no instance holds the lease of partition %d", p)
		}
		if now.Sub(due.at) >= r.maxLag && p < len(due.seqs) && applied < due.seqs[p] {
			return false, fmt.Sprintf("partition %d lags: events appended %s ago are not folded yet", p, r.maxLag)
		}
	}
	return true, ""
}

// status returns the latest verdict.
func (r *readiness) status() (bool, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ready, r.reason
}

// serveReady answers /readyz (and /healthz): 200 when ready, 503 with the reason.
func (r *readiness) serveReady(w http.ResponseWriter, _ *http.Request) {
	ready, reason := r.status()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if !ready {
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(map[string]string{"status": "unready", "reason": reason})
		return
	}
	json.NewEncoder(w).Encode(map[string]string{"status": "ready"})
}

// serveLive answers /livez: the process is up and serving HTTP.
func serveLive(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Write([]byte(`{"status":"live"}` + "\n"))
}
