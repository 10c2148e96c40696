package api

import "testing"

// The vector is Python's: hashlib.pbkdf2_hmac('sha512', 'pässword'.encode(),
// b'0123456789abcdef', 1000), in passlib's adapted base64, as Zato stores it.
const passlibVector = "$pbkdf2-sha512$1000$MDEyMzQ1Njc4OWFiY2RlZg$20MTVzg/n3H4pkjP7rPbs9uXGvJYlRG4j32EBHiNeegrbijWGjc63LMIJzA0jtIUGL4tJ0FCjR9uzA3gQvH7WA"

func TestAnImportedPasslibHashChecksItsPasswordAndNoOther(t *testing.T) {
	if !CheckPassword("pässword", passlibVector) {
		t.Fatal("the right password is refused")
	}
	for _, wrong := range []string{"password", "pässword ", ""} {
		if CheckPassword(wrong, passlibVector) {
			t.Errorf("%q is accepted", wrong)
		}
	}
	if got := PassLibHash("pässword", []byte("0123456789abcdef"), 1000); got != passlibVector {
		t.Errorf("PassLibHash: %s", got)
	}
}

func TestAMalformedOrTooCostlyImportedHashIsRefusedWithoutWork(t *testing.T) {
	for _, h := range []string{
		"$pbkdf2-sha512$",
		"$pbkdf2-sha512$1000$MDEy",
		"$pbkdf2-sha512$x$MDEy$MDEy",
		"$pbkdf2-sha512$0$MDEy$MDEy",
		"$pbkdf2-sha512$999999999$MDEyMzQ1Njc4OWFiY2RlZg$20MTVzg", // more rounds than any login may cost
		"$pbkdf2-sha512$1000$!!$20MTVzg",
	} {
		if CheckPassword("pässword", h) {
			t.Errorf("%q accepted", h)
		}
	}
}
