package projector

import (
	"github.com/attrd/attrd/events"
)

// announce tells the instances that serve watches what a landed chunk changed
// (events.Feed), on its partition's feed subject: core NATS, at most once, so each
// announcement says where the previous one ended (Prev) and a reader that missed one
// reads the log instead. Only the live projector announces (Config.Replies).
func (p *Projector) announce(items []item) {
	if !p.cfg.Replies || len(items) == 0 {
		return
	}
	last := items[len(items)-1].seq
	if err := p.hook(p.cfg.Hooks.Announce, items[0].seq, last); err != nil {
		p.announced = last
		return
	}
	f := events.Feed{Partition: p.cfg.Partition, Prev: p.announced, Last: last}
	if f.Prev == 0 || f.Prev >= items[0].seq {
		// This run's first announcement (it starts where the last run's record says,
		// which this run cannot know was announced), or a recovered chunk announced
		// again: from just before the chunk.
		f.Prev = items[0].seq - 1
	}
	size := 0
	for _, it := range items {
		if c := it.change; c != nil {
			f.Changes = append(f.Changes, *c)
			for _, a := range c.Attrs {
				size += len(a.Name) + 64
				if a.Record != nil {
					size += len(a.Record.Value)
				}
			}
		}
	}
	if size > int(p.nc.MaxPayload())-intentHeadroom {
		f.Changes, f.Partial = nil, true // the readers read the log for this chunk
	}
	data, err := events.Marshal(&f)
	if err == nil {
		err = p.nc.Publish(events.FeedSubject(p.cfg.Partition), data)
	}
	if err != nil {
		p.log.Warn("feed announcement not sent", "first", items[0].seq, "last", last, "err", err)
	}
	p.announced = last
}
