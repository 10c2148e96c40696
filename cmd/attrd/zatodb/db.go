// Package zatodb reads a Zato SSO database — Zato's own tables, as its
// zato/common/odb/model/sso.py defines them (zato_sso_user, zato_sso_attr,
// zato_sso_session) — from SQLite or PostgreSQL, for attrd import; and opens what Zato
// encrypted in it (fernet.go).
package zatodb

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers "pgx"
	_ "modernc.org/sqlite"             // registers "sqlite"
)

// DB is a Zato SSO database, opened read-only in spirit: it only selects.
type DB struct{ db *sql.DB }

// Open opens "sqlite:PATH" (or a path ending in .db or .sqlite) or a PostgreSQL URL
// ("postgres://…", "postgresql://…").
func Open(dsn string) (*DB, error) {
	var db *sql.DB
	var err error
	switch {
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		db, err = sql.Open("pgx", dsn)
	case strings.HasPrefix(dsn, "sqlite:"):
		db, err = sql.Open("sqlite", "file:"+strings.TrimPrefix(dsn, "sqlite:")+"?mode=ro")
	case strings.HasSuffix(dsn, ".db"), strings.HasSuffix(dsn, ".sqlite"):
		db, err = sql.Open("sqlite", "file:"+dsn+"?mode=ro")
	default:
		return nil, errors.New(`--from: "sqlite:PATH" or "postgres://USER@HOST/DB"`)
	}
	if err != nil {
		return nil, err
	}
	if err := db.Ping(); err != nil {
		db.Close()
		return nil, fmt.Errorf("open the Zato database: %w", err)
	}
	return &DB{db: db}, nil
}

// Close closes the database.
func (d *DB) Close() error { return d.db.Close() }

// Counts are the rows of the SSO tables.
type Counts struct {
	Users, Attrs, Sessions, SessionAttrs int
}

// Count counts the SSO tables' rows.
func (d *DB) Count(ctx context.Context) (c Counts, err error) {
	for _, q := range []struct {
		n   *int
		sql string
	}{{&c.Users, "SELECT COUNT(*) FROM zato_sso_user"},
		{&c.Attrs, "SELECT COUNT(*) FROM zato_sso_attr WHERE NOT is_session_attr"},
		{&c.Sessions, "SELECT COUNT(*) FROM zato_sso_session"},
		{&c.SessionAttrs, "SELECT COUNT(*) FROM zato_sso_attr WHERE is_session_attr"}} {
		if err = d.db.QueryRowContext(ctx, q.sql).Scan(q.n); err != nil {
			return c, fmt.Errorf("%s: %w", q.sql, err)
		}
	}
	return c, nil
}

// User is a row of zato_sso_user with its user attributes.
type User struct {
	ID             string // user_id, "zusr…"
	Username       string
	Password       string // as stored: a passlib hash, or one Fernet-encrypted
	SuperUser      bool
	ApprovalStatus string // approved, rejected, before_decision
	Locked         bool
	SignUpStatus   string // final once confirmed
	Created        time.Time
	Attrs          []Attr
}

// Approved is whether Zato lets the user log in as far as their state goes: approved,
// signed up, not locked.
func (u *User) Approved() bool {
	return u.ApprovalStatus == "approved" && !u.Locked && (u.SignUpStatus == "" || u.SignUpStatus == "final")
}

// Attr is a row of zato_sso_attr.
type Attr struct {
	Name      string
	Value     string // as stored: JSON; when encrypted, the JSON string of a Fernet token
	Encrypted bool
	Created   time.Time
	Modified  time.Time // zero: never modified
	Expires   time.Time // zero: never
}

// Users calls fn with every user, in user_id order, with their user attributes (not
// their sessions'), until fn returns an error.
func (d *DB) Users(ctx context.Context, fn func(User) error) error {
	users, err := d.db.QueryContext(ctx, `SELECT user_id, username, password, is_super_user, approval_status, is_locked,
		sign_up_status, sign_up_time FROM zato_sso_user ORDER BY user_id`)
	if err != nil {
		return fmt.Errorf("read zato_sso_user: %w", err)
	}
	defer users.Close()
	attrs, err := d.db.QueryContext(ctx, `SELECT user_id, name, value, is_encrypted, creation_time, last_modified,
		expiration_time FROM zato_sso_attr WHERE NOT is_session_attr ORDER BY user_id, name`)
	if err != nil {
		return fmt.Errorf("read zato_sso_attr: %w", err)
	}
	defer attrs.Close()
	// next is the attribute row read ahead, nil at the end: the rows are merged with
	// the users by user_id.
	type attrRow struct {
		uid string
		a   Attr
	}
	var next *attrRow
	readAttr := func() error {
		next = nil
		if !attrs.Next() {
			return attrs.Err()
		}
		var uid, name string
		var value sql.NullString
		var enc, created, modified, expires any
		if err := attrs.Scan(&uid, &name, &value, &enc, &created, &modified, &expires); err != nil {
			return err
		}
		a := Attr{Name: name, Value: value.String}
		if !value.Valid {
			a.Value = "null"
		}
		var err error
		if a.Encrypted, err = boolOf(enc); err == nil {
			if a.Created, err = timeOf(created); err == nil {
				if a.Modified, err = timeOf(modified); err == nil {
					a.Expires, err = timeOf(expires)
				}
			}
		}
		if err != nil {
			return fmt.Errorf("zato_sso_attr %s %q: %w", uid, name, err)
		}
		next = &attrRow{uid, a}
		return nil
	}
	if err := readAttr(); err != nil {
		return err
	}
	for users.Next() {
		var u User
		var super, locked, created any
		var signUp sql.NullString
		if err := users.Scan(&u.ID, &u.Username, &u.Password, &super, &u.ApprovalStatus, &locked, &signUp, &created); err != nil {
			return fmt.Errorf("read zato_sso_user: %w", err)
		}
		u.SignUpStatus = signUp.String
		var err error
		if u.SuperUser, err = boolOf(super); err == nil {
			if u.Locked, err = boolOf(locked); err == nil {
				u.Created, err = timeOf(created)
			}
		}
		if err != nil {
			return fmt.Errorf("zato_sso_user %s: %w", u.ID, err)
		}
		// Attributes of users not in the table (none, with Zato's foreign key) are passed.
		for next != nil && next.uid < u.ID {
			if err := readAttr(); err != nil {
				return err
			}
		}
		for next != nil && next.uid == u.ID {
			u.Attrs = append(u.Attrs, next.a)
			if err := readAttr(); err != nil {
				return err
			}
		}
		if err := fn(u); err != nil {
			return err
		}
	}
	return users.Err()
}

// boolOf reads a boolean column: SQLite's 0/1, PostgreSQL's bool.
func boolOf(v any) (bool, error) {
	switch t := v.(type) {
	case bool:
		return t, nil
	case int64:
		return t != 0, nil
	case nil:
		return false, nil
	case []byte:
		return strconv.ParseBool(string(t))
	case string:
		return strconv.ParseBool(t)
	}
	return false, fmt.Errorf("not a boolean: %v", v)
}

// timeOf reads a DateTime column (UTC without a zone, as SQLAlchemy writes Zato's):
// zero for NULL.
func timeOf(v any) (time.Time, error) {
	switch t := v.(type) {
	case nil:
		return time.Time{}, nil
	case time.Time:
		return time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.UTC), nil
	case []byte:
		return parseTime(string(t))
	case string:
		return parseTime(t)
	}
	return time.Time{}, fmt.Errorf("not a time: %v", v)
}

func parseTime(s string) (time.Time, error) {
	for _, layout := range []string{"2006-01-02 15:04:05.999999999", "2006-01-02T15:04:05.999999999", time.RFC3339Nano,
		"2006-01-02 15:04:05.999999999-07:00"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t.UTC(), nil
		}
	}
	return time.Time{}, fmt.Errorf("not a time: %q", s)
}
