package events

import (
	"strings"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/propagation"
)

// TraceCarrier carries W3C trace context (traceparent, tracestate) in NATS headers: a
// request's, and an event's, so that the fold continues the request's trace. NATS
// keeps a header's name as it was sent, so Get matches names without regard to case
// ("traceparent" as W3C writes it, or "Traceparent" as Go's http.Header would).
type TraceCarrier nats.Header

// Get returns the first value of key.
func (h TraceCarrier) Get(key string) string {
	if v := nats.Header(h).Get(key); v != "" {
		return v
	}
	for k, vs := range h {
		if strings.EqualFold(k, key) && len(vs) > 0 {
			return vs[0]
		}
	}
	return ""
}

// Set sets key to value.
func (h TraceCarrier) Set(key, value string) { nats.Header(h).Set(key, value) }

// Keys lists the header's names.
func (h TraceCarrier) Keys() []string {
	keys := make([]string, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	return keys
}

var _ propagation.TextMapCarrier = TraceCarrier(nil)
