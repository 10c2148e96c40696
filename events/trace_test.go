package events

import (
	"testing"

	"github.com/nats-io/nats.go"
)

// TestATraceCarrierFindsTraceparentWhateverItsCase: NATS keeps header names as sent, so
// a W3C "traceparent" and Go's canonical "Traceparent" are both found, and Set writes
// one that Get reads back.
func TestATraceCarrierFindsTraceparentWhateverItsCase(t *testing.T) {
	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	for _, name := range []string{"traceparent", "Traceparent", "TRACEPARENT"} {
		h := TraceCarrier(nats.Header{name: {tp}})
		if got := h.Get("traceparent"); got != tp {
			t.Errorf("header %q: Get(traceparent) = %q", name, got)
		}
	}
	h := TraceCarrier(nats.Header{})
	h.Set("traceparent", tp)
	if h.Get("traceparent") != tp || len(h.Keys()) != 1 {
		t.Errorf("after Set: %v", h)
	}
	if TraceCarrier(nats.Header{}).Get("traceparent") != "" {
		t.Error("an empty header has a traceparent")
	}
}
