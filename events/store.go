package events

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// StoreConfig names and sizes the event stream and the projection bucket.
type StoreConfig struct {
	// Bucket is the projection's KV bucket (stream KV_<Bucket>). Replay builds into
	// another bucket name.
	Bucket string
	// Replicas is 1 on the embedded server and 3 on a cluster.
	Replicas int
	// ChangeReplicas lets EnsureStore change the replicas of an existing stream or
	// bucket; without it a mismatch is refused (an operator asked for it explicitly).
	ChangeReplicas bool
	// DedupWindow is how long a request id is remembered (the stream's Duplicates).
	DedupWindow time.Duration
	// MaxAge and MaxBytes bound the history; 0 keeps everything.
	MaxAge   time.Duration
	MaxBytes int64
	// Partitions is the number of partitions of a new deployment; an existing one keeps
	// its own, and a different number given here is refused (ErrPartitionsMismatch).
	// 0: DefaultPartitions for a new deployment, whatever an existing one has.
	Partitions int
}

// DefaultPartitions is the number of partitions of a new deployment unless chosen.
const DefaultPartitions = 1

// ErrPartitionsMismatch refuses to start with another number of partitions than the
// deployment was created with: every user's events would move to another partition.
var ErrPartitionsMismatch = errors.New("partitions differ from the deployment's")

// DefaultBucket is the projection bucket's name.
const DefaultBucket = "attrd"

// ThrottleBucket holds failed-login counters (login throttling): operational state of
// the API, not the projection, shared by every instance and kept across restarts.
const ThrottleBucket = "attrd_throttle"

// ThrottleConfig is the throttle bucket's configuration: a counter not touched for an
// hour is forgotten.
func (c StoreConfig) ThrottleConfig() jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{Bucket: ThrottleBucket, Description: "attrd failed-login counters", History: 1,
		TTL: time.Hour, Storage: jetstream.FileStorage, Replicas: max(c.Replicas, 1)}
}

// DefaultStoreConfig is the embedded default.
func DefaultStoreConfig() StoreConfig {
	return StoreConfig{Bucket: DefaultBucket, Replicas: 1, DedupWindow: 2 * time.Minute}
}

// StreamConfig returns the event stream's configuration, for a deployment of
// c.Partitions partitions.
func (c StoreConfig) StreamConfig() jetstream.StreamConfig {
	sc := jetstream.StreamConfig{
		Name:        StreamName,
		Description: "attrd event log: every accepted write request, the audit history",
		Subjects:    []string{EventsPrefix + ".>"},
		Storage:     jetstream.FileStorage,
		Replicas:    max(c.Replicas, 1),
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		MaxAge:      c.MaxAge,
		MaxBytes:    -1,
		MaxMsgs:     -1,
		Duplicates:  c.DedupWindow,
		DenyDelete:  true,
		DenyPurge:   false,
		// A projector run that cannot create a consumer (the meta group without a
		// leader) reads its partition's log with direct gets (projector/tail.go).
		AllowDirect: true,
	}
	if c.MaxBytes > 0 {
		sc.MaxBytes = c.MaxBytes
	}
	if c.Partitions > 1 {
		// A stream without it has one partition: every stream made before partitions.
		sc.Metadata = map[string]string{MetadataPartitions: strconv.Itoa(c.Partitions)}
	}
	if c.MaxAge > 0 && c.DedupWindow > c.MaxAge {
		sc.Duplicates = c.MaxAge // the server refuses a window longer than the history
	}
	return sc
}

// BucketConfig returns the projection bucket's configuration. History 1: an expired
// latest value must not expose an older revision, and the audit history is the event
// stream, not KV history. LimitMarkerTTL turns on per-message TTL (Nats-TTL) for the
// bucket; it is also how long the server's expiry markers stay.
func (c StoreConfig) BucketConfig() jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{
		Bucket:         c.Bucket,
		Description:    "attrd projection: users, sessions, attributes, decisions",
		History:        1,
		Storage:        jetstream.FileStorage,
		Replicas:       max(c.Replicas, 1),
		LimitMarkerTTL: 5 * time.Minute,
	}
}

// ErrReplicasMismatch refuses to change the replicas of an existing stream silently.
var ErrReplicasMismatch = errors.New("replicas differ from the existing stream's")

// EnsureStore creates the event stream and the projection bucket if they are missing,
// and updates their changeable settings if they exist.
func EnsureStore(ctx context.Context, js jetstream.JetStream, c StoreConfig) (jetstream.Stream, jetstream.KeyValue, error) {
	if c.Bucket == "" {
		c.Bucket = DefaultBucket
	}
	existing, err := js.Stream(ctx, StreamName)
	switch {
	case err == nil:
		have := LayoutOf(existing.CachedInfo().Config).N()
		if c.Partitions != 0 && c.Partitions != have {
			return nil, nil, fmt.Errorf("%w: the deployment was created with %d, not %d: start it with --partitions %d (or none)",
				ErrPartitionsMismatch, have, c.Partitions, have)
		}
		c.Partitions = have
	case errors.Is(err, jetstream.ErrStreamNotFound):
		if c.Partitions == 0 {
			c.Partitions = DefaultPartitions
		}
	default:
		return nil, nil, fmt.Errorf("stream %s: %w", StreamName, err)
	}
	if !c.ChangeReplicas {
		for _, name := range []string{StreamName, KVStream(c.Bucket)} {
			st, err := js.Stream(ctx, name)
			if errors.Is(err, jetstream.ErrStreamNotFound) {
				continue
			}
			if err != nil {
				return nil, nil, fmt.Errorf("stream %s: %w", name, err)
			}
			if have := st.CachedInfo().Config.Replicas; have != max(c.Replicas, 1) {
				return nil, nil, fmt.Errorf("%w: stream %s has %d, not %d: give --replicas %d explicitly to change it, or --replicas %d to keep it",
					ErrReplicasMismatch, name, have, max(c.Replicas, 1), max(c.Replicas, 1), have)
			}
		}
	}
	st, err := js.CreateOrUpdateStream(ctx, c.StreamConfig())
	if err != nil {
		return nil, nil, fmt.Errorf("ensure stream %s: %w", StreamName, err)
	}
	kv, err := EnsureBucket(ctx, js, c)
	if err != nil {
		return nil, nil, err
	}
	if _, err := js.CreateOrUpdateKeyValue(ctx, c.ThrottleConfig()); err != nil {
		return nil, nil, fmt.Errorf("ensure bucket %s: %w", ThrottleBucket, err)
	}
	// An existing data keys bucket is left as it is: a KV config update would turn
	// direct gets on again, and its reads go to the leader (below).
	if _, err := js.Stream(ctx, KVStream(DataKeysBucket)); errors.Is(err, jetstream.ErrStreamNotFound) {
		if _, err := js.CreateStream(ctx, c.DataKeysConfig()); err != nil && !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return nil, nil, fmt.Errorf("ensure bucket %s: %w", DataKeysBucket, err)
		}
	} else if err != nil {
		return nil, nil, fmt.Errorf("bucket %s: %w", DataKeysBucket, err)
	}
	if c.Replicas > 1 {
		// A data key made on one instance and read on another through a replica that
		// is behind would read as destroyed: its reads go to the leader.
		dst, err := js.Stream(ctx, KVStream(DataKeysBucket))
		if err != nil {
			return nil, nil, err
		}
		if err := directGets(ctx, js, dst, false); err != nil {
			return nil, nil, fmt.Errorf("bucket %s: read from the leader: %w", DataKeysBucket, err)
		}
	}
	return st, kv, nil
}

// EnsureBucket creates or updates the projection bucket. Its stream allows direct
// gets, replicated or not: the projector reads its keys with them, each answer checked
// against how far the answering copy goes (events/leaderread Snapshots); every other
// read of the bucket that must not be behind goes to the stream's leader, never through
// kv.Get (which takes a direct get's answer from any replica).
func EnsureBucket(ctx context.Context, js jetstream.JetStream, c StoreConfig) (jetstream.KeyValue, error) {
	st, err := js.Stream(ctx, KVStream(c.Bucket))
	if err == nil && c.Replicas > 1 && (!c.ChangeReplicas || st.CachedInfo().Config.Replicas == c.Replicas) {
		// An existing replicated bucket keeps its settings; direct gets, which attrd
		// before 2026-12 turned off, are turned on.
		if err := directGets(ctx, js, st, true); err != nil {
			return nil, fmt.Errorf("bucket %s: allow direct gets: %w", c.Bucket, err)
		}
		return js.KeyValue(ctx, c.Bucket)
	}
	if err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("bucket %s: %w", c.Bucket, err)
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, c.BucketConfig())
	if err != nil {
		if errors.Is(err, jetstream.ErrLimitMarkerTTLNotSupported) {
			return nil, fmt.Errorf("bucket %s: the NATS server must be 2.11 or newer (per-key TTL): %w", c.Bucket, err)
		}
		return nil, fmt.Errorf("ensure bucket %s: %w", c.Bucket, err)
	}
	return kv, nil
}

// directGets turns a stream's direct gets on or off (off: its leader answers every
// read), unless they are so already.
func directGets(ctx context.Context, js jetstream.JetStream, st jetstream.Stream, on bool) error {
	cfg := st.CachedInfo().Config
	if cfg.AllowDirect == on {
		return nil
	}
	cfg.AllowDirect = on
	_, err := js.UpdateStream(ctx, cfg)
	return err
}

// KVStream is the name of the stream behind a bucket.
func KVStream(bucket string) string { return "KV_" + bucket }

// KVSubject is the subject of a key in a bucket. The projector publishes to it directly:
// KV Update and Put cannot carry a per-message TTL and would drop one.
func KVSubject(bucket, key string) string { return "$KV." + bucket + "." + key }

// AwaitAcks waits for every publish in futs to be acknowledged; the first error wins.
func AwaitAcks(ctx context.Context, futs []jetstream.PubAckFuture) error {
	for _, f := range futs {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
