package projector

import (
	"context"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/attrd/attrd/events"
)

// A run's consumer is best on the server its own connection is on: deliveries take
// no route, and a network cut of another node (the stream's leader's, say) leaves the
// consumer with the run. On any other node, a cut of that node silences the consumer
// and ends the run (its pull heartbeats stop: 2–3 s), and the next run must create a
// consumer, which needs the meta group's leader (issue 21).
//
// NATS subtlety: a consumer's config has no placement. nats-server puts an R1
// consumer of a replicated stream on one of the stream's caught-up peers at random
// (createGroupForConsumer shuffles them), so a run asks again, a few times within a
// short budget, until one lands on its server.

// placeTries and placeBudget bound the asking: with three peers, a try lands on the
// run's server one time in three (three tries on average), so that 24 miss about one
// time in 17,000; each try is a create and a delete, two meta proposals (milliseconds
// on a healthy cluster). A slow meta group (an election) stops the tries at the
// budget rather than lengthen the run's start by more.
const (
	placeTries  = 24
	placeBudget = 300 * time.Millisecond
)

// place returns a consumer made with cfg (first, already made, or a later try) on the
// server this run's connection is on, when it can find one within placeTries and
// placeBudget; else first. A try that is not kept is deleted; first is deleted only
// once a try on this server replaces it, so the run never loses the consumer it has.
func (p *Projector) place(ctx context.Context, evs jetstream.Stream, cfg jetstream.ConsumerConfig, first jetstream.Consumer) (jetstream.Consumer, string) {
	own := p.nc.ConnectedServerName()
	if !p.placeable(evs, own) || p.onHere(first, own) {
		return first, cfg.Name
	}
	budget := placeBudget
	if p.cfg.Hooks.PlaceBudget > 0 {
		budget = p.cfg.Hooks.PlaceBudget
	}
	began := time.Now()
	for try := 1; try < placeTries && time.Since(began) < budget && ctx.Err() == nil; try++ {
		next := cfg
		next.Name = consumerName(p.cfg.Durable)
		cctx, cancel := context.WithTimeout(ctx, budget-time.Since(began))
		c, err := evs.CreateConsumer(cctx, next)
		cancel()
		if err != nil {
			break // keep the first: it works
		}
		keep := p.onHere(c, own)
		drop := next.Name
		if keep {
			drop = cfg.Name
		}
		dctx, cancel := context.WithTimeout(ctx, budget)
		err = evs.DeleteConsumer(dctx, drop)
		cancel()
		if keep {
			if err != nil {
				// The first is left to the server's InactiveThreshold: nobody pulls it.
				p.log.Debug("consumer not on this server not deleted", "consumer", drop, "err", err)
			}
			p.log.Debug("consumer placed on this run's server", "server", own, "tries", try+1)
			return c, next.Name
		}
		if err != nil {
			break
		}
	}
	p.log.Debug("consumer left on another server than this run's", "server", own, "took", time.Since(began))
	return first, cfg.Name
}

// placeable reports whether a consumer of evs can be put on server own: the stream is
// replicated and own holds one of its copies.
func (p *Projector) placeable(evs jetstream.Stream, own string) bool {
	info := evs.CachedInfo()
	if own == "" || info == nil || info.Config.Replicas < 2 || info.Cluster == nil {
		return false
	}
	if p.cfg.Hooks.ConsumerAnywhere {
		return false
	}
	peers := []string{info.Cluster.Leader}
	for _, r := range info.Cluster.Replicas {
		peers = append(peers, r.Name)
	}
	return slices.Contains(peers, own)
}

// onHere reports whether consumer c lives on server own, as its creation answered.
func (p *Projector) onHere(c jetstream.Consumer, own string) bool {
	info := c.CachedInfo()
	return info != nil && info.Cluster != nil && info.Cluster.Leader == own
}

// consumerName names one run's consumer: a name no other run ever used, so that no
// other instance's consumer is ever deleted or reset.
func consumerName(durable string) string {
	return durable + "-" + strings.ToLower(events.NewID())
}
