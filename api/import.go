package api

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/oklog/ulid/v2"

	"github.com/attrd/attrd/events"
	"github.com/attrd/attrd/events/sealed"
)

// Importing users from another system (attrd import, a Zato SSO database): every item
// becomes an event of attrd itself (no actor), marked with where it came from
// (events.Imported), so that the history says so. Users keep their password hashes
// (passlib.go) and their creation time; attributes keep their creation and
// modification times and their expiry. An import is idempotent: a user's id is made
// from their id in the source, and what is already here is left alone.

// ImportApp is the application of imported events.
const ImportApp = "attrd-import"

// ImportedUser is a user as the source holds them, with their attributes.
type ImportedUser struct {
	From, SourceID string // the source system ("zato") and the user's id there
	Username       string
	PasswordHash   string // an imported scheme: PBKDF2Prefix
	SuperUser      bool
	Approved       bool
	Created        time.Time
	Attrs          []ImportedAttr
}

// ImportedAttr is one of a user's attributes as the source holds it.
type ImportedAttr struct {
	Name      string
	Value     json.RawMessage // the value's JSON
	Encrypt   bool            // store it encrypted (sealed with the key file)
	Created   time.Time
	Modified  time.Time
	ExpiresAt time.Time // zero: never
}

// ImportSkip is an item left out, and why.
type ImportSkip struct {
	Name   string // the attribute ("": the user)
	Reason string
}

// ImportResult is what one user's import did (or, dry, would do).
type ImportResult struct {
	UserID       string
	UserImported bool // false: already here, or skipped (Skipped says)
	UserPresent  bool
	Attrs        int // attributes imported
	AttrsPresent int // attributes already here
	Skipped      []ImportSkip
}

// ImportedUserID is the attrd user id of a user imported from source with the source's
// id: a ULID whose time is the user's creation and whose randomness is a hash of the
// source and id, so that an import run again finds the users it made.
func ImportedUserID(from, sourceID string, created time.Time) string {
	h := sha256.Sum256([]byte("attrd-import\x00" + from + "\x00" + sourceID))
	var id ulid.ULID
	ms := max(created.UnixMilli(), 0)
	if err := id.SetTime(uint64(ms)); err != nil {
		_ = id.SetTime(0)
	}
	_ = id.SetEntropy(h[:10])
	return id.String()
}

// Import imports one user and their attributes, or, with dry, finds what it would do.
// It returns an error only when it cannot go on (NATS unavailable, a bug); what it
// leaves out, it says in the result.
func (s *Service) Import(ctx context.Context, u ImportedUser, dry bool) (ImportResult, error) {
	r := ImportResult{UserID: ImportedUserID(u.From, u.SourceID, u.Created)}
	if err := ValidateName(u.Username); err != nil || u.Username == "" || len(u.Username) > MaxNameBytes {
		r.Skipped = append(r.Skipped, ImportSkip{Reason: fmt.Sprintf("the username %q is not one attrd takes (1 to %d bytes, no control characters)", u.Username, MaxNameBytes)})
		return r, nil
	}
	existing, err := s.readUser(ctx, r.UserID)
	if err != nil {
		return r, err
	}
	switch {
	case existing != nil && existing.Username != u.Username && !existing.Unopened:
		r.Skipped = append(r.Skipped, ImportSkip{Reason: fmt.Sprintf("attrd's user %s has another username", r.UserID)})
		return r, nil
	case existing != nil:
		r.UserPresent = true
	default:
		if erased, err := s.erased(ctx, r.UserID); err != nil {
			return r, err
		} else if erased {
			// Deleted here for good: an import run again must not bring them back.
			r.Skipped = append(r.Skipped, ImportSkip{Reason: "deleted in attrd since an earlier import: not imported again"})
			return r, nil
		}
		if taken, err := s.read(ctx, events.UsernameKey(u.Username)); err != nil {
			return r, err
		} else if taken != nil {
			r.Skipped = append(r.Skipped, ImportSkip{Reason: fmt.Sprintf("the username %q is another attrd user's", u.Username)})
			return r, nil
		}
		if !dry {
			ev := s.importEvent(events.UserCreated, r.UserID, u)
			ev.User = &events.UserData{Username: u.Username, PasswordHash: u.PasswordHash, SuperUser: u.SuperUser, Approved: u.Approved,
				Created: u.Created.UnixNano()}
			if _, err := s.apply(ctx, ev); err != nil {
				if c := events.CodeOf(err); c != events.CodeInternal && c != events.CodeOutcomeUnknown {
					r.Skipped = append(r.Skipped, ImportSkip{Reason: "refused: " + string(c)})
					return r, nil
				}
				return r, err
			}
		}
		r.UserImported = true
	}
	return r, s.importAttrs(ctx, &r, u, dry)
}

// erased reports whether user uid was deleted here (their data key destroyed). Without
// data keys (no key file) a deletion leaves no mark an import can see.
func (s *Service) erased(ctx context.Context, uid string) (bool, error) {
	if s.dataKeys == nil {
		return false, nil
	}
	return s.dataKeys.Erased(ctx, uid)
}

// importEvent is an imported event of attrd itself about user uid.
func (s *Service) importEvent(t events.Type, uid string, u ImportedUser) *events.Event {
	ev := (*caller)(nil).event(t, Meta{CID: events.NewID(), App: ImportApp})
	ev.UserID, ev.Time = uid, time.Now().UnixNano()
	ev.Imported = &events.Imported{From: u.From, ID: u.SourceID}
	return ev
}

// importAttrs imports the attributes that are not here yet, as few attr.created events
// as the limits allow.
func (s *Service) importAttrs(ctx context.Context, r *ImportResult, u ImportedUser, dry bool) error {
	present := map[string]bool{}
	if r.UserPresent {
		names, err := s.listNames(ctx, events.AttrPrefix(r.UserID, ""))
		if err != nil {
			return err
		}
		for _, n := range names {
			present[n] = true
		}
	}
	now := time.Now()
	var todo []ImportedAttr
	seen := map[string]bool{}
	for _, a := range u.Attrs {
		reason := ""
		switch {
		case ValidateName(a.Name) != nil || a.Name == "":
			reason = "a name attrd does not take (1 to 191 bytes, no control characters)"
		case seen[a.Name]:
			reason = "a name given twice"
		case !a.ExpiresAt.IsZero() && !a.ExpiresAt.After(now):
			reason = "expired"
		case len(a.Value) > s.cfg.Limits.MaxValueBytes:
			reason = fmt.Sprintf("a value over %d bytes", s.cfg.Limits.MaxValueBytes)
		case !json.Valid(a.Value):
			reason = "a value that is not JSON"
		case a.Encrypt && s.cfg.Keyring == nil:
			reason = "encrypted, and attrd has no key file to encrypt it with"
		}
		seen[a.Name] = true
		switch {
		case reason != "":
			r.Skipped = append(r.Skipped, ImportSkip{Name: a.Name, Reason: reason})
		case present[a.Name]:
			r.AttrsPresent++
		default:
			todo = append(todo, a)
		}
	}
	if max := s.cfg.Limits.MaxAttrsPerUser; max > 0 && len(present)+len(todo) > max {
		for _, a := range todo[max-min(len(present), max):] {
			r.Skipped = append(r.Skipped, ImportSkip{Name: a.Name, Reason: fmt.Sprintf("over attrd's %d attributes per user", max)})
		}
		todo = todo[:max-min(len(present), max)]
	}
	if dry {
		r.Attrs = len(todo)
		return nil
	}
	for len(todo) > 0 {
		// As many as one request may hold: items, and about a body's bytes of values.
		n, size := 0, 0
		for n < len(todo) && n < s.cfg.Limits.MaxItems && (n == 0 || size+len(todo[n].Value) <= s.cfg.Limits.MaxBodyBytes) {
			size += len(todo[n].Value)
			n++
		}
		chunk := todo[:n]
		todo = todo[n:]
		ev := s.importEvent(events.AttrCreated, r.UserID, u)
		ev.Cap = s.cfg.Limits.MaxAttrsPerUser
		for _, a := range chunk {
			it := events.AttrItem{Name: a.Name, Value: a.Value, Created: a.Created.UnixNano(), Modified: a.Modified.UnixNano()}
			if !a.ExpiresAt.IsZero() {
				it.ExpiresAt = a.ExpiresAt.UnixNano()
			}
			if a.Encrypt {
				it.Enc = events.Encrypted
				var err error
				if it.Value, err = s.sealValue(ctx, r.UserID, a.Value, sealed.AAD(r.UserID, "", a.Name)); err != nil {
					return err
				}
			}
			ev.Attrs = append(ev.Attrs, it)
		}
		if _, err := s.apply(ctx, ev); err != nil {
			c := events.CodeOf(err)
			if c == events.CodeInternal || c == events.CodeOutcomeUnknown {
				return err
			}
			for _, a := range chunk {
				r.Skipped = append(r.Skipped, ImportSkip{Name: a.Name, Reason: "refused: " + string(c)})
			}
			continue
		}
		r.Attrs += len(chunk)
	}
	slices.SortFunc(r.Skipped, func(a, b ImportSkip) int {
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	return nil
}
