package api

import (
	"context"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// tracer returns the tracer of the api's spans, from the global provider (a no-op
// unless the binary configured one), looked up at each use so that a provider set
// later takes effect.
func tracer() trace.Tracer { return otel.Tracer("github.com/attrd/attrd/api") }

// ExtractTrace returns ctx with the trace context a request's headers carry (none: a
// new trace starts at the request's span).
func ExtractTrace(ctx context.Context, carrier propagation.TextMapCarrier) context.Context {
	return otel.GetTextMapPropagator().Extract(ctx, carrier)
}

// InjectTrace writes ctx's trace context into carrier.
func InjectTrace(ctx context.Context, carrier propagation.TextMapCarrier) {
	otel.GetTextMapPropagator().Inject(ctx, carrier)
}

// startRequest starts a request's span, a child of the caller's trace if it sent one.
func startRequest(ctx context.Context, op Op, transport string) (context.Context, trace.Span) {
	return tracer().Start(ctx, "attrd "+string(op), trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("attrd.op", string(op)), attribute.String("attrd.transport", transport)))
}

// endRequest ends a request's span with its outcome.
func endRequest(span trace.Span, rep Reply) {
	code := "ok"
	if rep.Code != "" {
		code = string(rep.Code)
	}
	span.SetAttributes(attribute.String("attrd.code", code), attribute.Int("http.response.status_code", rep.Status))
	if rep.Status >= 500 && rep.Code != "" {
		span.SetStatus(codes.Error, code)
	}
	span.End()
}
