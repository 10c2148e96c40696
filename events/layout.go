package events

import (
	"hash/fnv"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

// Layout is how a deployment's event stream is split into partitions: every event of a
// user, and every decision about them, is in the user's partition, which one projector
// folds at a time. The number of partitions is chosen when the deployment is created
// and kept in the stream's metadata (MetadataPartitions); it never changes.
//
// With one partition (every deployment made before partitions, and any made with
// --partitions 1) the subjects are as they always were:
//
//	attrd.events.<uid>.user | .attr | .session.<sid> | .decision
//
// With N > 1 the partition is a token of its own, before the user id:
//
//	attrd.events.p<k>.<uid>.user | .attr | .session.<sid> | .decision
//
// so that one filter, attrd.events.p<k>.>, is a partition's whole log, and one filter,
// attrd.events.p<k>.<uid>.>, a user's whole history. k is the FNV-1a hash of the user
// id modulo N, as nats-server's partition() subject transform computes it. (A user
// id is a ULID, upper-case, so it can never be read as "p<k>".)
type Layout struct {
	// Partitions is the number of partitions; 0 counts as 1.
	Partitions int
}

// MetadataPartitions is the event stream's metadata key that holds the number of
// partitions (absent: 1).
const MetadataPartitions = "attrd_partitions"

// LayoutOf returns the layout of an event stream, from its metadata.
func LayoutOf(cfg jetstream.StreamConfig) Layout {
	n, err := strconv.Atoi(cfg.Metadata[MetadataPartitions])
	if err != nil || n < 1 {
		return Layout{Partitions: 1}
	}
	return Layout{Partitions: n}
}

// N returns the number of partitions, at least 1.
func (l Layout) N() int { return max(l.Partitions, 1) }

// Partition returns the partition of a user.
func (l Layout) Partition(uid string) int {
	if l.N() == 1 {
		return 0
	}
	h := fnv.New32a()
	h.Write([]byte(uid))
	return int(h.Sum32() % uint32(l.N()))
}

// PartitionName is how a partition is named in keys (p.<name>, l.<name>, r.<name>)
// and logs: its number.
func PartitionName(p int) string { return strconv.Itoa(p) }

// prefix is the subject prefix of a user's events.
func (l Layout) prefix(uid string) string {
	if l.N() == 1 {
		return EventsPrefix + "." + uid
	}
	return EventsPrefix + ".p" + strconv.Itoa(l.Partition(uid)) + "." + uid
}

// Subject returns the subject an event is published on.
func (l Layout) Subject(e *Event) string {
	switch e.Type {
	case UserCreated, UserApproved, UserDeleted, UserRehashed, LoginFailed:
		return l.prefix(e.UserID) + ".user"
	case SessionCreated, SessionRenewed, SessionEnded:
		return l.prefix(e.UserID) + ".session." + e.SessionID
	default:
		if e.SessionID != "" {
			return l.prefix(e.UserID) + ".session." + e.SessionID
		}
		return l.AttrSubject(e.UserID)
	}
}

// AttrSubject is the subject of the events on a user's own attributes.
func (l Layout) AttrSubject(uid string) string { return l.prefix(uid) + ".attr" }

// DecisionSubject is where the projector records the rejections of a user's events,
// under the user's own prefix: one filter gives the user's events and their recorded
// decisions. Accepted events have no such message (the common case costs nothing).
func (l Layout) DecisionSubject(uid string) string { return l.prefix(uid) + ".decision" }

// UserSubjects is the filter for all events about one user.
func (l Layout) UserSubjects(uid string) string { return l.prefix(uid) + ".>" }

// UserSubject is the subject of a user's own lifecycle events (created, approved, deleted).
func (l Layout) UserSubject(uid string) string { return l.prefix(uid) + ".user" }

// SessionSubject is the subject of a session's events.
func (l Layout) SessionSubject(uid, sid string) string { return l.prefix(uid) + ".session." + sid }

// PartitionSubjects is the filter for a partition's whole log.
func (l Layout) PartitionSubjects(p int) string {
	if l.N() == 1 {
		return EventsPrefix + ".>"
	}
	return EventsPrefix + ".p" + strconv.Itoa(p) + ".>"
}

// IsDecisionSubject reports whether a subject of the event stream holds recorded
// decisions rather than an event.
func IsDecisionSubject(subject string) bool { return strings.HasSuffix(subject, ".decision") }

// UserOfSubject returns the user id token of an event stream subject, in any layout
// ("" if none).
func UserOfSubject(subject string) string {
	rest, ok := strings.CutPrefix(subject, EventsPrefix+".")
	if !ok {
		return ""
	}
	tok, rest, _ := strings.Cut(rest, ".")
	if isPartitionToken(tok) {
		tok, _, _ = strings.Cut(rest, ".")
	}
	return tok
}

// isPartitionToken reports whether a subject token is "p<k>".
func isPartitionToken(tok string) bool {
	if len(tok) < 2 || tok[0] != 'p' {
		return false
	}
	_, err := strconv.Atoi(tok[1:])
	return err == nil
}
