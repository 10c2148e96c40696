package zatodb

import (
	"context"
	"database/sql"
	_ "embed"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// Building a Zato SSO database, as Zato would have written it: for the import's tests
// and its benchmark (and anyone who wants to try attrd import without a Zato).

//go:embed schema_sqlite.sql
var schemaSQLite string

// schemaPostgres is the same tables on PostgreSQL: SQLAlchemy writes them alike but
// for DateTime, which is TIMESTAMP WITHOUT TIME ZONE there.
var schemaPostgres = strings.ReplaceAll(schemaSQLite, "DATETIME", "TIMESTAMP WITHOUT TIME ZONE")

// Builder writes a Zato SSO database on SQLite or PostgreSQL.
type Builder struct {
	db       *sql.DB
	tx       *sql.Tx
	key      *Key
	n        int
	postgres bool
}

// Create makes a new SQLite database at path with Zato's SSO tables. key, if not nil,
// encrypts password hashes (Zato's encrypt_password, on by default) and encrypted
// attributes.
func Create(ctx context.Context, path string, key *Key) (*Builder, error) {
	return create(ctx, "sqlite", "file:"+path, schemaSQLite, key)
}

// CreatePostgres makes Zato's SSO tables in an empty PostgreSQL database (a URL).
func CreatePostgres(ctx context.Context, url string, key *Key) (*Builder, error) {
	return create(ctx, "pgx", url, schemaPostgres, key)
}

func create(ctx context.Context, driver, dsn, schema string, key *Key) (*Builder, error) {
	db, err := sql.Open(driver, dsn)
	if err != nil {
		return nil, err
	}
	for _, stmt := range strings.Split(schema, ";") {
		if strings.TrimSpace(stripComments(stmt)) == "" {
			continue
		}
		if _, err := db.ExecContext(ctx, stmt); err != nil {
			db.Close()
			return nil, fmt.Errorf("create Zato's tables: %w", err)
		}
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		db.Close()
		return nil, err
	}
	return &Builder{db: db, tx: tx, key: key, postgres: driver == "pgx"}, nil
}

// stripComments drops SQL line comments.
func stripComments(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "--") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// exec runs a statement written with ? placeholders ($1, $2… on PostgreSQL).
func (b *Builder) exec(ctx context.Context, q string, args ...any) error {
	if b.postgres {
		var sb strings.Builder
		n := 0
		for _, r := range q {
			if r == '?' {
				n++
				fmt.Fprintf(&sb, "$%d", n)
				continue
			}
			sb.WriteRune(r)
		}
		q = sb.String()
	}
	_, err := b.tx.ExecContext(ctx, q, args...)
	return err
}

// ZatoTime is how SQLAlchemy writes a DateTime on SQLite.
func ZatoTime(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05.000000") }

// NewUser is a user to write.
type NewUser struct {
	ID, Username   string
	PasswordHash   string // passlib's; encrypted with the builder's key when it has one
	SuperUser      bool
	ApprovalStatus string // approved, before_decision, rejected
	Locked         bool
	Created        time.Time
}

// AddUser writes a user and returns its row id (for AddSession).
func (b *Builder) AddUser(ctx context.Context, u NewUser) (int, error) {
	b.n++
	pw := u.PasswordHash
	if b.key != nil {
		pw = b.key.Encrypt([]byte(pw))
	}
	now := ZatoTime(u.Created)
	err := b.exec(ctx, `INSERT INTO zato_sso_user (id, user_id, is_active, is_internal, is_super_user, is_locked,
		creation_ctx, approval_status, approval_status_mod_time, approval_status_mod_by, username, password, password_is_set,
		password_must_change, password_last_set, password_expiry, sign_up_status, sign_up_time, sign_up_confirm_token,
		display_name, display_name_upper)
		VALUES (?, ?, TRUE, FALSE, ?, ?, '{}', ?, ?, 'system', ?, ?, TRUE, FALSE, ?, ?, 'final', ?, ?, ?, ?)`,
		b.n, u.ID, u.SuperUser, u.Locked, u.ApprovalStatus, now, u.Username, pw, now, ZatoTime(u.Created.AddDate(1, 0, 0)), now,
		fmt.Sprintf("tok-%d-%s", b.n, u.ID), u.Username, strings.ToUpper(u.Username))
	return b.n, err
}

// NewAttr is an attribute to write.
type NewAttr struct {
	UserID, Name string
	Value        any // written as Zato does: json.dumps, of the Fernet token when Encrypted
	Encrypted    bool
	Created      time.Time
	Modified     time.Time // zero: NULL
	Expires      time.Time // zero: NULL (never)
	UST          string    // a session attribute of this session ("": a user attribute)
}

// AddAttr writes an attribute.
func (b *Builder) AddAttr(ctx context.Context, a NewAttr) error {
	b.n++
	v, err := json.Marshal(a.Value)
	if err != nil {
		return err
	}
	if a.Encrypted {
		s, ok := a.Value.(string)
		if !ok || b.key == nil {
			return fmt.Errorf("Zato encrypts strings only, with its key")
		}
		v, _ = json.Marshal(b.key.Encrypt([]byte(s)))
	}
	var modified, expires, ust any
	if !a.Modified.IsZero() {
		modified = ZatoTime(a.Modified)
	}
	if !a.Expires.IsZero() {
		expires = ZatoTime(a.Expires)
	}
	if a.UST != "" {
		ust = a.UST
	}
	err = b.exec(ctx, `INSERT INTO zato_sso_attr (id, creation_time, last_modified, expiration_time, is_session_attr,
		is_encrypted, serial_method, name, value, _ust_string, user_id, ust) VALUES (?, ?, ?, ?, ?, ?, 'json', ?, ?, ?, ?, ?)`,
		b.n, ZatoTime(a.Created), modified, expires, a.UST != "", a.Encrypted, a.Name, string(v), a.UST, a.UserID, ust)
	return err
}

// AddSession writes a session of the user whose row id is userRow (AddUser's) with
// its UST.
func (b *Builder) AddSession(ctx context.Context, userRow int, ust string, created, expires time.Time) error {
	b.n++
	err := b.exec(ctx, `INSERT INTO zato_sso_session (id, ust, creation_time, expiration_time, remote_addr, user_agent,
		auth_type, auth_principal, user_id) VALUES (?, ?, ?, ?, '127.0.0.1', 'test', 'default', 'test', ?)`,
		b.n, ust, ZatoTime(created), ZatoTime(expires), userRow)
	return err
}

// Commit writes what was added so far and starts a new transaction.
func (b *Builder) Commit(ctx context.Context) error {
	if err := b.tx.Commit(); err != nil {
		return err
	}
	var err error
	b.tx, err = b.db.BeginTx(ctx, nil)
	return err
}

// Close commits and closes.
func (b *Builder) Close() error {
	err := b.tx.Commit()
	if cerr := b.db.Close(); err == nil {
		err = cerr
	}
	return err
}
