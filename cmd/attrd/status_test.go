package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/attrd/attrd/events"
)

// TestStatusSaysHealthyAndWhy: `attrd status --json` on a running attrd finds the
// instance by service discovery, ready and under its name, its lease on the one partition with what it folded,
// and the streams; the text form says healthy. With the instance gone, status exits 1
// and names what is wrong.
func TestStatusSaysHealthyAndWhy(t *testing.T) {
	f := newFixture(t, nil)
	if err := f.alice.UserByID(f.aliceID).Attr.Set(ctxT(t), "a", 1); err != nil {
		t.Fatal(err)
	}
	url := "--nats-url=" + f.srv.ClientURL()
	code, out := runCmd(t, "status", url, "--json")
	if code != 0 {
		t.Fatalf("status: exit %d\n%s", code, out)
	}
	var st status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if !st.Healthy || len(st.Problems) != 0 {
		t.Fatalf("a running attrd reported unhealthy: %v", st.Problems)
	}
	if len(st.Instances) != 1 || st.Instances[0].Version == "" || st.Instances[0].Instance != f.srv.instance || !st.Instances[0].Ready {
		t.Fatalf("instances %+v, want the one running (%s), ready", st.Instances, f.srv.instance)
	}
	if len(st.Partitions) != 1 || st.Partitions[0].Holder != f.srv.instance || st.Partitions[0].Applied == 0 {
		t.Fatalf("partitions %+v, want partition 0 held by %s with events folded", st.Partitions, f.srv.instance)
	}
	names := map[string]bool{}
	for _, s := range st.Streams {
		names[s.Name] = true
	}
	if !names[events.StreamName] || !names[events.KVStream(events.DefaultBucket)] || st.Streams[0].Messages == 0 {
		t.Fatalf("streams %+v, want the event stream with events and the bucket", st.Streams)
	}
	code, out = runCmd(t, "status", url)
	if code != 0 || !strings.Contains(out, "attrd: healthy") {
		t.Fatalf("status: exit %d\n%s", code, out)
	}

	// The instance's service stops answering and its projector lets the lease go.
	if err := f.srv.natsAPI.Stop(); err != nil {
		t.Fatal(err)
	}
	f.srv.prjCancel()
	<-f.srv.prjDone
	code, out = runCmd(t, "status", url)
	if code != 1 || !strings.Contains(out, "NOT HEALTHY") || !strings.Contains(out, "nobody holds its lease") ||
		!strings.Contains(out, "no attrd instance answered") {
		t.Fatalf("status with no instance: exit %d\n%s", code, out)
	}
}
