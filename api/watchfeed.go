package api

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// Where a watch's changes come from. Every partition's projector announces each chunk
// it has landed on the feed (events.Feed, projector/feed.go): its changes, made from
// the same fold that decided them, in log order, once the keys are in the bucket — so
// a watcher sees exactly the accepted changes, after a read would. The feed is core
// NATS: a lost announcement, or one too large to carry its changes, shows as a gap
// (its Prev beyond the last this instance saw), and the watches it concerns take what
// they missed from the log (the user's events folded as history folds them) before
// the feed's changes again. A watch resuming from an older position does the same.

// feedPart is what this instance knows of a partition's feed: the last sequence
// announced, and how many watches follow it.
type feedPart struct {
	last     uint64
	watching int
}

// follow subscribes to the feed. One subscription: announcements are handled one at
// a time, in the order each projector sent them (one connection each).
func (h *watchHub) follow(nc *nats.Conn) (*nats.Subscription, error) {
	sub, err := nc.Subscribe(events.FeedSubjects, h.onFeed)
	if err != nil {
		return nil, err
	}
	// No bound on what waits: a dropped announcement would cost every watch of its
	// partition a read of the log.
	return sub, sub.SetPendingLimits(-1, -1)
}

// position0 returns the position a new watch of partition p starts at: the last
// announcement seen, or, before any, how far the partition is folded (its lease).
func (h *watchHub) position0(ctx context.Context, p int) (uint64, error) {
	h.mu.Lock()
	part := h.parts[p]
	h.mu.Unlock()
	if part != nil {
		return part.last, nil
	}
	applied, err := h.s.folded(ctx, events.PartitionName(p))
	if err != nil {
		return 0, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.parts[p] == nil {
		h.parts[p] = &feedPart{last: applied}
	}
	return h.parts[p].last, nil
}

func (h *watchHub) onFeed(m *nats.Msg) {
	// The changes are decoded only for a partition that has watches: the head (the
	// sequences) is all an instance without any needs.
	var head struct {
		Partition int    `msgpack:"p"`
		Prev      uint64 `msgpack:"prev"`
		Last      uint64 `msgpack:"last"`
		Partial   bool   `msgpack:"partial,omitempty"`
	}
	if err := events.Unmarshal(m.Data, &head); err != nil {
		h.s.log.Warn("feed: an unreadable announcement", "subject", m.Subject, "err", err)
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	part := h.parts[head.Partition]
	if part == nil {
		part = &feedPart{last: head.Prev}
		h.parts[head.Partition] = part
	}
	if h.interest[head.Partition] == 0 {
		part.last = max(part.last, head.Last)
		return
	}
	var f events.Feed
	if err := events.Unmarshal(m.Data, &f); err != nil {
		h.s.log.Warn("feed: an unreadable announcement", "subject", m.Subject, "err", err)
		return
	}
	gapTo := uint64(0)
	if f.Prev > part.last {
		gapTo = f.Prev // announcements after part.last were missed
	}
	if f.Partial {
		gapTo = max(gapTo, f.Last) // this one's changes were left out
	}
	if gapTo > 0 && part.watching > 0 {
		h.gapLocked(f.Partition, part.last, gapTo)
	}
	for i := range f.Changes {
		h.dispatchLocked(&shared{Change: &f.Changes[i]})
	}
	part.last = max(part.last, f.Last)
}

// dispatchLocked hands a change to the watches it concerns, or ends them.
func (h *watchHub) dispatchLocked(c *shared) {
	switch c.Type {
	case events.UserDeleted:
		// Copies: ending a watch takes it out of the indexes.
		for _, w := range slices.Concat(h.byTarget[c.UserID], h.byCaller[c.UserID]) {
			h.endLocked(w, EndUserDeleted, true)
		}
		return
	case events.SessionEnded:
		for _, w := range slices.Clone(h.bySession[c.SessionID]) {
			h.endLocked(w, EndSessionEnded, true)
		}
		return
	case events.SessionRenewed:
		for _, w := range h.bySession[c.SessionID] {
			if w.csid == c.SessionID {
				w.callerEnds.Store(c.ExpiresAt)
			}
			if w.sid == c.SessionID {
				w.targetEnds.Store(c.ExpiresAt)
			}
			select {
			case w.wake <- struct{}{}:
			default:
			}
		}
		return
	}
	for _, w := range slices.Clone(h.byTarget[c.UserID]) {
		if w.sid != c.SessionID || c.Seq <= w.pushed || !w.wants(c.Change) {
			continue
		}
		if w.catching {
			if len(w.pending) >= 4*cap(w.out) {
				h.endLocked(w, EndSlow, false)
				continue
			}
			w.pending = append(w.pending, c)
			continue
		}
		select {
		case w.out <- c:
			w.pushed = c.Seq
		default:
			h.endLocked(w, EndSlow, false) // never wait: the feed serves every watch
		}
	}
}

// wants reports whether a change names an attribute the watch follows.
func (w *Watch) wants(c *events.Change) bool {
	if w.names == nil {
		return true
	}
	for _, a := range c.Attrs {
		if w.names[a.Name] {
			return true
		}
	}
	return false
}

// gapLocked starts reading the log for partition p's events after `from` up to `to`,
// which the feed did not bring, for every watch of the partition.
func (h *watchHub) gapLocked(p int, from, to uint64) {
	var ws []*Watch
	for _, w := range h.byID {
		if w.part != p {
			continue
		}
		if w.catching {
			w.regap = max(w.regap, to) // its reader covers this too before it hands over
			continue
		}
		w.catching = true
		ws = append(ws, w)
	}
	if len(ws) > 0 {
		go h.fillGap(p, from, to, ws)
	}
}

// fillGap hands each watch what the gap held for it: the users with events in it
// are found from the log's subjects (headers only), and only their histories are
// folded.
func (h *watchHub) fillGap(p int, from, to uint64, ws []*Watch) {
	ctx, cancel := context.WithTimeout(context.Background(), h.s.cfg.HistoryTimeout)
	defer cancel()
	var users map[string]bool
	err := retryUnavailable(ctx, func() (err error) {
		users, err = h.s.usersBetween(ctx, p, from, to)
		return err
	})
	for _, w := range ws {
		switch {
		case err != nil:
			h.s.log.Warn("watch: the log could not be read for a gap in the feed", "partition", p, "from", from, "to", to, "err", err)
			h.end(w, EndUnavailable, false)
		case users[w.uid]:
			go h.resume(w, w.pushedNow(), to)
		default:
			go h.handOver(context.Background(), w, to)
		}
	}
}

// pushedNow reads w.pushed.
func (w *Watch) pushedNow() uint64 {
	w.hub.mu.Lock()
	defer w.hub.mu.Unlock()
	return w.pushed
}

// resume hands w the changes of its target after `from` up to `to` from the log, then
// what the feed brought meanwhile. It runs on its own goroutine, w.catching set.
func (h *watchHub) resume(w *Watch, from, to uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), h.s.cfg.HistoryTimeout)
	defer cancel()
	go func() {
		select {
		case <-w.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	for {
		if reason, err := h.fromLog(ctx, w, from, to); err != nil {
			if reason != EndResumeImpossible {
				h.s.log.Warn("watch: the log could not be read", "watch", w.ID, "after", from, "err", err)
			}
			h.end(w, reason, false)
			return
		}
		h.mu.Lock()
		again := w.regap > to
		if again {
			from, to = to, w.regap
		}
		h.mu.Unlock()
		if !again {
			break
		}
	}
	h.handOver(ctx, w, to)
}

// handOver ends w's reading of the log at `to`: what the feed brought meanwhile goes
// out, then the feed hands changes to it directly again.
func (h *watchHub) handOver(ctx context.Context, w *Watch, to uint64) {
	h.mu.Lock()
	w.pushed = max(w.pushed, to)
	h.mu.Unlock()
	for {
		h.mu.Lock()
		batch := w.pending
		w.pending = nil
		if len(batch) == 0 {
			w.catching = false
			h.mu.Unlock()
			return
		}
		pushed := w.pushed
		h.mu.Unlock()
		for _, c := range batch {
			if c.Seq <= pushed {
				continue
			}
			if !w.push(ctx, c) {
				return
			}
			pushed = c.Seq
		}
		h.mu.Lock()
		w.pushed = max(w.pushed, pushed)
		h.mu.Unlock()
	}
}

// push hands c to w's transport, waiting for room (a reader of the log may); false
// when the watch or ctx ended first.
func (w *Watch) push(ctx context.Context, c *shared) bool {
	select {
	case w.out <- c:
		return true
	case <-w.done:
	case <-ctx.Done():
	}
	return false
}

// fromLog hands w its target's changes after `from` up to `to`, read from the log as
// history reads it. On failure it returns why the watch ends.
func (h *watchHub) fromLog(ctx context.Context, w *Watch, from, to uint64) (string, error) {
	if from >= to {
		return "", nil
	}
	hist := h.s.cfg.History
	if hist == nil {
		return EndResumeImpossible, errors.New("this instance does not read the log")
	}
	info, err := h.s.eventStream.Info(ctx)
	if err != nil {
		return EndUnavailable, err
	}
	if info.State.FirstSeq > from+1 {
		return EndResumeImpossible, errors.New("the log no longer holds every change after the position")
	}
	seen := map[string]*events.AttrRecord{} // each attribute's record after the last event on it
	var changes []*shared
	_, err = hist.FoldUser(ctx, w.uid, 0, false, func(e events.Entry, v events.View) bool {
		ev := e.Event
		if ev == nil || e.Seq > to {
			return e.Seq <= to
		}
		if e.Decision.Code == "" && e.Seq > from && ev.SessionID == w.sid && len(ev.Attrs) > 0 {
			live := make([]bool, len(ev.Attrs))
			for i, it := range ev.Attrs {
				live[i] = seen[events.AttrKey(w.uid, w.sid, it.Name)].Live(ev.Time)
			}
			if c := events.ChangeOf(e.Seq, ev, live, v); c != nil && w.wants(c) {
				changes = append(changes, &shared{Change: c})
			}
		}
		if ev.SessionID == w.sid {
			for _, it := range ev.Attrs {
				key := events.AttrKey(w.uid, w.sid, it.Name)
				seen[key] = v.Attr(key)
			}
		}
		return true
	})
	if err != nil {
		return EndUnavailable, err
	}
	for _, c := range changes {
		if !w.push(ctx, c) {
			return "", nil
		}
		h.mu.Lock()
		w.pushed = max(w.pushed, c.Seq)
		h.mu.Unlock()
	}
	return "", nil
}

// usersBetween returns the users with events in partition p after `from` up to `to`,
// from the subjects of the log's messages (headers only: no bodies are read).
func (s *Service) usersBetween(ctx context.Context, p int, from, to uint64) (map[string]bool, error) {
	// An ordered consumer: ephemeral, in order, recreated by the library if a message
	// is missed; bodies left out (HeadersOnly), the subject is all that is needed.
	c, err := s.eventStream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{s.layout.PartitionSubjects(p)}, DeliverPolicy: jetstream.DeliverByStartSequencePolicy,
		OptStartSeq: from + 1, HeadersOnly: true})
	if err != nil {
		return nil, err
	}
	users := map[string]bool{}
	for {
		batch, err := c.Fetch(1000, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return nil, err
		}
		n := 0
		for m := range batch.Messages() {
			n++
			md, err := m.Metadata()
			if err != nil {
				return nil, err
			}
			if md.Sequence.Stream > to {
				return users, nil
			}
			if uid := events.UserOfSubject(m.Subject()); uid != "" {
				users[uid] = true
			}
			if md.NumPending == 0 {
				return users, nil
			}
		}
		if err := batch.Error(); err != nil {
			return nil, err
		}
		if n == 0 {
			return users, nil
		}
	}
}

// retryUnavailable runs f until it succeeds, fails otherwise than by NATS being
// unavailable, or ctx ends.
func retryUnavailable(ctx context.Context, f func() error) error {
	for pause := 100 * time.Millisecond; ; pause = min(2*pause, 2*time.Second) {
		err := f()
		if err == nil || !Unavailable(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(pause):
		}
	}
}
