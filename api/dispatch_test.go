package api

import (
	"context"
	"testing"

	"github.com/attrd/attrd/events"
)

// TestARequestCutShortByShutdownIsRetryableNot500: an instance that stops cancels the
// requests it is handling; their reads fail with the context. That is no bug of the
// request: it answers E008004 (503), so that the client sends it again elsewhere.
func TestARequestCutShortByShutdownIsRetryableNot500(t *testing.T) {
	svc, ust, _, _, _ := serviceWithSession(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, op := range []Op{UserAttrOp(VerbGet), UserAttrOp(VerbSet)} {
		req, err := svc.ParseBody([]byte(`{"ust":"`+ust+`","current_app":"CRM","name":"a","value":1}`), false)
		if err != nil {
			t.Fatal(err)
		}
		rep := svc.Handle(ctx, op, req, Meta{})
		if rep.Code != events.CodeOutcomeUnknown || rep.Status != 503 {
			t.Errorf("%s with its context canceled: %d %s %v, want 503 %s", op, rep.Status, rep.Code, rep.Body, events.CodeOutcomeUnknown)
		}
	}
}
