package api

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/attrd/attrd/events"
)

// metrics are the service's Prometheus metrics; a nil *metrics records nothing.
type metrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	decision prometheus.Histogram
	refusals *prometheus.CounterVec
	probes   prometheus.Counter
	kept     prometheus.Counter
	// watches are the open watches; watchEnds, the watches ended, by reason.
	watches   prometheus.Gauge
	watchEnds *prometheus.CounterVec
}

// Refusal reasons (attrd_refusals_total's reason label); busy gates have their own
// metric, attrd_gate_refusals_total.
const (
	refusedThrottled = "throttled_login" // a login refused by the throttle or the bounds on logins in flight
	// RefusedOversize is the reason of a body over the limit, refused before its
	// operation (transports pass it to Refuse).
	RefusedOversize = "oversize"
	refusedInvalid  = "invalid_input" // E008002: malformed, or over a limit
	refusedNoQuorum = "no_quorum"     // a read refused: no recent quorum heartbeat, or one just back
	// refusedTwoLeaders: a read refused because two servers answered one read as a
	// stream's leader, differently, within twoLeadersHold.
	refusedTwoLeaders = "two_leaders"
	// refusedBehind: a read refused because no copy of the bucket holding its
	// barrier answered within readIndexWait (readindex.go).
	refusedBehind = "copies_behind"
)

// Transports, as Meta.Transport names them.
const (
	TransportNATS = "nats"
	TransportREST = "rest"
)

func newMetrics(reg prometheus.Registerer, s *Service) *metrics {
	if reg == nil {
		return nil
	}
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "attrd_requests_total",
			Help: "Requests answered, by operation, transport and outcome code (ok, or the contract's code)."},
			[]string{"op", "transport", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "attrd_request_duration_seconds",
			Help:    "Seconds from a request's arrival to its answer, by operation.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}}, []string{"op"}),
		decision: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "attrd_decision_wait_seconds",
			Help:    "Seconds a write waited for the projector's decision on its event, from the append.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "attrd_refusals_total",
			Help: "Requests refused before or instead of their operation, by reason."}, []string{"reason"}),
		probes: prometheus.NewCounter(prometheus.CounterOpts{Name: "attrd_append_probes_total",
			Help: "Appends probed for their ack because no decision came in time (a retry, a lost publish, an election)."}),
		kept: prometheus.NewCounter(prometheus.CounterOpts{Name: "attrd_retries_answered_total",
			Help: "Retried requests (a request id seen before) answered with the first request's decision."}),
		watches: prometheus.NewGauge(prometheus.GaugeOpts{Name: "attrd_watches",
			Help: "Watches open on this instance."}),
		watchEnds: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "attrd_watch_ends_total",
			Help: "Watches ended, by reason (session_ended, user_deleted, slow, renewal_missed, stopped, gone, shutdown, unavailable, resume_impossible)."},
			[]string{"reason"}),
	}
	reg.MustRegister(m.requests, m.duration, m.decision, m.refusals, m.probes, m.kept, m.watches, m.watchEnds)
	for name, g := range map[string]*Gate{"password": s.hashes, "history": s.histories} {
		g := g
		labels := prometheus.Labels{"gate": name}
		reg.MustRegister(
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "attrd_gate_refusals_total", ConstLabels: labels,
				Help: "Requests a load gate refused as busy (E008004 with Retry-After)."},
				func() float64 { return float64(g.Refused()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "attrd_gate_busy", ConstLabels: labels,
				Help: "Slots of a load gate in use."},
				func() float64 { b, _ := g.Load(); return float64(b) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "attrd_gate_waiting", ConstLabels: labels,
				Help: "Requests waiting for a slot of a load gate."},
				func() float64 { _, w := g.Load(); return float64(w) }))
	}
	return m
}

// answered records a request's answer, and its refusal: reason if given, else what
// the answer says (bad input, a throttled login).
func (m *metrics) answered(op Op, transport string, rep Reply, took time.Duration, reason string) {
	if m == nil {
		return
	}
	switch {
	case reason != "":
	case rep.Code == events.CodeInvalidInput:
		reason = refusedInvalid
	case op == OpLogin && rep.Code == events.CodeNotAllowed && rep.RetryAfter > 0:
		reason = refusedThrottled
	}
	if reason != "" {
		m.refusals.WithLabelValues(reason).Inc()
	}
	if transport == "" {
		transport = "other" // a caller that names none (tests, tools)
	}
	code := "ok"
	if rep.Code != "" {
		code = string(rep.Code)
	}
	m.requests.WithLabelValues(string(op), transport, code).Inc()
	m.duration.WithLabelValues(string(op)).Observe(took.Seconds())
}

func (m *metrics) refused(reason string) {
	if m != nil {
		m.refusals.WithLabelValues(reason).Inc()
	}
}

func (m *metrics) decided(took time.Duration) {
	if m != nil {
		m.decision.Observe(took.Seconds())
	}
}

func (m *metrics) probed() {
	if m != nil {
		m.probes.Inc()
	}
}

func (m *metrics) keptAnswer() {
	if m != nil {
		m.kept.Inc()
	}
}

// watching records the number of open watches.
func (m *metrics) watching(n int) {
	if m != nil {
		m.watches.Set(float64(n))
	}
}

// watchEnded records a watch's end and the number left open.
func (m *metrics) watchEnded(reason string, n int) {
	if m != nil {
		m.watchEnds.WithLabelValues(reason).Inc()
		m.watches.Set(float64(n))
	}
}
