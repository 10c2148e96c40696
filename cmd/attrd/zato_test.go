package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/attrd/attrd/events"
)

// TestWhereAttrdDiffersFromZato proves attrd's side of every difference docs/ZATO.md
// lists, over REST, as a Zato SSO client calls it: one subtest per row of its table.
func TestWhereAttrdDiffersFromZato(t *testing.T) {
	f := newFixture(t, nil)
	admin := restLogin(t, f.srv, "admin", adminPassword)
	alice := restLogin(t, f.srv, "alice", "alice-pw")
	call := func(t *testing.T, method, path, ust string, body map[string]any) (int, map[string]any) {
		t.Helper()
		body["current_app"] = "CRM"
		if _, ok := body["ust"]; !ok && !strings.HasPrefix(path, "/zato/sso/session") {
			body["ust"] = ust
		}
		st, _, out := httpDo(t, f.srv, method, path, body, nil)
		return st, out
	}
	const attr = "/zato/sso/user/attr"
	get := func(t *testing.T, name string, decrypt *bool) map[string]any {
		t.Helper()
		body := map[string]any{"name": name}
		if decrypt != nil {
			body["decrypt"] = *decrypt
		}
		st, out := call(t, "GET", attr, alice, body)
		ok(t, st, out)
		return out
	}
	no := false

	t.Run("update_of_a_missing_attribute_is_E009002", func(t *testing.T) {
		st, out := call(t, "PATCH", attr, alice, map[string]any{"name": "never-created", "value": 1})
		refused(t, st, out, 403, "E009002")
	})
	t.Run("update_without_encrypt_keeps_the_attributes_setting", func(t *testing.T) {
		st, out := call(t, "POST", attr, alice, map[string]any{"name": "pin", "value": "1234", "encrypt": true})
		ok(t, st, out)
		st, out = call(t, "PATCH", attr, alice, map[string]any{"name": "pin", "value": "5678"})
		ok(t, st, out)
		sealed := get(t, "pin", &no)
		if sealed["is_encrypted"] != true || sealed["value"] == "5678" {
			t.Fatalf("stored: %v", sealed)
		}
		if v := get(t, "pin", nil)["value"]; v != "5678" {
			t.Fatalf("read: %v", v)
		}
	})
	t.Run("update_with_encrypt_changes_the_stored_flag", func(t *testing.T) {
		call(t, "POST", attr, alice, map[string]any{"name": "note", "value": "plain"})
		st, out := call(t, "PATCH", attr, alice, map[string]any{"name": "note", "value": "now sealed", "encrypt": true})
		ok(t, st, out)
		if g := get(t, "note", &no); g["is_encrypted"] != true || g["value"] == "now sealed" {
			t.Fatalf("stored: %v", g)
		}
	})
	t.Run("a_regular_user_reaches_their_own_attributes_over_REST", func(t *testing.T) {
		st, out := call(t, "PUT", attr, alice, map[string]any{"name": "mine", "value": true})
		ok(t, st, out)
		st, out = call(t, "PUT", "/zato/sso/session/attr", "", map[string]any{"current_ust": alice, "target_ust": alice, "name": "s", "value": 1})
		ok(t, st, out)
	})
	t.Run("get_decrypts_by_default_over_REST", func(t *testing.T) {
		if v := get(t, "pin", nil)["value"]; v != "5678" {
			t.Fatalf("a GET without decrypt: %v", v)
		}
	})
	t.Run("get_with_several_names_answers_a_map", func(t *testing.T) {
		st, out := call(t, "GET", attr, alice, map[string]any{"data": []string{"mine", "absent"}})
		ok(t, st, out)
		res := out["result"].(map[string]any)
		if res["mine"].(map[string]any)["value"] != true || res["absent"].(map[string]any)["found"] != false {
			t.Fatalf("%v", out)
		}
	})
	t.Run("one_name_in_a_list_answers_a_map", func(t *testing.T) {
		st, out := call(t, "GET", attr+"/exists", alice, map[string]any{"data": []string{"mine"}})
		ok(t, st, out)
		if res, isMap := out["result"].(map[string]any); !isMap || res["mine"] != true {
			t.Fatalf("%v", out)
		}
	})
	t.Run("an_expired_attribute_frees_its_name_at_once", func(t *testing.T) {
		st, out := call(t, "POST", attr, alice, map[string]any{"name": "otp", "value": "1", "expiration": 1})
		ok(t, st, out)
		time.Sleep(1100 * time.Millisecond)
		st, out = call(t, "POST", attr, alice, map[string]any{"name": "otp", "value": "2"})
		ok(t, st, out)
	})
	t.Run("an_update_with_a_falsy_value_stores_it", func(t *testing.T) {
		call(t, "POST", attr, alice, map[string]any{"name": "count", "value": 5})
		for _, v := range []any{0, "", false, nil} {
			st, out := call(t, "PATCH", attr, alice, map[string]any{"name": "count", "value": v})
			ok(t, st, out)
			if g := get(t, "count", nil); g["value"] != v && !(v == 0 && g["value"] == float64(0)) {
				t.Fatalf("after an update to %#v: %v", v, g["value"])
			}
		}
	})
	t.Run("times_are_RFC3339_in_UTC", func(t *testing.T) {
		g := get(t, "mine", nil)
		ct, _ := g["creation_time"].(string)
		if _, err := time.Parse(time.RFC3339Nano, ct); err != nil || !strings.HasSuffix(ct, "Z") || g["expiration_time"] != "9999-12-31T00:00:00Z" {
			t.Fatalf("%v", g)
		}
	})
	t.Run("an_encrypted_value_may_be_any_JSON", func(t *testing.T) {
		st, out := call(t, "POST", attr, alice, map[string]any{"name": "card", "value": map[string]any{"last4": "4242", "exp": []int{12, 29}}, "encrypt": true})
		ok(t, st, out)
		if b, _ := json.Marshal(get(t, "card", nil)["value"]); string(b) != `{"exp":[12,29],"last4":"4242"}` {
			t.Fatalf("%s", b)
		}
	})
	t.Run("set_with_user_id_writes_to_that_user", func(t *testing.T) {
		st, out := call(t, "PUT", attr, admin, map[string]any{"user_id": f.aliceID, "name": "set-by-admin", "value": 1})
		ok(t, st, out)
		if g := get(t, "set-by-admin", nil); g["found"] != true {
			t.Fatalf("alice's attribute: %v", g)
		}
		st, out = call(t, "GET", attr, admin, map[string]any{"name": "set-by-admin"})
		ok(t, st, out)
		if out["found"] != false {
			t.Fatalf("the admin's own: %v", out)
		}
	})
	t.Run("a_name_is_191_bytes_not_characters", func(t *testing.T) {
		st, out := call(t, "POST", attr, alice, map[string]any{"name": strings.Repeat("é", 100), "value": 1}) // 200 bytes
		refused(t, st, out, 403, "E008002")
	})
	t.Run("user_ids_are_ULIDs", func(t *testing.T) {
		if !events.ValidUserID(f.aliceID) || len(f.aliceID) != 26 {
			t.Fatalf("%q", f.aliceID)
		}
	})
	t.Run("a_batch_is_one_request_all_or_nothing_for_update_many", func(t *testing.T) {
		st, out := call(t, "PATCH", attr, alice, map[string]any{"data": []map[string]any{{"name": "mine", "value": 2}, {"name": "missing-one", "value": 3}}})
		refused(t, st, out, 403, "E009002")
		if g := get(t, "mine", nil); g["value"] != true {
			t.Fatalf("a refused batch changed mine: %v", g)
		}
	})
}
