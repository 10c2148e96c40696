package main

import (
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/attrd/attrd/projector"
)

func probe(t *testing.T, s *Server, path string) int {
	t.Helper()
	resp, err := http.Get("http://" + s.HTTPAddr() + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// waitProbe waits until path answers want, and returns how long that took.
func waitProbe(t *testing.T, s *Server, path string, want int, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for probe(t, s, path) != want {
		if time.Since(start) > within {
			t.Fatalf("%s did not answer %d within %s", path, want, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return time.Since(start)
}

// TestReadyzTellsWhenWritesCannotBeDecided: a projector that stops folding (here: stuck
// in a batch) makes /readyz and /healthz answer 503 within a few seconds while /livez
// stays 200; once it folds again, /readyz is 200 again.
func TestReadyzTellsWhenWritesCannotBeDecided(t *testing.T) {
	var stuck atomic.Bool
	release := make(chan struct{})
	hooks := projector.Hooks{BeforeCheckpoint: func(first, last uint64) error {
		if stuck.Load() {
			<-release
		}
		return nil
	}}
	f := newFixture(t, func(c *Config) { c.ProjectorHooks = hooks; c.DecisionTimeout = 500 * time.Millisecond })
	for _, p := range []string{"/livez", "/readyz", "/healthz"} {
		if got := probe(t, f.srv, p); got != 200 {
			t.Fatalf("%s: %d at rest", p, got)
		}
	}
	stuck.Store(true)
	u := mustSession(t, f)
	go u.Attr.Set(ctxT(t), "x", 1) // its event is appended and never folded
	took := waitProbe(t, f.srv, "/readyz", 503, 6*time.Second)
	if probe(t, f.srv, "/healthz") != 503 || probe(t, f.srv, "/livez") != 200 {
		t.Fatal("/healthz must follow /readyz, /livez must stay 200")
	}
	t.Logf("unready %s after the projector stopped folding", took)
	stuck.Store(false)
	close(release)
	waitProbe(t, f.srv, "/readyz", 200, 5*time.Second)
}

func TestProbeCommandFollowsReadyz(t *testing.T) {
	s := mustStart(t, nil)
	if code, out := runCmd(t, "probe", "http://"+s.HTTPAddr()+"/readyz"); code != 0 {
		t.Fatalf("probe of a ready instance: exit %d\n%s", code, out)
	}
	if code, _ := runCmd(t, "probe", "http://"+s.HTTPAddr()+"/nope"); code == 0 {
		t.Fatal("probe of a 404 exited 0")
	}
}
