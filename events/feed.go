package events

// The feed: what each partition's projector has applied, announced after every chunk
// lands (its keys are in the bucket, its decisions on their way), for the attrd
// instances that serve watches (api/watch.go). It is core NATS in the internal
// account, at most once: a lost announcement shows as a gap (Prev is not the Last of
// the one before), and a watcher that needs what it missed reads it from the log.

// FeedPrefix begins the feed's subjects, one per partition: FeedSubject.
const FeedPrefix = "attrd.feed"

// FeedSubjects is the filter for every partition's feed.
const FeedSubjects = FeedPrefix + ".>"

// FeedSubject is where partition p's projector announces its chunks.
func FeedSubject(p int) string { return FeedPrefix + "." + PartitionName(p) }

// Feed is one announcement: the projector of Partition applied the events after Prev
// up to Last; Changes are those watchers see, in log order. Partial says Changes were
// left out (they would not fit in one message): a reader takes it as a gap.
type Feed struct {
	Partition int      `msgpack:"p"`
	Prev      uint64   `msgpack:"prev"`
	Last      uint64   `msgpack:"last"`
	Partial   bool     `msgpack:"partial,omitempty"`
	Changes   []Change `msgpack:"c,omitempty"`
}

// Change is what one accepted event changed that a watcher sees: attributes created,
// updated, set or deleted (Attrs), a session renewed (ExpiresAt) or ended, a user
// deleted.
type Change struct {
	Seq       uint64        `msgpack:"s"`
	Type      Type          `msgpack:"t"`
	Time      int64         `msgpack:"ts"`
	UserID    string        `msgpack:"u"`
	SessionID string        `msgpack:"sid,omitempty"`
	CID       string        `msgpack:"cid,omitempty"`
	ExpiresAt int64         `msgpack:"exp,omitempty"` // session.renewed: the session's new end
	Attrs     []ChangedAttr `msgpack:"a,omitempty"`
}

// ChangedAttr is one attribute of a change: its record after the event, or nil when
// the event deleted it.
type ChangedAttr struct {
	Name   string      `msgpack:"n"`
	Record *AttrRecord `msgpack:"r,omitempty"`
}

// ChangeOf returns what the accepted event ev (at seq) changed for watchers, or nil
// when it changed nothing a watcher sees. liveBefore (AttrsLiveBefore) says which
// attributes a deletion names were live at the event's time before it; after is the
// projection right after it. A deletion of an attribute that was not live changes nothing, and is not
// a change. The live projector and a reader of the log (a watch resuming) both make
// changes so, from the same fold.
func ChangeOf(seq uint64, ev *Event, liveBefore []bool, after View) *Change {
	c := &Change{Seq: seq, Type: ev.Type, Time: ev.Time, UserID: ev.UserID, SessionID: ev.SessionID, CID: ev.CID}
	switch ev.Type {
	case SessionEnded, UserDeleted:
		return c
	case SessionRenewed:
		c.ExpiresAt = ev.ExpiresAt
		return c
	case AttrCreated, AttrUpdated, AttrSet:
		for _, it := range ev.Attrs {
			c.Attrs = append(c.Attrs, ChangedAttr{Name: it.Name, Record: after.Attr(AttrKey(ev.UserID, ev.SessionID, it.Name))})
		}
	case AttrDeleted:
		for i, it := range ev.Attrs {
			if i < len(liveBefore) && liveBefore[i] {
				c.Attrs = append(c.Attrs, ChangedAttr{Name: it.Name})
			}
		}
	default:
		return nil
	}
	if len(c.Attrs) == 0 {
		return nil
	}
	return c
}

// AttrsLiveBefore returns, for ChangeOf, whether each attribute ev names is live in st
// at the event's time: called before the event is folded.
func AttrsLiveBefore(ev *Event, st View) []bool {
	if ev.Type != AttrDeleted {
		return nil
	}
	live := make([]bool, len(ev.Attrs))
	for i, it := range ev.Attrs {
		live[i] = st.Attr(AttrKey(ev.UserID, ev.SessionID, it.Name)).Live(ev.Time)
	}
	return live
}
