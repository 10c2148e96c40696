package projector

import (
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the projectors' and leases' Prometheus metrics, labelled by partition.
// A nil *Metrics records nothing (replays, tools).
type Metrics struct {
	applied     *prometheus.GaugeVec
	pending     *prometheus.GaugeVec
	delay       *prometheus.GaugeVec
	batch       *prometheus.HistogramVec
	commit      *prometheus.HistogramVec
	runs        *prometheus.CounterVec
	redelivered *prometheus.CounterVec
	gaps        *prometheus.CounterVec
	held        *prometheus.GaugeVec
	acquired    *prometheus.CounterVec
	renewFailed *prometheus.CounterVec
	staleStates *prometheus.CounterVec
}

// NewMetrics registers the projectors' metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	part := []string{"partition"}
	gauge := func(name, help string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, part)
	}
	counter := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, part)
	}
	histogram := func(name, help string, buckets []float64) *prometheus.HistogramVec {
		return prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets}, part)
	}
	m := &Metrics{
		applied: gauge("attrd_projector_applied_sequence",
			"The last event stream sequence this instance's projector folded and committed, by partition."),
		pending: gauge("attrd_projector_lag_events",
			"Events of the partition in the stream after the last one delivered to its projector here."),
		delay: gauge("attrd_projector_lag_seconds",
			"Seconds between the append of the last event of the latest batch and its commit."),
		batch: histogram("attrd_projector_batch_events", "Events folded in one batch.",
			prometheus.ExponentialBuckets(1, 4, 6)),
		commit: histogram("attrd_projector_batch_seconds", "Seconds to fold and commit one batch (intent record, keys, replies).",
			prometheus.ExponentialBuckets(0.0005, 4, 8)),
		runs: counter("attrd_projector_runs_total",
			"Projector runs started here (each holds the lease, recovers and consumes)."),
		redelivered: counter("attrd_projector_redeliveries_total", "Events delivered to a projector more than once."),
		gaps: counter("attrd_projector_delivery_gaps_total",
			"Runs stopped because the consumer skipped deliveries (the next run consumes again)."),
		held:     gauge("attrd_lease_held", "1 while this instance holds the partition's lease."),
		acquired: counter("attrd_lease_acquired_total", "Leases this instance took (a start, a handover or a takeover)."),
		renewFailed: counter("attrd_lease_renew_failures_total",
			"Lease renewals that failed (the lease is lost once one fails past its TTL)."),
		staleStates: counter("attrd_projector_stale_states_total",
			"States in an intent record that a recovery found older than the bucket (read from a server that was behind) and replaced with the bucket's."),
	}
	reg.MustRegister(m.applied, m.pending, m.delay, m.batch, m.commit, m.runs, m.redelivered, m.gaps,
		m.held, m.acquired, m.renewFailed, m.staleStates)
	return m
}

// partitionMetrics are one partition's metrics, resolved once (no label lookup per
// event); a nil *partitionMetrics records nothing.
type partitionMetrics struct {
	applied, pending, delay, held     prometheus.Gauge
	batch, commit                     prometheus.Observer
	runs, redelivered, gaps, acquired prometheus.Counter
	renewFailed, staleStates          prometheus.Counter
}

// of returns partition p's metrics (nil for a nil *Metrics).
func (m *Metrics) of(p int) *partitionMetrics {
	if m == nil {
		return nil
	}
	l := strconv.Itoa(p)
	// Every one is created here, so that it is exported, at zero, from the first run on.
	return &partitionMetrics{applied: m.applied.WithLabelValues(l), pending: m.pending.WithLabelValues(l),
		delay: m.delay.WithLabelValues(l), held: m.held.WithLabelValues(l), batch: m.batch.WithLabelValues(l),
		commit: m.commit.WithLabelValues(l), runs: m.runs.WithLabelValues(l), redelivered: m.redelivered.WithLabelValues(l),
		gaps: m.gaps.WithLabelValues(l), acquired: m.acquired.WithLabelValues(l), renewFailed: m.renewFailed.WithLabelValues(l),
		staleStates: m.staleStates.WithLabelValues(l)}
}

// runStarted counts a run of the partition's projector.
func (m *partitionMetrics) runStarted() {
	if m != nil {
		m.runs.Inc()
	}
}

// delivered records what a delivered event's metadata says of the partition's lag.
func (m *partitionMetrics) delivered(md *jetstream.MsgMetadata) {
	if m == nil {
		return
	}
	m.pending.Set(float64(md.NumPending))
	if md.NumDelivered > 1 {
		m.redelivered.Inc()
	}
}

// gap counts a delivery gap.
func (m *partitionMetrics) gap() {
	if m != nil {
		m.gaps.Inc()
	}
}

// batchDone records a folded batch: its size, how long it took, how far it got, and
// how long its last event waited since it was appended.
func (m *partitionMetrics) batchDone(events int, took time.Duration, applied uint64, appended time.Time) {
	if m == nil {
		return
	}
	m.batch.Observe(float64(events))
	m.commit.Observe(took.Seconds())
	m.applied.Set(float64(applied))
	if !appended.IsZero() {
		m.delay.Set(time.Since(appended).Seconds())
	}
}

// leaseHeld records whether this instance holds the partition's lease.
func (m *partitionMetrics) leaseHeld(held bool) {
	if m == nil {
		return
	}
	v := 0.0
	if held {
		v = 1
		m.acquired.Inc()
	}
	m.held.Set(v)
}

// renewFailure counts a failed lease renewal.
func (m *partitionMetrics) renewFailure() {
	if m != nil {
		m.renewFailed.Inc()
	}
}

// staleImage counts a recorded state a recovery found older than the bucket.
func (m *partitionMetrics) staleImage() {
	if m != nil {
		m.staleStates.Inc()
	}
}
