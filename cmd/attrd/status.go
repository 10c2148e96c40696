package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/attrd/attrd/api/natsapi"
	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/projector"
)

// status is what `attrd status` reports: whether the deployment is healthy, and why.
type status struct {
	Healthy    bool              `json:"healthy"`
	Problems   []string          `json:"problems"`
	Instances  []statusInstance  `json:"instances"`
	Partitions []statusPartition `json:"partitions"`
	Streams    []statusStream    `json:"streams"`
	Keys       *statusKeys       `json:"keys,omitempty"`
}

type statusInstance struct {
	ID       string `json:"id"`       // micro's service instance id
	Instance string `json:"instance"` // the name it holds leases by
	Version  string `json:"version"`
	Ready    bool   `json:"ready"`
	Reason   string `json:"reason,omitempty"` // why it is not ready
}

type statusPartition struct {
	Partition int    `json:"partition"`
	Holder    string `json:"holder"`   // "" when nobody holds its lease
	Applied   uint64 `json:"applied"`  // as its projector answers, else its lease says
	LastSeq   uint64 `json:"last_seq"` // the partition's last event in the stream
	Lag       uint64 `json:"lag"`      // its events after Applied (decisions recorded included)
}

type statusStream struct {
	Name      string        `json:"name"`
	Messages  uint64        `json:"messages"`
	Bytes     uint64        `json:"bytes"`
	Replicas  int           `json:"replicas"`
	MaxAge    time.Duration `json:"max_age_ns"`
	MaxBytes  int64         `json:"max_bytes"`
	Duplicate time.Duration `json:"duplicate_window_ns"`
	Leader    string        `json:"leader,omitempty"`
}

type statusKeys struct {
	Primary string   `json:"primary"`
	IDs     []string `json:"ids"`
}

// statusLagBound is the lag over which a partition counts as a problem.
const statusLagBound = 1000

// statusCmd reports the deployment's health: instances (micro discovery), partitions
// (their lease holders and how far they folded), streams (sizes, retention,
// de-duplication) and the key file's ids. Exit status 1 when it is not healthy.
func statusCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	tf := addToolFlags(fs, true)
	asJSON := fs.Bool("json", false, "print JSON, for scripts")
	wait := fs.Duration("discovery-wait", 500*time.Millisecond, "how long to collect the instances' answers to service discovery")
	if err := fs.Parse(args); err != nil {
		return err
	}
	nc, js, err := tf.connect("attrd-status")
	if err != nil {
		return err
	}
	defer nc.Close()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	st, err := readStatus(ctx, nc, js, *wait)
	if err != nil {
		return err
	}
	if keys, err := tf.keys(io.Discard); err == nil && keys != nil {
		st.Keys = &statusKeys{Primary: keys.Primary(), IDs: keys.IDs()}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(st); err != nil {
			return err
		}
	} else {
		printStatus(stdout, st)
	}
	if !st.Healthy {
		return errDifferences // exit 1, the report said why
	}
	return nil
}

// readStatus gathers the deployment's state.
func readStatus(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, wait time.Duration) (*status, error) {
	st := &status{Problems: []string{}}
	evs, err := js.Stream(ctx, events.StreamName)
	if err != nil {
		return nil, fmt.Errorf("the event stream: %w", err)
	}
	bucket := events.DefaultBucket
	kvs, err := js.Stream(ctx, events.KVStream(bucket))
	if err != nil {
		return nil, fmt.Errorf("the projection bucket: %w", err)
	}
	for _, s := range []jetstream.Stream{evs, kvs} {
		info, err := s.Info(ctx)
		if err != nil {
			return nil, err
		}
		ss := statusStream{Name: info.Config.Name, Messages: info.State.Msgs, Bytes: info.State.Bytes, Replicas: info.Config.Replicas,
			MaxAge: info.Config.MaxAge, MaxBytes: info.Config.MaxBytes, Duplicate: info.Config.Duplicates}
		if info.Cluster != nil {
			ss.Leader = info.Cluster.Leader
			if ss.Leader == "" && info.Config.Replicas > 1 {
				st.Problems = append(st.Problems, fmt.Sprintf("stream %s has no leader", ss.Name))
			}
		}
		st.Streams = append(st.Streams, ss)
	}
	layout := events.LayoutOf(evs.CachedInfo().Config)
	for p := range layout.N() {
		sp := statusPartition{Partition: p}
		if m, err := evs.GetLastMsgForSubject(ctx, layout.PartitionSubjects(p)); err == nil {
			sp.LastSeq = m.Sequence
		} else if !errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil, fmt.Errorf("partition %d's last event: %w", p, err)
		}
		rec, held, err := projector.Holder(ctx, kvs, bucket, events.PartitionName(p))
		if err != nil {
			return nil, fmt.Errorf("partition %d's lease: %w", p, err)
		}
		sp.Applied = rec.Applied // as of its holder's last renewal
		if a, err := projector.AskApplied(ctx, nc, bucket, p); err == nil {
			sp.Applied = a // its projector's own word, now
		}
		if held {
			sp.Holder = rec.Owner
		} else {
			st.Problems = append(st.Problems, fmt.Sprintf("partition %d: nobody holds its lease (its writes get no decision)", p))
		}
		if sp.LastSeq > sp.Applied {
			sp.Lag = sp.LastSeq - sp.Applied
			if sp.Lag > statusLagBound {
				st.Problems = append(st.Problems, fmt.Sprintf("partition %d: %d events behind", p, sp.Lag))
			}
		}
		st.Partitions = append(st.Partitions, sp)
	}
	st.Instances, err = discover(ctx, nc, wait)
	if err != nil {
		return nil, err
	}
	if len(st.Instances) == 0 {
		st.Problems = append(st.Problems, "no attrd instance answered service discovery")
	}
	for _, in := range st.Instances {
		if !in.Ready {
			st.Problems = append(st.Problems, fmt.Sprintf("instance %s is not ready: %s", in.Instance, in.Reason))
		}
	}
	st.Healthy = len(st.Problems) == 0
	return st, nil
}

// discover collects the answers of attrd's instances to micro's STATS request: each
// says its version, its name and whether it is ready (natsapi.InstanceStats).
func discover(ctx context.Context, nc *nats.Conn, wait time.Duration) ([]statusInstance, error) {
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil, err
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest("$SRV.STATS.attrd", inbox, nil); err != nil {
		return nil, err
	}
	var out []statusInstance
	deadline := time.Now().Add(wait)
	for {
		m, err := sub.NextMsg(time.Until(deadline))
		if errors.Is(err, nats.ErrTimeout) || errors.Is(err, nats.ErrNoResponders) || ctx.Err() != nil {
			break // the answers are in (no responders: no instance at all)
		}
		if err != nil {
			return nil, err
		}
		var stats micro.Stats
		if json.Unmarshal(m.Data, &stats) != nil {
			continue
		}
		in := statusInstance{ID: stats.ID, Version: stats.Version}
		if len(stats.Endpoints) > 0 {
			var d natsapi.InstanceStats
			if json.Unmarshal(stats.Endpoints[0].Data, &d) == nil {
				in.Instance, in.Ready, in.Reason = d.Instance, d.Ready, d.Reason
			}
		}
		out = append(out, in)
	}
	slices.SortFunc(out, func(a, b statusInstance) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// printStatus writes the report for a person.
func printStatus(w io.Writer, st *status) {
	verdict := "healthy"
	if !st.Healthy {
		verdict = "NOT HEALTHY"
	}
	fmt.Fprintf(w, "attrd: %s\n", verdict)
	for _, p := range st.Problems {
		fmt.Fprintf(w, "  problem: %s\n", p)
	}
	fmt.Fprintf(w, "\ninstances (service discovery): %d\n", len(st.Instances))
	for _, in := range st.Instances {
		ready := "ready"
		if !in.Ready {
			ready = "NOT READY: " + in.Reason
		}
		fmt.Fprintf(w, "  %s (%s)  version %s  %s\n", in.Instance, in.ID, in.Version, ready)
	}
	fmt.Fprintf(w, "\npartitions: %d\n", len(st.Partitions))
	for _, p := range st.Partitions {
		holder := p.Holder
		if holder == "" {
			holder = "(nobody)"
		}
		fmt.Fprintf(w, "  %d  held by %s  applied %d  last event %d  lag %d\n", p.Partition, holder, p.Applied, p.LastSeq, p.Lag)
	}
	fmt.Fprintln(w, "\nstreams:")
	for _, s := range st.Streams {
		age, size := "forever", "no limit"
		if s.MaxAge > 0 {
			age = s.MaxAge.String()
		}
		if s.MaxBytes > 0 {
			size = fmt.Sprintf("%d bytes", s.MaxBytes)
		}
		fmt.Fprintf(w, "  %s  %d messages, %d bytes, R%d, kept %s / %s, de-duplication %s", s.Name, s.Messages, s.Bytes, s.Replicas, age, size, s.Duplicate)
		if s.Leader != "" {
			fmt.Fprintf(w, ", leader %s", s.Leader)
		}
		fmt.Fprintln(w)
	}
	if st.Keys != nil {
		fmt.Fprintf(w, "\nencryption keys (key file): %s; new values sealed with %s\n", strings.Join(st.Keys.IDs, ", "), st.Keys.Primary)
	} else {
		fmt.Fprintln(w, "\nencryption keys: no key file given (--encryption-key-file)")
	}
}
