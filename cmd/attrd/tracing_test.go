package main

import (
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// TestOneUpdateIsOneTraceFromTheCallerThroughTheFold: an update sent to instance B
// over REST with a W3C traceparent, folded by instance A (which holds the partition),
// is one connected trace: B's request span continues the caller's, and A's fold span is
// a child of B's request span, carried in the event's headers.
func TestOneUpdateIsOneTraceFromTheCallerThroughTheFold(t *testing.T) {
	if testing.Short() {
		t.Skip("a cluster of three NATS nodes and two attrd instances")
	}
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	prevTP, prevProp := otel.GetTracerProvider(), otel.GetTextMapPropagator()
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	t.Cleanup(func() { otel.SetTracerProvider(prevTP); otel.SetTextMapPropagator(prevProp) })

	cl := startNATSCluster(t)
	a := cl.instance(t)
	waitHolders(t, a, 1, 10*time.Second, "the first instance holds the partition", func(h []string) bool { return h[0] == a.instance })
	b := cl.instance(t)
	ust := restLogin(t, b, "admin", adminPassword)
	st, _, body := httpDo(t, b, "POST", "/zato/sso/user/attr", map[string]any{"ust": ust, "current_app": "CRM", "name": "traced", "value": 1}, nil)
	ok(t, st, body)

	const traceID, parentID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	st, _, body = httpDo(t, b, "PATCH", "/zato/sso/user/attr", map[string]any{"ust": ust, "current_app": "CRM", "name": "traced", "value": 2},
		map[string]string{"traceparent": "00-" + traceID + "-" + parentID + "-01"})
	ok(t, st, body)
	if h := holders(t, a, 1); h[0] != a.instance {
		t.Fatalf("instance %s folded the partition, want A (%s)", h[0], a.instance)
	}

	var request, fold sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		if s.SpanContext().TraceID().String() != traceID {
			continue
		}
		switch s.Name() {
		case "attrd user.attr.update":
			request = s
		case "attrd fold":
			fold = s
		}
	}
	if request == nil {
		t.Fatalf("no request span in the caller's trace %s; spans: %v", traceID, names(rec.Ended()))
	}
	if request.Parent().SpanID().String() != parentID || request.SpanKind() != trace.SpanKindServer {
		t.Fatalf("the request span's parent is %s (%v), want the caller's %s", request.Parent().SpanID(), request.SpanKind(), parentID)
	}
	if fold == nil {
		t.Fatalf("no fold span in the caller's trace %s; spans: %v", traceID, names(rec.Ended()))
	}
	if fold.Parent().SpanID() != request.SpanContext().SpanID() {
		t.Fatalf("the fold span's parent is %s, want the request span %s", fold.Parent().SpanID(), request.SpanContext().SpanID())
	}
}

func names(spans []sdktrace.ReadOnlySpan) []string {
	var out []string
	for _, s := range spans {
		out = append(out, s.Name()+"/"+s.SpanContext().TraceID().String()[:8])
	}
	return out
}
