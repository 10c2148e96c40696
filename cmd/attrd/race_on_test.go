//go:build race

package main

// raceDetector is true when the tests run with -race, which makes CPU-bound work such
// as argon2id about five times slower (a hash of the real cost: ~135 ms against ~25 ms).
const raceDetector = true
