package client

import (
	"context"
	"encoding/json"
	"time"
)

// Attr is the attribute API of one user, or of one session.
type Attr struct {
	s         *Session
	userID    string // user attributes
	targetUST string // session attributes
	session   bool
}

// Item is one attribute of a batch write. Expiration and Encrypt, when set, override
// the call's options for this item.
type Item struct {
	Name       string
	Value      any
	Expiration *time.Duration
	Encrypt    *bool
}

// Attribute is an attribute as read.
type Attribute struct {
	Found          bool            `json:"found"`
	Name           string          `json:"name"`
	Value          json.RawMessage `json:"value"`
	CreationTime   time.Time       `json:"creation_time"`
	LastModified   time.Time       `json:"last_modified"`
	ExpirationTime time.Time       `json:"expiration_time"`
	IsEncrypted    bool            `json:"is_encrypted"`
}

// Decode unmarshals the attribute's value into v.
func (a *Attribute) Decode(v any) error { return json.Unmarshal(a.Value, v) }

// Option sets an option of a call.
type Option func(map[string]any)

// Expiration makes the attribute expire after d (whole seconds, rounded up). On
// update, not giving it keeps the current expiry.
func Expiration(d time.Duration) Option {
	return func(b map[string]any) { b["expiration"] = seconds(d) }
}

// Encrypt stores the value encrypted at rest (or, false, plain). On update, not giving
// it keeps the attribute's current setting.
func Encrypt(on bool) Option { return func(b map[string]any) { b["encrypt"] = on } }

// Decrypt false returns an encrypted value as its ciphertext (base64).
func Decrypt(on bool) Option { return func(b map[string]any) { b["decrypt"] = on } }

// RequestID makes a write idempotent: a retry with the same id within the
// de-duplication window returns the first outcome and changes nothing.
func RequestID(id string) Option { return func(b map[string]any) { b["request_id"] = id } }

func seconds(d time.Duration) int64 { return int64((d + time.Second - 1) / time.Second) }

func (a *Attr) body(opts []Option) map[string]any {
	b := map[string]any{}
	if a.session {
		b["current_ust"], b["target_ust"] = a.s.UST, a.targetUST
	} else {
		b["ust"] = a.s.UST
		if a.userID != "" {
			b["user_id"] = a.userID
		}
	}
	for _, o := range opts {
		o(b)
	}
	return b
}

func (a *Attr) op(verb string) string {
	if a.session {
		return "session.attr." + verb
	}
	return "user.attr." + verb
}

func (a *Attr) write(ctx context.Context, verb, name string, value any, opts []Option) error {
	b := a.body(opts)
	b["name"], b["value"] = name, value
	return a.s.c.Call(ctx, a.op(verb), b, nil)
}

func (a *Attr) writeMany(ctx context.Context, verb string, items []Item, opts []Option) error {
	b := a.body(opts)
	data := make([]map[string]any, len(items))
	for i, it := range items {
		d := map[string]any{"name": it.Name, "value": it.Value}
		if it.Expiration != nil {
			d["expiration"] = seconds(*it.Expiration)
		}
		if it.Encrypt != nil {
			d["encrypt"] = *it.Encrypt
		}
		data[i] = d
	}
	b["data"] = data
	return a.s.c.Call(ctx, a.op(verb), b, nil)
}

// Create creates an attribute; events.ErrAttrExists if it exists.
func (a *Attr) Create(ctx context.Context, name string, value any, opts ...Option) error {
	return a.write(ctx, "create", name, value, opts)
}

// CreateMany creates all items or none.
func (a *Attr) CreateMany(ctx context.Context, items []Item, opts ...Option) error {
	return a.writeMany(ctx, "create", items, opts)
}

// Update changes an attribute; events.ErrNoAttr if it is missing or expired.
func (a *Attr) Update(ctx context.Context, name string, value any, opts ...Option) error {
	return a.write(ctx, "update", name, value, opts)
}

// UpdateMany updates all items or none (events.ErrNoAttr if any is missing).
func (a *Attr) UpdateMany(ctx context.Context, items []Item, opts ...Option) error {
	return a.writeMany(ctx, "update", items, opts)
}

// Set creates or updates an attribute.
func (a *Attr) Set(ctx context.Context, name string, value any, opts ...Option) error {
	return a.write(ctx, "set", name, value, opts)
}

// SetMany sets all items or none.
func (a *Attr) SetMany(ctx context.Context, items []Item, opts ...Option) error {
	return a.writeMany(ctx, "set", items, opts)
}

// Delete deletes an attribute; a missing one is not an error.
func (a *Attr) Delete(ctx context.Context, name string, opts ...Option) error {
	b := a.body(opts)
	b["name"] = name
	return a.s.c.Call(ctx, a.op("delete"), b, nil)
}

// DeleteMany deletes the named attributes.
func (a *Attr) DeleteMany(ctx context.Context, names []string, opts ...Option) error {
	b := a.body(opts)
	b["data"] = names
	return a.s.c.Call(ctx, a.op("delete"), b, nil)
}

// Get reads an attribute; Found is false if it is missing or expired.
func (a *Attr) Get(ctx context.Context, name string, opts ...Option) (*Attribute, error) {
	b := a.body(opts)
	b["name"] = name
	var out Attribute
	err := a.s.c.Call(ctx, a.op("get"), b, &out)
	return &out, err
}

// GetMany reads the named attributes.
func (a *Attr) GetMany(ctx context.Context, names []string, opts ...Option) (map[string]*Attribute, error) {
	b := a.body(opts)
	b["data"] = names
	var out struct {
		Result map[string]*Attribute `json:"result"`
	}
	err := a.s.c.Call(ctx, a.op("get"), b, &out)
	return out.Result, err
}

// Exists reports whether an attribute is live.
func (a *Attr) Exists(ctx context.Context, name string) (bool, error) {
	b := a.body(nil)
	b["name"] = name
	var out struct {
		Result bool `json:"result"`
	}
	err := a.s.c.Call(ctx, a.op("exists"), b, &out)
	return out.Result, err
}

// ExistsMany reports, per name, whether the attribute is live.
func (a *Attr) ExistsMany(ctx context.Context, names []string) (map[string]bool, error) {
	b := a.body(nil)
	b["data"] = names
	var out struct {
		Result map[string]bool `json:"result"`
	}
	err := a.s.c.Call(ctx, a.op("exists"), b, &out)
	return out.Result, err
}

// Names lists the live attribute names, sorted.
func (a *Attr) Names(ctx context.Context) ([]string, error) {
	var out struct {
		Result []string `json:"result"`
	}
	err := a.s.c.Call(ctx, a.op("names"), a.body(nil), &out)
	return out.Result, err
}
