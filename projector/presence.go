package projector

import (
	"cmp"
	"context"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// presenceSeen is what this instance last learnt of one presence key, and from which
// of the bucket's sequences: its record, or nil once the instance is gone (since
// goneAt).
type presenceSeen struct {
	rec    *events.PresenceRecord
	seq    uint64
	goneAt time.Time
}

// forgetGone is how long a gone instance's key is kept, and read afresh in case it
// comes back (an instance whose key expired while the bucket had no leader renews it
// once it has one): every instance ever started would otherwise be read every TTL/3.
const forgetGone = time.Minute

// watchPresence keeps the list of instances present, oldest first, from two sources:
// the watch of the presence keys, and, every TTL/3, a fresh reading of the keys the
// watch showed (forgetGone). The watch alone can fall behind for seconds: its
// consumer (one replica) lost with a node cut off, a new one waiting for the meta
// group's leader. Partitions handed out by a list that old went where no instance was
// looking for them: after a long outage of the bucket, one instance's watch still
// showed the others settled while their records said they were not, and it waited for
// them to take partitions that they, by their own fresher lists, left to it (issue
// 21). Each key keeps the news of the highest sequence, whichever source brought it,
// so that neither takes the list back.
func (s *Partitions) watchPresence(ctx context.Context, w jetstream.KeyWatcher) {
	seen := map[string]presenceSeen{}
	t := time.NewTicker(s.cfg.LeaseTTL / 3)
	defer t.Stop()
	for {
		changed := false
		select {
		case <-ctx.Done():
			return
		case e := <-w.Updates():
			if e == nil {
				continue // the initial values are all here
			}
			var rec *events.PresenceRecord
			if e.Operation() == jetstream.KeyValuePut {
				var r events.PresenceRecord
				if err := events.Unmarshal(e.Value(), &r); err != nil {
					continue
				}
				rec = &r
			} // a delete, a purge or the server's expiry marker: the instance is gone
			changed = s.learn(seen, e.Key(), rec, e.Revision(), "")
		case <-t.C:
			maps.DeleteFunc(seen, func(_ string, p presenceSeen) bool {
				return p.rec == nil && time.Since(p.goneAt) > forgetGone
			})
			msgs, floor, ok := s.freshPresence(ctx, slices.Collect(maps.Keys(seen)), s.cfg.LeaseTTL/3)
			if !ok {
				continue
			}
			prefix := events.KVSubject(s.cfg.Projector.Bucket, "")
			for subj, m := range msgs {
				var rec *events.PresenceRecord
				var r events.PresenceRecord
				if !lapsed(m, s.cfg.LeaseTTL) && events.Unmarshal(m.Data, &r) == nil {
					rec = &r
				}
				changed = s.learn(seen, strings.TrimPrefix(subj, prefix), rec, m.Sequence, "by a fresh reading") || changed
			}
			for key := range seen {
				if _, ok := msgs[events.KVSubject(s.cfg.Projector.Bucket, key)]; !ok {
					// No message at all: removed before the copy read (it holds floor).
					changed = s.learn(seen, key, nil, floor, "by a fresh reading") || changed
				}
			}
		}
		if changed {
			s.list(seen)
		}
	}
}

// learn notes rec (nil: gone) as presence key's news of sequence seq, unless a later
// one is known; changed says whether the key's record changed (a renewal does not).
func (s *Partitions) learn(seen map[string]presenceSeen, key string, rec *events.PresenceRecord, seq uint64, how string) (changed bool) {
	old, known := seen[key]
	if known && seq <= old.seq {
		return false
	}
	now := presenceSeen{rec: rec, seq: seq}
	if rec == nil {
		now.goneAt = old.goneAt
		if old.rec != nil || !known {
			now.goneAt = time.Now()
		}
	}
	seen[key] = now
	args := []any{}
	if how != "" {
		args = append(args, "how", how)
	}
	switch {
	case rec != nil && (old.rec == nil || *old.rec != *rec):
		if old.rec == nil || old.rec.Instance != rec.Instance {
			s.log.Info("instance present", append([]any{"instance", rec.Instance}, args...)...)
		}
		return true
	case rec == nil && old.rec != nil:
		s.log.Info("instance gone", append([]any{"instance", old.rec.Instance}, args...)...)
		return true
	}
	return false
}

// list sets the lists of instances present from what is seen: partitions go to the
// settled instances, oldest first; to every instance present while none is settled
// (the first to start, or all at once).
func (s *Partitions) list(seen map[string]presenceSeen) {
	var recs []events.PresenceRecord
	for _, p := range seen {
		if p.rec != nil {
			recs = append(recs, *p.rec)
		}
	}
	slices.SortFunc(recs, func(a, b events.PresenceRecord) int {
		if c := cmp.Compare(a.Joined, b.Joined); c != 0 {
			return c
		}
		return cmp.Compare(a.Instance, b.Instance)
	})
	names := make([]string, 0, len(recs))
	for _, r := range recs {
		if !r.Unsettled {
			names = append(names, r.Instance)
		}
	}
	everyone := make([]string, len(recs))
	for i, r := range recs {
		everyone[i] = r.Instance
	}
	if len(names) == 0 {
		names = slices.Clone(everyone)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if slices.Equal(s.present, names) && slices.Equal(s.everyone, everyone) {
		return
	}
	s.present, s.everyone = names, everyone
	close(s.changed)
	s.changed = make(chan struct{})
}

// freshPresence reads the presence keys of keys from a copy of the bucket that holds
// this instance's last presence renewal, made within a lease TTL, waiting at most
// within, and returns the messages by subject and that renewal's sequence; ok is false
// when it cannot (no renewal, or none lately: this instance cut off, where a copy
// holding its last renewal may be its own node's, which shows everyone else lapsed;
// no direct gets; a read that failed). Neither a follower behind nor an old leader back
// from a cut can show a live instance gone in it.
//
// NATS subtlety: the keys are named one by one, with this instance's own as the
// anchor: a multi-last direct get whose subjects overlap (a wildcard over the keys and
// a key it matches) answers the key alone.
func (s *Partitions) freshPresence(ctx context.Context, keys []string, within time.Duration) (msgs map[string]*jetstream.RawStreamMsg, floor uint64, ok bool) {
	floor = s.renewed.Load()
	if floor == 0 || s.snaps == nil || time.Since(time.Unix(0, s.renewedWhen.Load())) > s.cfg.LeaseTTL {
		return nil, 0, false
	}
	subjects := make([]string, len(keys))
	for i, key := range keys {
		subjects[i] = events.KVSubject(s.cfg.Projector.Bucket, key)
	}
	rctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	own := events.KVSubject(s.cfg.Projector.Bucket, events.PresenceKey(s.cfg.Instance))
	msgs, err := s.snaps.Last(rctx, s.kvs.CachedInfo().Config.Name, own, subjects, floor)
	if err != nil {
		s.log.Debug("no fresh reading of the instances present", "err", err)
		return nil, 0, false
	}
	return msgs, floor, true
}

// allGone reports whether every one of instances is gone, by a fresh reading of their
// presence keys (freshPresence). Any doubt (no reading) is "no".
func (s *Partitions) allGone(ctx context.Context, instances []string) bool {
	if len(instances) == 0 {
		return false
	}
	keys := make([]string, len(instances))
	for i, inst := range instances {
		keys[i] = events.PresenceKey(inst)
	}
	msgs, _, ok := s.freshPresence(ctx, keys, s.cfg.LeaseTTL/2)
	if !ok {
		return false
	}
	for _, key := range keys {
		if m := msgs[events.KVSubject(s.cfg.Projector.Bucket, key)]; m != nil && !lapsed(m, s.cfg.LeaseTTL) {
			return false
		}
	}
	return true
}

// orphaned reports whether partition p, assigned to settled instances that are all
// gone, goes to this unsettled instance: every instance left is unsettled (the bucket
// had no leader for a while, so that nobody could renew; not a node back from a cut,
// whose reading would show the others alive), and the partition goes where the list
// of instances will send it once the watch has seen the gone ones leave. s.mu is held,
// and released while the bucket is read.
func (s *Partitions) orphaned(ctx context.Context, p int) bool {
	settled, everyone := slices.Clone(s.present), slices.Clone(s.everyone)
	s.mu.Unlock()
	gone := s.allGone(ctx, settled)
	s.mu.Lock()
	if !gone {
		return false
	}
	if assignee(without(everyone, settled...), p) != s.cfg.Instance {
		return false // another instance left takes it, by this same reading
	}
	s.log.Info("claiming a partition whose settled instances are all gone", "partition", p, "gone", settled)
	return true
}

// renewedAt notes the sequence of a presence renewal acknowledged, and when.
func (s *Partitions) renewedAt(seq uint64) {
	s.renewedWhen.Store(time.Now().UnixNano())
	raiseTo(&s.renewed, seq)
}
