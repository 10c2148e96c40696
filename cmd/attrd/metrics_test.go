package main

import (
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/attrd/attrd/events"
)

// documentedMetrics are the metrics docs/OPERATIONS.md describes: a scrape of a running
// attrd has every one of them.
var documentedMetrics = []string{
	"attrd_requests_total", "attrd_request_duration_seconds", "attrd_decision_wait_seconds",
	"attrd_refusals_total", "attrd_append_probes_total", "attrd_retries_answered_total",
	"attrd_gate_refusals_total", "attrd_gate_busy", "attrd_gate_waiting",
	"attrd_projector_applied_sequence", "attrd_projector_lag_events", "attrd_projector_lag_seconds",
	"attrd_projector_batch_events", "attrd_projector_batch_seconds", "attrd_projector_runs_total",
	"attrd_projector_redeliveries_total", "attrd_projector_delivery_gaps_total", "attrd_projector_stale_states_total",
	"attrd_lease_held", "attrd_lease_acquired_total", "attrd_lease_renew_failures_total",
	"attrd_stream_messages", "attrd_stream_bytes", "attrd_stream_duplicate_window_seconds", "attrd_stream_info_ok",
	"go_goroutines", "go_memstats_heap_alloc_bytes", "process_cpu_seconds_total", "process_resident_memory_bytes",
}

// scrape reads addr's /metrics and parses it with the Prometheus text parser.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: %d", resp.StatusCode)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("the exposition does not parse: %v", err)
	}
	return fams
}

// value returns the value of fam's sample whose labels include want (counter, gauge,
// or a histogram's count), and whether there is one.
func value(fams map[string]*dto.MetricFamily, fam string, want map[string]string) (float64, bool) {
	f := fams[fam]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

// TestMetricsAreScrapedAndMoveWithRequests: /metrics on the HTTP port parses with the
// Prometheus text parser, has every documented metric, and its counters move with the
// requests sent: writes and reads over NATS and REST, an invalid request, an oversize
// body, a throttled login.
func TestMetricsAreScrapedAndMoveWithRequests(t *testing.T) {
	s := mustStart(t, nil)
	before := scrape(t, s.MetricsAddr())
	c := mustClient(t, s)
	admin := mustLogin(t, c, "admin", adminPassword)
	u, err := admin.User(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := u.Attr.Set(ctxT(t), "a", i); err != nil {
			t.Fatal(err)
		}
	}
	ust := restLogin(t, s, "admin", adminPassword)
	st, _, b := httpDo(t, s, "POST", "/zato/sso/user/attr", map[string]any{"ust": ust, "current_app": "CRM", "name": "b", "value": 1}, nil)
	ok(t, st, b)
	st, _, _ = httpDo(t, s, "POST", "/zato/sso/user/attr", map[string]any{"ust": ust, "current_app": "CRM", "name": strings.Repeat("n", 500), "value": 1}, nil)
	if st == 200 {
		t.Fatal("a name of 500 characters was taken")
	}
	st, _, _ = httpDo(t, s, "POST", "/zato/sso/user/attr", strings.Repeat("x", 2<<20), nil)
	if st != http.StatusRequestEntityTooLarge {
		t.Fatalf("a body of 2 MiB: %d, want 413", st)
	}

	after := scrape(t, s.MetricsAddr())
	for _, name := range documentedMetrics {
		if after[name] == nil {
			t.Errorf("metric %s is missing", name)
		}
	}
	moved := func(fam string, labels map[string]string, atLeast float64) {
		t.Helper()
		b, _ := value(before, fam, labels)
		a, ok := value(after, fam, labels)
		if !ok || a-b < atLeast {
			t.Errorf("%s%v moved by %v, want at least %v", fam, labels, a-b, atLeast)
		}
	}
	moved("attrd_requests_total", map[string]string{"op": "user.attr.set", "transport": "nats", "code": "ok"}, 3)
	moved("attrd_requests_total", map[string]string{"op": "user.login", "transport": "nats", "code": "ok"}, 1)
	moved("attrd_requests_total", map[string]string{"op": "user.login", "transport": "rest", "code": "ok"}, 1)
	moved("attrd_requests_total", map[string]string{"op": "user.attr.create", "transport": "rest", "code": "ok"}, 1)
	moved("attrd_requests_total", map[string]string{"op": "user.attr.create", "transport": "rest", "code": string(events.CodeInvalidInput)}, 2)
	moved("attrd_request_duration_seconds", map[string]string{"op": "user.attr.set"}, 3)
	moved("attrd_decision_wait_seconds", nil, 4)
	moved("attrd_refusals_total", map[string]string{"reason": "invalid_input"}, 1)
	moved("attrd_refusals_total", map[string]string{"reason": "oversize"}, 1)
	moved("attrd_projector_batch_events", map[string]string{"partition": "0"}, 1)
	if v, _ := value(after, "attrd_lease_held", map[string]string{"partition": "0"}); v != 1 {
		t.Errorf("attrd_lease_held{partition=0} = %v, want 1 (the only instance folds it)", v)
	}
	if v, _ := value(after, "attrd_projector_applied_sequence", map[string]string{"partition": "0"}); v < 4 {
		t.Errorf("attrd_projector_applied_sequence{partition=0} = %v, want at least the 4 writes' events", v)
	}
	if v, _ := value(after, "attrd_stream_messages", map[string]string{"stream": events.StreamName}); v < 4 {
		t.Errorf("attrd_stream_messages{stream=%s} = %v, want the events appended", events.StreamName, v)
	}
}

// TestMetricsCanHaveTheirOwnListener: with --metrics-addr, /metrics is served there
// and not on the HTTP port, which browsers may reach.
func TestMetricsCanHaveTheirOwnListener(t *testing.T) {
	s := mustStart(t, func(c *Config) { c.MetricsAddr = "127.0.0.1:0" })
	if s.MetricsAddr() == s.HTTPAddr() {
		t.Fatal("the metrics listener is the HTTP one")
	}
	if fams := scrape(t, s.MetricsAddr()); fams["attrd_projector_runs_total"] == nil {
		t.Fatal("no attrd_projector_runs_total on the metrics listener")
	}
	resp, err := http.Get("http://" + s.HTTPAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == 200 && resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("the HTTP port serves metrics too (%s)", resp.Header.Get("Content-Type"))
	}
}

// TestTheShippedDashboardAndRulesUseDocumentedMetrics: every attrd metric the Grafana
// dashboard and the alerting rules query is one attrd exports (a renamed metric would
// leave a panel empty and an alert silent).
func TestTheShippedDashboardAndRulesUseDocumentedMetrics(t *testing.T) {
	known := map[string]bool{}
	for _, m := range documentedMetrics {
		known[m] = true
	}
	name := regexp.MustCompile(`attrd_[a-z_]+`)
	for _, path := range []string{"../../deploy/grafana/attrd-dashboard.json", "../../deploy/prometheus/attrd-rules.yml"} {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		used := 0
		for _, m := range name.FindAllString(string(data), -1) {
			if strings.HasPrefix(m, "attrd_rules") {
				continue
			}
			base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(m, "_bucket"), "_count"), "_sum")
			if !known[base] {
				t.Errorf("%s queries %s, which attrd does not export", path, m)
			}
			used++
		}
		if used == 0 {
			t.Errorf("%s queries no attrd metric", path)
		}
	}
}
