package api

import (
	"crypto/pbkdf2"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/base64"
	"strconv"
	"strings"
)

// Password hashes imported from Zato SSO (attrd import): passlib's pbkdf2_sha512,
// "$pbkdf2-sha512$<rounds>$<salt>$<checksum>", salt and checksum in passlib's adapted
// base64 ("." for "+", no padding), the checksum PBKDF2-HMAC-SHA512 of the UTF-8
// password, 64 bytes. attrd checks them at login and replaces them with its own
// (argon2id) at the first that succeeds (user.rehashed).

// PBKDF2Prefix begins an imported passlib pbkdf2_sha512 hash.
const PBKDF2Prefix = "$pbkdf2-sha512$"

// maxImportedRounds bounds the work one check of an imported hash may cost (Zato's
// default is 100,000 rounds; a hash asking for more is refused, not computed).
const maxImportedRounds = 2_000_000

// checkPBKDF2 reports whether password matches a passlib pbkdf2_sha512 hash.
func checkPBKDF2(password, hash string) bool {
	parts := strings.Split(strings.TrimPrefix(hash, PBKDF2Prefix), "$")
	if !strings.HasPrefix(hash, PBKDF2Prefix) || len(parts) != 3 {
		return false
	}
	rounds, err := strconv.Atoi(parts[0])
	if err != nil || rounds < 1 || rounds > maxImportedRounds {
		return false
	}
	salt, err1 := ab64(parts[1])
	want, err2 := ab64(parts[2])
	if err1 != nil || err2 != nil || len(want) == 0 {
		return false
	}
	got, err := pbkdf2.Key(sha512.New, password, salt, rounds, len(want))
	return err == nil && subtle.ConstantTimeCompare(got, want) == 1
}

// ab64 decodes passlib's adapted base64.
func ab64(s string) ([]byte, error) {
	return base64.RawStdEncoding.DecodeString(strings.ReplaceAll(s, ".", "+"))
}

// PassLibHash makes a passlib pbkdf2_sha512 hash (tests and tools that build Zato
// databases).
func PassLibHash(password string, salt []byte, rounds int) string {
	key, _ := pbkdf2.Key(sha512.New, password, salt, rounds, 64)
	enc := func(b []byte) string { return strings.ReplaceAll(base64.RawStdEncoding.EncodeToString(b), "+", ".") }
	return PBKDF2Prefix + strconv.Itoa(rounds) + "$" + enc(salt) + "$" + enc(key)
}
