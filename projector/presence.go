package projector

import (
	"context"
	"slices"
	"time"

	"github.com/attrd/attrd/events"
)

// allGone reports whether every one of instances is gone, by a fresh reading of their
// presence keys: from a copy of the bucket that holds this instance's last presence
// renewal (events/leaderread Snapshots), made within a lease TTL, so that neither a
// follower behind nor an old leader back from a cut can show a live instance gone. Any doubt (no renewal yet, the
// bucket serving no direct gets, a read that fails) is "no".
func (s *Partitions) allGone(ctx context.Context, instances []string) bool {
	floor := s.renewed.Load()
	if floor == 0 || s.snaps == nil || len(instances) == 0 || time.Since(time.Unix(0, s.renewedWhen.Load())) > s.cfg.LeaseTTL {
		// No renewal, or none lately (this instance cut off: a copy holding its last
		// renewal may be its own node's, which shows everyone else lapsed).
		return false
	}
	subjects := make([]string, len(instances))
	for i, inst := range instances {
		subjects[i] = events.KVSubject(s.cfg.Projector.Bucket, events.PresenceKey(inst))
	}
	rctx, cancel := context.WithTimeout(ctx, s.cfg.LeaseTTL/2)
	defer cancel()
	own := events.KVSubject(s.cfg.Projector.Bucket, events.PresenceKey(s.cfg.Instance))
	msgs, err := s.snaps.Last(rctx, s.kvs.CachedInfo().Config.Name, own, subjects, floor)
	if err != nil {
		return false
	}
	for _, subj := range subjects {
		if m := msgs[subj]; m != nil && !lapsed(m, s.cfg.LeaseTTL) {
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
