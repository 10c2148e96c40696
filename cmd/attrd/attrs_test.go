package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/attrd/attrd/api"
	"github.com/attrd/attrd/api/client"
	"github.com/attrd/attrd/events"
)

// scopes runs a test on user attributes and on session attributes.
func scopes(t *testing.T, fn func(t *testing.T, f *fixture, a *client.Attr)) {
	t.Run("user", func(t *testing.T) {
		f := newFixture(t, nil)
		u, err := f.alice.User(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		fn(t, f, u.Attr)
	})
	t.Run("session", func(t *testing.T) {
		f := newFixture(t, nil)
		fn(t, f, f.alice.SessionAttr(f.alice.UST))
	})
}

func TestCreateOfALiveAttributeIsE009001(t *testing.T) {
	scopes(t, func(t *testing.T, f *fixture, a *client.Attr) {
		ctx := ctxT(t)
		expectCode(t, a.Create(ctx, "x", 1), noError)
		expectCode(t, a.Create(ctx, "x", 2), events.CodeAttrExists)
		got, _ := a.Get(ctx, "x")
		if string(got.Value) != "1" {
			t.Fatalf("value after refused create = %s, want 1", got.Value)
		}
		if !got.CreationTime.Equal(got.LastModified) {
			t.Fatalf("on create creation_time %v != last_modified %v", got.CreationTime, got.LastModified)
		}
	})
}

func TestUpdateOfAMissingAttributeIsE009002(t *testing.T) {
	scopes(t, func(t *testing.T, f *fixture, a *client.Attr) {
		ctx := ctxT(t)
		expectCode(t, a.Update(ctx, "nope", 1), events.CodeNoAttr)
		if ok, _ := a.Exists(ctx, "nope"); ok {
			t.Fatal("a refused update created the attribute")
		}
		expectCode(t, a.Create(ctx, "x", 1), noError)
		expectCode(t, a.Update(ctx, "x", "two"), noError)
		got, _ := a.Get(ctx, "x")
		if string(got.Value) != `"two"` || !got.LastModified.After(got.CreationTime) {
			t.Fatalf("after update: %+v", got)
		}
	})
}

func TestUpdateManyIsAllOrNothing(t *testing.T) {
	scopes(t, func(t *testing.T, f *fixture, a *client.Attr) {
		ctx := ctxT(t)
		expectCode(t, a.CreateMany(ctx, []client.Item{{Name: "a", Value: 1}, {Name: "b", Value: 1}}), noError)
		err := a.UpdateMany(ctx, []client.Item{{Name: "a", Value: 2}, {Name: "missing", Value: 2}, {Name: "b", Value: 2}})
		expectCode(t, err, events.CodeNoAttr)
		got, _ := a.GetMany(ctx, []string{"a", "b"})
		if string(got["a"].Value) != "1" || string(got["b"].Value) != "1" {
			t.Fatalf("a refused update_many changed values: a=%s b=%s", got["a"].Value, got["b"].Value)
		}
		expectCode(t, a.UpdateMany(ctx, []client.Item{{Name: "a", Value: 3}, {Name: "b", Value: 4}}), noError)
		got, _ = a.GetMany(ctx, []string{"a", "b"})
		if string(got["a"].Value) != "3" || string(got["b"].Value) != "4" {
			t.Fatalf("update_many: a=%s b=%s", got["a"].Value, got["b"].Value)
		}
	})
}

func TestCreateManyWithOneExistingStoresNothing(t *testing.T) {
	scopes(t, func(t *testing.T, f *fixture, a *client.Attr) {
		ctx := ctxT(t)
		expectCode(t, a.Create(ctx, "b", 1), noError)
		err := a.CreateMany(ctx, []client.Item{{Name: "a", Value: 1}, {Name: "b", Value: 2}, {Name: "c", Value: 3}})
		expectCode(t, err, events.CodeAttrExists)
		names, _ := a.Names(ctx)
		if strings.Join(names, ",") != "b" {
			t.Fatalf("names after refused create_many = %v, want [b]", names)
		}
	})
}

func TestBatchNamingAnAttributeTwiceIsE008002(t *testing.T) {
	scopes(t, func(t *testing.T, f *fixture, a *client.Attr) {
		err := a.SetMany(ctxT(t), []client.Item{{Name: "a", Value: 1}, {Name: "a", Value: 2}})
		expectCode(t, err, events.CodeInvalidInput)
	})
}

func TestSetCreatesOrUpdates(t *testing.T) {
	scopes(t, func(t *testing.T, f *fixture, a *client.Attr) {
		ctx := ctxT(t)
		expectCode(t, a.Set(ctx, "s", 1, client.Expiration(time.Hour)), noError)
		first, _ := a.Get(ctx, "s")
		expectCode(t, a.Set(ctx, "s", 2), noError)
		got, _ := a.Get(ctx, "s")
		if string(got.Value) != "2" || !got.CreationTime.Equal(first.CreationTime) || !got.ExpirationTime.Equal(first.ExpirationTime) {
			t.Fatalf("set as update must keep creation time and expiry: first %+v, then %+v", first, got)
		}
	})
}

func TestDeleteOfMissingNamesIsNotAnError(t *testing.T) {
	scopes(t, func(t *testing.T, f *fixture, a *client.Attr) {
		ctx := ctxT(t)
		expectCode(t, a.Delete(ctx, "never"), noError)
		expectCode(t, a.CreateMany(ctx, []client.Item{{Name: "a", Value: 1}, {Name: "b", Value: 1}}), noError)
		expectCode(t, a.DeleteMany(ctx, []string{"a", "never"}), noError)
		names, _ := a.Names(ctx)
		if strings.Join(names, ",") != "b" {
			t.Fatalf("names = %v, want [b]", names)
		}
	})
}

func TestNamesAreSortedBytewiseAndEmptyIsAnEmptyList(t *testing.T) {
	f := newFixture(t, nil)
	u, _ := f.alice.User(ctxT(t))
	_, body := rawJSON(t, f.srv, "user.attr.names", map[string]any{"ust": f.alice.UST, "current_app": "CRM"})
	if r, ok := body["result"].([]any); !ok || len(r) != 0 {
		t.Fatalf("names with none: %v, want []", body["result"])
	}
	for _, n := range []string{"b", "B", "a", "é", "_"} {
		expectCode(t, u.Attr.Create(ctxT(t), n, 1), noError)
	}
	names, _ := u.Attr.Names(ctxT(t))
	if got := strings.Join(names, ","); got != "B,_,a,b,é" {
		t.Fatalf("names = %s, want byte order B,_,a,b,é", got)
	}
}

func TestGetAndExistsWithDataAlwaysAnswerAMap(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "a", 1), noError)
	_, body := rawJSON(t, f.srv, "user.attr.get", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "data": []string{"a"}})
	res, ok := body["result"].(map[string]any)
	if !ok || res["a"].(map[string]any)["found"] != true {
		t.Fatalf("get with one-name data: %v", body)
	}
	_, body = rawJSON(t, f.srv, "user.attr.exists", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "data": []string{"a", "z"}})
	if res, ok := body["result"].(map[string]any); !ok || res["a"] != true || res["z"] != false {
		t.Fatalf("exists with data: %v", body)
	}
	_, body = rawJSON(t, f.srv, "user.attr.exists", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "name": "a"})
	if body["result"] != true {
		t.Fatalf("exists with name: %v", body)
	}
	got, err := u.Attr.Get(ctx, "z")
	if err != nil || got.Found {
		t.Fatalf("get of a missing name: %+v %v", got, err)
	}
}

func TestNeitherNameNorDataIsE008002(t *testing.T) {
	f := newFixture(t, nil)
	for _, op := range []string{"create", "update", "set", "get", "delete", "exists"} {
		_, body := rawJSON(t, f.srv, "user.attr."+op, map[string]any{"ust": f.alice.UST, "current_app": "CRM"})
		if subStatus(body) != "E008002" {
			t.Fatalf("%s without name or data: %v", op, body)
		}
	}
}

func TestNamesRoundTripExactly(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	names := []string{"a.b", "a:b", "a+b", "a b", "ünï©ødé", "日本語", "=41", "x/y", ".lead", "trail.", "a..b", "*", ">",
		strings.Repeat("n", 191), strings.Repeat("é", 95)}
	for _, n := range names {
		if err := u.Attr.Create(ctx, n, n); err != nil {
			t.Fatalf("create %q: %v", n, err)
		}
		got, err := u.Attr.Get(ctx, n)
		var v string
		if err != nil || !got.Found || got.Name != n || got.Decode(&v) != nil || v != n {
			t.Fatalf("get %q: %+v %v", n, got, err)
		}
	}
	listed, _ := u.Attr.Names(ctx)
	if len(listed) != len(names) {
		t.Fatalf("names lists %d, want %d: %q", len(listed), len(names), listed)
	}
	// Case-sensitive, no normalisation.
	if ok, _ := u.Attr.Exists(ctx, "A.B"); ok {
		t.Fatal("names must be case-sensitive")
	}
}

func TestBadNamesAreE008002(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	for _, n := range []string{"", strings.Repeat("n", 192), strings.Repeat("é", 96), "a\x00b", "tab\there", "new\nline", "del\x7f"} {
		expectCode(t, u.Attr.Create(ctx, n, 1), events.CodeInvalidInput)
	}
}

func TestValuesRoundTripAsTheSameJSON(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	for i, v := range []string{`null`, `12345678901234567890123`, `-9007199254740993`, `1.5e300`, `"s"`, `{"a":[1,{"b":null}],"c":true}`, `[]`, `""`, `0`, `false`} {
		name := "v" + string(rune('a'+i))
		if err := u.Attr.Create(ctx, name, json.RawMessage(v)); err != nil {
			t.Fatalf("create %s: %v", v, err)
		}
		got, err := u.Attr.Get(ctx, name)
		if err != nil || !got.Found || string(got.Value) != v {
			t.Fatalf("value %s came back as %s (%v)", v, got.Value, err)
		}
	}
}

func TestOversizedValueAndTooManyItemsAreE008002(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "big", strings.Repeat("x", 64<<10)), events.CodeInvalidInput)
	items := make([]client.Item, 1001)
	for i := range items {
		items[i] = client.Item{Name: "n" + strings.Repeat("x", i%7) + string(rune('A'+i%26)) + json.Number(string(rune('0'+i%10))).String() + strings.Repeat("y", i/70), Value: i}
	}
	expectCode(t, u.Attr.SetMany(ctx, items), events.CodeInvalidInput)
	expectCode(t, u.Attr.SetMany(ctx, items[:10]), noError)
}

func TestExpiredAttributesAreAbsentAndTheNameIsFreeAgain(t *testing.T) {
	scopes(t, func(t *testing.T, f *fixture, a *client.Attr) {
		ctx := ctxT(t)
		expectCode(t, a.Create(ctx, "e", 1, client.Expiration(time.Second)), noError)
		expectCode(t, a.Create(ctx, "keep", 1), noError)
		got, _ := a.Get(ctx, "e")
		if !got.Found || got.ExpirationTime.Sub(got.CreationTime) != time.Second {
			t.Fatalf("expiration_time - creation_time = %v, want 1s", got.ExpirationTime.Sub(got.CreationTime))
		}
		time.Sleep(time.Until(got.ExpirationTime) + 50*time.Millisecond) // expiry test: the sleep is the point
		if got, _ := a.Get(ctx, "e"); got.Found {
			t.Fatal("expired attribute still found")
		}
		if ok, _ := a.Exists(ctx, "e"); ok {
			t.Fatal("expired attribute exists")
		}
		names, _ := a.Names(ctx)
		if strings.Join(names, ",") != "keep" {
			t.Fatalf("names = %v", names)
		}
		expectCode(t, a.Update(ctx, "e", 2), events.CodeNoAttr)
		expectCode(t, a.Create(ctx, "e", 3), noError)
		if got, _ := a.Get(ctx, "e"); got.ExpirationTime.Year() != 9999 {
			t.Fatalf("re-created without expiration: expires %v, want never", got.ExpirationTime)
		}
	})
}

func TestUpdateKeepsExpiryUnlessGivenAndNegativeIsE008002(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "x", 1, client.Expiration(time.Hour)), noError)
	first, _ := u.Attr.Get(ctx, "x")
	expectCode(t, u.Attr.Update(ctx, "x", 2), noError)
	second, _ := u.Attr.Get(ctx, "x")
	if !second.ExpirationTime.Equal(first.ExpirationTime) {
		t.Fatalf("update without expiration changed expiry %v -> %v", first.ExpirationTime, second.ExpirationTime)
	}
	expectCode(t, u.Attr.Update(ctx, "x", 3, client.Expiration(2*time.Hour)), noError)
	third, _ := u.Attr.Get(ctx, "x")
	if d := third.ExpirationTime.Sub(third.LastModified); d != 2*time.Hour {
		t.Fatalf("positive expiration on update: expires %v after the update, want 2h", d)
	}
	_, body := rawJSON(t, f.srv, "user.attr.create", map[string]any{"ust": f.alice.UST, "current_app": "CRM", "name": "n", "value": 1, "expiration": -1})
	if subStatus(body) != "E008002" {
		t.Fatalf("negative expiration: %v", body)
	}
}

func TestItemFieldsOverrideTopLevelDefaults(t *testing.T) {
	f := newFixture(t, nil)
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	err := u.Attr.CreateMany(ctx, []client.Item{
		{Name: "default", Value: "d"},
		{Name: "own", Value: "o", Expiration: client.Duration(time.Hour), Encrypt: client.Bool(false)},
	}, client.Expiration(10*time.Minute), client.Encrypt(true))
	expectCode(t, err, noError)
	got, _ := u.Attr.GetMany(ctx, []string{"default", "own"})
	d, o := got["default"], got["own"]
	if !d.IsEncrypted || d.ExpirationTime.Sub(d.CreationTime) != 10*time.Minute {
		t.Fatalf("default item: %+v", d)
	}
	if o.IsEncrypted || o.ExpirationTime.Sub(o.CreationTime) != time.Hour {
		t.Fatalf("item with its own fields: %+v", o)
	}
}

func TestStrictTypesAreE008002(t *testing.T) {
	f := newFixture(t, nil)
	base := func() map[string]any {
		return map[string]any{"ust": f.alice.UST, "current_app": "CRM", "name": "n", "value": 1}
	}
	for field, bad := range map[string]any{"expiration": "10", "encrypt": "true", "name": 5, "data": "x"} {
		b := base()
		b[field] = bad
		_, body := rawJSON(t, f.srv, "user.attr.create", b)
		if subStatus(body) != "E008002" {
			t.Fatalf("%s=%v: %v", field, bad, body)
		}
	}
	for _, exp := range []string{`1.5`, `true`, `1e3`} {
		_, body := raw(t, f.srv, "user.attr.create", []byte(`{"ust":"`+f.alice.UST+`","current_app":"CRM","name":"n","value":1,"expiration":`+exp+`}`), nil)
		if subStatus(body) != "E008002" {
			t.Fatalf("expiration %s: %v", exp, body)
		}
	}
	_, body := raw(t, f.srv, "user.attr.get", []byte(`{"ust":"`+f.alice.UST+`","current_app":"CRM","name":"n","decrypt":"no"}`), nil)
	if subStatus(body) != "E008002" {
		t.Fatalf("decrypt not a boolean: %v", body)
	}
}

func TestLimitsAreConfigurable(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.Limits = api.Limits{MaxValueBytes: 10, MaxItems: 2, MaxBodyBytes: 4096} })
	ctx := ctxT(t)
	u, _ := f.alice.User(ctx)
	expectCode(t, u.Attr.Create(ctx, "a", "123456"), noError)
	expectCode(t, u.Attr.Create(ctx, "b", "1234567890"), events.CodeInvalidInput)
	expectCode(t, u.Attr.CreateMany(ctx, []client.Item{{Name: "c", Value: 1}, {Name: "d", Value: 1}, {Name: "e", Value: 1}}), events.CodeInvalidInput)
	_, body := raw(t, f.srv, "user.attr.get", []byte(`{"current_app":"CRM","ust":"`+f.alice.UST+`","name":"`+strings.Repeat("x", 5000)+`"}`), nil)
	if subStatus(body) != "E008002" {
		t.Fatalf("a body over the configured limit: %v", body)
	}
	st, _, rb := httpDo(t, f.srv, "GET", "/zato/sso/user/attr", `{"current_app":"CRM","name":"`+strings.Repeat("x", 5000)+`"}`, nil)
	refused(t, st, rb, 413, "E008002")
}
