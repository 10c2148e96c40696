package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

// chromium returns the headless browser's binary, or skips: Debian's chromium
// package (.ci/run installs it when missing).
func chromium(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("no chromium: apt-get install chromium")
	return ""
}

// TestABrowserWatchesAndResumesAfterADroppedConnection runs testdata/watch.html in
// headless Chromium: it logs in, takes a ticket, watches with an EventSource, sees
// another client's change within a second, and, after the test drops its connection,
// resumes with the changes made meanwhile, none missed and none twice.
func TestABrowserWatchesAndResumesAfterADroppedConnection(t *testing.T) {
	bin := chromium(t)
	f := newFixture(t, nil)
	target, _ := url.Parse("http://" + f.srv.HTTPAddr())
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.FlushInterval = -1 // events pass at once
	page, err := os.ReadFile("testdata/watch.html")
	if err != nil {
		t.Fatal(err)
	}
	reports := make(chan []string, 1000)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(page)
	})
	mux.HandleFunc("POST /report", func(w http.ResponseWriter, r *http.Request) {
		var seen []string
		if json.NewDecoder(r.Body).Decode(&seen) == nil {
			reports <- seen
		}
	})
	mux.Handle("/", proxy) // the REST API, same origin as the page
	srv := httptest.NewServer(mux)
	defer srv.Close()
	browser := exec.Command(bin, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
		"--disable-dev-shm-usage", "--user-data-dir="+t.TempDir(), srv.URL+"/?u=alice&p=alice-pw")
	if err := browser.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = browser.Process.Kill(); _ = browser.Wait() }()

	var seen []string
	waitSeen := func(what string, cond func([]string) bool) time.Time {
		t.Helper()
		timeout := time.After(30 * time.Second)
		for !cond(seen) {
			select {
			case seen = <-reports:
			case <-timeout:
				t.Fatalf("the page did not see %s; it saw %q", what, seen)
			}
		}
		return time.Now()
	}
	has := func(s string) func([]string) bool {
		return func(seen []string) bool {
			return slices.ContainsFunc(seen, func(l string) bool { return strings.HasSuffix(l, s) })
		}
	}
	waitSeen("its watch ready", func(seen []string) bool { return len(seen) > 0 && strings.HasPrefix(seen[0], "ready") })

	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	if err := u.Attr.Set(ctx, "color", "red"); err != nil {
		t.Fatal(err)
	}
	acked := time.Now()
	if took := waitSeen("red", has(` set color="red"`)).Sub(acked); took > time.Second {
		t.Errorf("the browser saw the change %s after its ok, bound 1 s", took)
	} else {
		t.Logf("the browser saw the change %s after its ok", took.Round(time.Millisecond))
	}

	srv.CloseClientConnections() // the browser's stream (and any request) is cut
	for _, v := range []string{"green", "blue"} {
		if err := u.Attr.Set(ctx, "color", v); err != nil {
			t.Fatal(err)
		}
	}
	if err := u.Attr.Set(ctx, "size", 2); err != nil {
		t.Fatal(err)
	}
	waitSeen("the changes made while cut off", has(" set size=2"))
	var changes []string
	for _, l := range seen {
		if l != "error" && !strings.HasPrefix(l, "ready") {
			changes = append(changes, l[strings.Index(l, " ")+1:])
		}
	}
	want := []string{`set color="red"`, `set color="green"`, `set color="blue"`, `set size=2`}
	if !slices.Equal(changes, want) {
		t.Fatalf("the page saw %q, want %q (all it saw: %q)", changes, want, seen)
	}
	if !slices.Contains(seen, "error") {
		t.Errorf("the connection was not dropped: %q", seen)
	}
}
