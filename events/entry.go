package events

// Entry is one message of the log with the decision folding gives it. Event is nil for
// an unreadable message (decided E008002).
type Entry struct {
	Seq      uint64
	Subject  string
	Event    *Event
	Decision Decision
}

// View is a projection as of some point, read-only: what a point-in-time read looks at.
// Getters return nil for an absent key; liveness is the reader's business.
type View interface {
	User(uid string) *UserRecord
	Session(sid string) *SessionRecord
	Attr(key string) *AttrRecord
	// AttrKeys lists the keys under an attribute prefix that hold a record.
	AttrKeys(prefix string) []string
}
