// Package events is attrd's vocabulary: the event types and their msgpack wire form,
// the records of the projection, subject and key naming (with a reversible encoding of
// attribute names), the stream and bucket configuration, and the contract's error codes.
//
// It imports nothing else of attrd's; the projector and the API both speak it.
package events
