package rest

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestAPanicIsThe500EnvelopeAndLeaksNothing: with no service behind it every operation
// panics; the client sees only the contract's 500 envelope.
func TestAPanicIsThe500EnvelopeAndLeaksNothing(t *testing.T) {
	h := Handler(nil, Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/zato/sso/user/login", strings.NewReader(`{"current_app":"CRM","username":"a","password":"b"}`)))
	if rec.Code != http.StatusInternalServerError {
		t.Fatalf("status %d, want 500", rec.Code)
	}
	var body map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
		t.Fatalf("body %q", rec.Body)
	}
	if body["result"] != "Error" || body["details"] != "Internal error" || body["cid"] == nil || len(body) != 3 {
		t.Fatalf("500 body: %v", body)
	}
	if strings.Contains(rec.Body.String(), "nil") || strings.Contains(rec.Body.String(), "panic") {
		t.Fatalf("the 500 body leaks: %q", rec.Body)
	}
}

func TestUnknownRoutesAnswerJSON(t *testing.T) {
	h := Handler(nil, Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	for path, want := range map[string]int{"/nope": 404} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		if rec.Code != want || !json.Valid(rec.Body.Bytes()) {
			t.Fatalf("%s: %d %q", path, rec.Code, rec.Body)
		}
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("DELETE", "/zato/sso/user/login", nil))
	if rec.Code != http.StatusMethodNotAllowed || rec.Header().Get("Allow") == "" || !json.Valid(rec.Body.Bytes()) {
		t.Fatalf("wrong method: %d %v %q", rec.Code, rec.Header(), rec.Body)
	}
}
