package main

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// readiness decides whether this instance can get writes decided now: its NATS
// connections up, the event stream answering, some instance holding the projector's
// lease, and every event that was in the log maxLag ago folded (as the holder reports
// in the lease). It samples the log's last sequence every
// interval; /readyz answers from the latest verdict, so a probe costs nothing.
type readiness struct {
	stream   func(ctx context.Context) (uint64, error)       // the log's last sequence
	applied  func(ctx context.Context) (uint64, bool, error) // how far the log is folded, and whether a projector holds the lease
	conns    []*nats.Conn
	maxLag   time.Duration
	interval time.Duration

	mu      sync.Mutex
	ready   bool
	reason  string
	samples []lastSeq // the log's last sequence over the past few maxLag
}

type lastSeq struct {
	at  time.Time
	seq uint64
}

// Defaults of the readiness check.
const (
	readyMaxLag   = 3 * time.Second
	readyInterval = 250 * time.Millisecond
)

func newReadiness(js jetstream.JetStream, applied func(context.Context) (uint64, bool, error), conns ...*nats.Conn) *readiness {
	return &readiness{
		stream: func(ctx context.Context) (uint64, error) {
			// Stream info (which js.Stream fetches) is answered by the stream's leader:
			// on a cluster without quorum it fails, which is exactly when writes cannot
			// be decided.
			st, err := js.Stream(ctx, events.StreamName)
			if err != nil {
				return 0, err
			}
			return st.CachedInfo().State.LastSeq, nil
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
	last, err := r.stream(cctx)
	if err != nil {
		return false, "the event stream does not answer"
	}
	now := time.Now()
	r.mu.Lock()
	r.samples = append(r.samples, lastSeq{now, last})
	// Keep the newest sample at least maxLag old, and everything after it.
	for len(r.samples) > 1 && now.Sub(r.samples[1].at) >= r.maxLag {
		r.samples = r.samples[1:]
	}
	due := r.samples[0] // the log's end maxLag ago (or the oldest known)
	r.mu.Unlock()
	applied, running, err := r.applied(cctx)
	if err != nil {
		return false, "the projector's lease cannot be read"
	}
	if !running {
		return false, "no instance holds the projector's lease"
	}
	if now.Sub(due.at) >= r.maxLag && applied < due.seq {
		return false, "the projector lags: events appended " + r.maxLag.String() + " ago are not folded yet"
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
