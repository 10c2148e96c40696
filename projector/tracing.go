package projector

import (
	"context"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/attrd/attrd/events"
)

// tracer returns the tracer of the projector's spans, from the global provider (a no-op
// unless the binary configured one), looked up at each use so that a provider set
// later takes effect.
func tracer() trace.Tracer { return otel.Tracer("github.com/attrd/attrd/projector") }

// startFold starts the span of an event's fold, a child of the request that appended
// it when the event carries its trace context (the API puts it in the event's headers),
// on whichever instance folds the partition. Replays make none.
func (p *Projector) startFold(m jetstream.Msg, seq uint64, ev *events.Event) trace.Span {
	if !p.cfg.Replies {
		return nil
	}
	ctx := otel.GetTextMapPropagator().Extract(context.Background(), events.TraceCarrier(m.Headers()))
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return nil // no trace to continue
	}
	_, span := tracer().Start(ctx, "attrd fold", trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(attribute.Int64("attrd.seq", int64(seq)), attribute.String("attrd.event", string(ev.Type)),
			attribute.Int("attrd.partition", p.cfg.Partition)))
	return span
}

// endFolds ends the spans of a landed chunk's events with their decisions: their keys
// are written, their replies about to go.
func endFolds(items []item, decisions []events.Decision) {
	for i, it := range items {
		if it.span == nil {
			continue
		}
		code := "accepted"
		if decisions[i].Code != "" {
			code = string(decisions[i].Code)
		}
		it.span.AddEvent("keys written")
		it.span.SetAttributes(attribute.String("attrd.decision", code))
		it.span.End()
	}
}
