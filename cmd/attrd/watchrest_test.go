package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/events"
)

// sseEvent is one Server-Sent Event as a browser would see it: its type, the last
// event id after it (ids of comments included), its data.
type sseEvent struct {
	Type string
	ID   string
	Data map[string]any
}

// sseStream reads a text/event-stream response into events.
type sseStream struct {
	resp   *http.Response
	events chan sseEvent
	cancel context.CancelFunc
}

// openSSE opens path (with query) on s with the headers; it fails the test unless the
// answer is a 200 event stream.
func openSSE(t *testing.T, s *Server, path string, hdr map[string]string) *sseStream {
	t.Helper()
	return openSSEBuffer(t, s, path, hdr, 1024)
}

// openSSEBuffer is openSSE with room for buffer events read and not yet taken.
func openSSEBuffer(t *testing.T, s *Server, path string, hdr map[string]string, buffer int) *sseStream {
	t.Helper()
	st, status, body := trySSE(t, s, path, hdr, buffer)
	if st == nil {
		t.Fatalf("GET %s: %d %v", path, status, body)
	}
	return st
}

// trySSE opens an event stream, or returns the error answer's status and body.
func trySSE(t *testing.T, s *Server, path string, hdr map[string]string, buffer ...int) (*sseStream, int, map[string]any) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+s.HTTPAddr()+path, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("GET %s: %v", path, err)
	}
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		defer cancel()
		defer resp.Body.Close()
		var body map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&body)
		return nil, resp.StatusCode, body
	}
	st := &sseStream{resp: resp, events: make(chan sseEvent, append(buffer, 1024)[0]), cancel: cancel}
	t.Cleanup(st.close)
	go func() {
		defer close(st.events)
		sc := bufio.NewScanner(resp.Body)
		var ev sseEvent
		id := ""
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				ev.ID = id
				if ev.Type != "" {
					st.events <- ev
				}
				ev = sseEvent{}
			case strings.HasPrefix(line, "event: "):
				ev.Type = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "id: "):
				id = strings.TrimPrefix(line, "id: ")
			case strings.HasPrefix(line, "data: "):
				_ = json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &ev.Data)
			}
		}
	}()
	return st, 200, nil
}

func (st *sseStream) close() { st.cancel(); st.resp.Body.Close() }

// next returns the next event of a type other than skip's.
func (st *sseStream) next(t *testing.T, skip ...string) sseEvent {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case ev, ok := <-st.events:
			if !ok {
				t.Fatal("the stream closed")
			}
			if strings.Contains(strings.Join(skip, ","), ev.Type) {
				continue
			}
			return ev
		case <-timeout:
			t.Fatal("no event within 5 s")
		}
	}
}

// sseChange describes a change event as describe does a client.Change.
func sseChange(ev sseEvent) string {
	s := fmt.Sprint(ev.Data["op"])
	attrs, _ := ev.Data["attrs"].([]any)
	for _, a := range attrs {
		m := a.(map[string]any)
		v := "-"
		if m["found"] == true {
			b, _ := json.Marshal(m["value"])
			v = string(b)
		}
		s += " " + fmt.Sprint(m["name"]) + "=" + v
	}
	return s
}

func TestAWatchOverServerSentEventsSeesChangesAndResumesFromLastEventID(t *testing.T) {
	f := newFixture(t, nil)
	ust := restLogin(t, f.srv, "alice", "alice-pw")
	bearer := map[string]string{"Authorization": "Bearer " + ust}
	put := func(name string, value any) {
		t.Helper()
		st, _, b := httpDo(t, f.srv, "PUT", "/zato/sso/user/attr", map[string]any{"current_app": "CRM", "ust": ust, "name": name, "value": value}, nil)
		ok(t, st, b)
	}
	st := openSSE(t, f.srv, "/zato/sso/user/attr/watch?current_app=CRM", bearer)
	ready := st.next(t)
	if ready.Type != "ready" || ready.Data["status"] != "ok" || ready.ID == "" {
		t.Fatalf("first event: %+v", ready)
	}
	put("color", "red")
	put("size", 3)
	var last sseEvent
	for _, want := range []string{`set color="red"`, `set size=3`} {
		last = st.next(t)
		if last.Type != "change" || sseChange(last) != want || last.ID != fmt.Sprint(last.Data["seq"]) {
			t.Fatalf("want change %s with its sequence as id, got %+v", want, last)
		}
	}
	st.close()
	put("color", "blue") // while disconnected
	st2 := openSSE(t, f.srv, "/zato/sso/user/attr/watch?current_app=CRM&name=color", map[string]string{
		"Authorization": "Bearer " + ust, "Last-Event-ID": last.ID})
	if ev := st2.next(t); ev.Type != "ready" || ev.ID != last.ID {
		t.Fatalf("a resumed stream starts at its Last-Event-ID: %+v", ev)
	}
	if ev := st2.next(t); sseChange(ev) != `set color="blue"` {
		t.Fatalf("the change made while disconnected: %+v", ev)
	}
	put("size", 4) // not watched by name
	put("color", "green")
	if ev := st2.next(t); sseChange(ev) != `set color="green"` {
		t.Fatalf("after it: %+v", ev)
	}
}

func TestABrowserWatchesWithATicketAndNoTokenInTheURL(t *testing.T) {
	f := newFixture(t, nil)
	ust := restLogin(t, f.srv, "alice", "alice-pw")
	status, _, b := httpDo(t, f.srv, "POST", "/attrd/watch/ticket", map[string]any{"current_app": "CRM"}, map[string]string{"Authorization": "Bearer " + ust})
	ok(t, status, b)
	ticket, _ := b["ticket"].(string)
	if ticket == "" || strings.Contains(ticket, ust) || b["expires_in"] != float64(api.TicketTTL/time.Second) {
		t.Fatalf("ticket answer: %v", b)
	}
	// The key that seals tickets is kept sealed with the key file's: a copy of the
	// bucket opens no ticket.
	if e, err := mustKV(t, f.srv).Get(ctxT(t), events.TicketKeyKey); err != nil || len(e.Value()) == 32 {
		t.Errorf("the ticket key in the bucket: %v, %d bytes", err, len(e.Value()))
	}
	path := "/zato/sso/user/attr/watch?current_app=CRM&ticket=" + url.QueryEscape(ticket)
	st := openSSE(t, f.srv, path, nil)
	st.next(t)
	st2, _, b := httpDo(t, f.srv, "PUT", "/zato/sso/user/attr", map[string]any{"current_app": "CRM", "ust": ust, "name": "n", "value": 1}, nil)
	ok(t, st2, b)
	if ev := st.next(t); sseChange(ev) != "set n=1" {
		t.Fatalf("with a ticket: %+v", ev)
	}
	// The same ticket opens a second stream (an EventSource reconnecting), not a
	// session watch, and not once the session has ended.
	openSSE(t, f.srv, path, nil).next(t)
	if _, code, body := trySSE(t, f.srv, "/zato/sso/session/attr/watch?current_app=CRM&ticket="+url.QueryEscape(ticket), nil); code != 403 || subStatus(body) != "E007001" {
		t.Errorf("a user watch's ticket on the session route: %d %v", code, body)
	}
	bad := ticket[:len(ticket)-2] + "AA"
	if _, code, body := trySSE(t, f.srv, "/zato/sso/user/attr/watch?current_app=CRM&ticket="+bad, nil); code != 403 || subStatus(body) != "E007001" {
		t.Errorf("a forged ticket: %d %v", code, body)
	}
	status, _, b = httpDo(t, f.srv, "POST", "/zato/sso/user/logout", map[string]any{"current_app": "CRM", "ust": ust}, nil)
	ok(t, status, b)
	if ev := st.next(t); ev.Type != "end" || ev.Data["reason"] != api.EndSessionEnded {
		t.Errorf("a logout ends the stream: %+v", ev)
	}
	if _, code, body := trySSE(t, f.srv, path, nil); code != 403 || subStatus(body) != "E007001" {
		t.Errorf("a ticket of an ended session: %d %v", code, body)
	}
}

func TestASessionWatchOverServerSentEvents(t *testing.T) {
	f := newFixture(t, nil)
	ust := restLogin(t, f.srv, "alice", "alice-pw")
	q := "/zato/sso/session/attr/watch?current_app=CRM&target_ust=" + url.QueryEscape(ust)
	st := openSSE(t, f.srv, q, map[string]string{"Authorization": "Bearer " + ust})
	st.next(t)
	status, _, b := httpDo(t, f.srv, "POST", "/zato/sso/session/attr", map[string]any{"current_app": "CRM", "current_ust": ust, "target_ust": ust, "name": "cart", "value": []int{1}}, nil)
	ok(t, status, b)
	if ev := st.next(t); sseChange(ev) != "create cart=[1]" {
		t.Fatalf("a session attribute's change: %+v", ev)
	}
}

func TestASlowWatcherIsCutOffWithWhereToResumeAndSlowsNobody(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.Watch = api.WatchConfig{Buffer: 8} })
	ctx := ctxT(t)
	ust := restLogin(t, f.srv, "alice", "alice-pw")
	_, fast := aliceWatches(t, f, nil)
	slow := openSSEBuffer(t, f.srv, "/zato/sso/user/attr/watch?current_app=CRM", map[string]string{"Authorization": "Bearer " + ust}, 0)
	// slow's events pile up unread: its reader goroutine blocks on a full channel, and
	// then the connection's buffers fill.
	u, _ := f.alice.User(ctx)
	big := strings.Repeat("x", 60_000)
	var seqs []uint64
	for i := 0; i < 600 && f.srv.svc.Watches() == 2; i++ {
		if err := u.Attr.Set(ctx, "big", fmt.Sprint(i, big)); err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, nextChange(t, fast).Seq) // the other watcher keeps up
	}
	if f.srv.svc.Watches() != 1 {
		t.Fatalf("the slow watch was not cut off after %d changes", len(seqs))
	}
	// Writes went on while it was cut off, and the fast watcher saw them all.
	for range 3 {
		if err := u.Attr.Set(ctx, "big", "small"); err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, nextChange(t, fast).Seq)
	}
	// The slow reader reads at last: the changes it was sent, then where to resume.
	got := map[uint64]bool{}
	var end sseEvent
	for end.Type != "end" {
		ev := slow.next(t, "ready")
		if ev.Type == "change" {
			got[uint64(ev.Data["seq"].(float64))] = true
		}
		end = ev
	}
	if end.Data["reason"] != api.EndSlow {
		t.Fatalf("the slow watch ended with %v", end.Data)
	}
	resumed := openSSE(t, f.srv, "/zato/sso/user/attr/watch?current_app=CRM", map[string]string{"Authorization": "Bearer " + ust, "Last-Event-ID": end.ID})
	resumed.next(t)
	for len(got) < len(seqs) {
		ev := resumed.next(t)
		seq := uint64(ev.Data["seq"].(float64))
		if got[seq] {
			t.Fatalf("change %d came twice", seq)
		}
		got[seq] = true
	}
	for _, s := range seqs {
		if !got[s] {
			t.Fatalf("change %d was lost", s)
		}
	}
}

func TestOverServerSentEventsAWatchIsAllowedAsAGetAndEndsWithItsUser(t *testing.T) {
	f := newFixture(t, nil)
	alice := restLogin(t, f.srv, "alice", "alice-pw")
	admin := restLogin(t, f.srv, "admin", adminPassword)
	if _, code, body := trySSE(t, f.srv, "/zato/sso/user/attr/watch?current_app=CRM&user_id="+f.adminID,
		map[string]string{"Authorization": "Bearer " + alice}); code != 403 || subStatus(body) != "E005001" {
		t.Errorf("alice watching the admin's attributes: %d %v", code, body)
	}
	if _, code, body := trySSE(t, f.srv, "/zato/sso/user/attr/watch?current_app=CRM", nil); code != 400 {
		t.Errorf("no token: %d %v", code, body)
	}
	st := openSSE(t, f.srv, "/zato/sso/user/attr/watch?current_app=CRM&user_id="+f.aliceID, map[string]string{"Authorization": "Bearer " + admin})
	st.next(t)
	status, _, b := httpDo(t, f.srv, "DELETE", "/zato/sso/user", map[string]any{"current_app": "CRM", "ust": admin, "user_id": f.aliceID}, nil)
	ok(t, status, b)
	if ev := st.next(t); ev.Type != "end" || ev.Data["reason"] != "user_deleted" {
		t.Fatalf("a deleted user's watch: %+v", ev)
	}
}
