package events

import (
	"errors"
	"fmt"
	"time"
)

// Code is one of the wire contract's status codes (CONTRACT.md), or one of the two
// transport-level codes that have no sub_status (CodeBadRequest, CodeInternal).
type Code string

// The contract's codes. Each transport maps them to its own statuses in one place.
const (
	// CodeBadApp: current_app is not a configured application (HTTP 200, status "error").
	CodeBadApp Code = "E004001"
	// CodeNotAllowed: wrong credentials, another user's data without being a super-user, unknown user_id.
	CodeNotAllowed Code = "E005001"
	// CodeNoSession: unknown, expired or logged-out UST.
	CodeNoSession Code = "E007001"
	// CodeInvalidOperation: an operation that cannot be done on its target, as Zato
	// answers a user's deletion of themselves or of a user that does not exist.
	CodeInvalidOperation Code = "E008001"
	// CodeInvalidInput: a field is present but its value breaks a rule.
	CodeInvalidInput Code = "E008002"
	// CodeOutcomeUnknown: the event is in the log but its decision did not arrive in time.
	CodeOutcomeUnknown Code = "E008004"
	// CodeAttrExists: create of a live attribute.
	CodeAttrExists Code = "E009001"
	// CodeNoAttr: update of a missing or expired attribute.
	CodeNoAttr Code = "E009002"
	// CodeUsernameExists: create user with a username that is taken (Zato's E001002).
	CodeUsernameExists Code = "E001002"

	// CodeBadRequest is a request that cannot be read: malformed JSON, a missing required
	// field. REST answers 400 with the "Bad request" envelope.
	CodeBadRequest Code = "bad_request"
	// CodeInternal is an unexpected failure. Transports answer it without details.
	CodeInternal Code = "internal"
)

// Error is attrd's one error type: a contract code, a message for logs and humans, and
// an optional wrapped cause. Match it with errors.Is against the Err* sentinels (which
// compare codes) or errors.As to read the code.
type Error struct {
	Code Code
	Msg  string
	Err  error
	// RetryAfter, when set, tells the client when to come back: a load bound or a
	// login throttle refused it for about that long. Transports send it as a
	// Retry-After header (whole seconds, rounded up).
	RetryAfter time.Duration
}

// Errorf returns an *Error with the code and a formatted message; %w wraps a cause.
func Errorf(code Code, format string, args ...any) *Error {
	err := fmt.Errorf(format, args...)
	return &Error{Code: code, Msg: err.Error(), Err: errors.Unwrap(err)}
}

// Error implements error.
func (e *Error) Error() string {
	if e.Msg == "" {
		return string(e.Code)
	}
	return string(e.Code) + ": " + e.Msg
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Is reports whether target is an *Error with the same code, so that
// errors.Is(err, events.ErrNoAttr) matches any E009002.
func (e *Error) Is(target error) bool {
	var t *Error
	if !errors.As(target, &t) {
		return false
	}
	return t.Code == e.Code
}

// Sentinels for errors.Is; each matches any *Error with its code.
var (
	ErrBadApp       = &Error{Code: CodeBadApp}
	ErrNotAllowed   = &Error{Code: CodeNotAllowed}
	ErrNoSession    = &Error{Code: CodeNoSession}
	ErrInvalidInput = &Error{Code: CodeInvalidInput}
	// ErrInvalidOperation matches E008001.
	ErrInvalidOperation = &Error{Code: CodeInvalidOperation}
	ErrOutcomeUnknown   = &Error{Code: CodeOutcomeUnknown}
	ErrAttrExists       = &Error{Code: CodeAttrExists}
	ErrNoAttr           = &Error{Code: CodeNoAttr}
	ErrUsernameExists   = &Error{Code: CodeUsernameExists}
	ErrBadRequest       = &Error{Code: CodeBadRequest}
	ErrInternal         = &Error{Code: CodeInternal}
)

// RetryAfterOf returns when err says to come back (its *Error's RetryAfter), or 0.
func RetryAfterOf(err error) time.Duration {
	var e *Error
	if errors.As(err, &e) {
		return e.RetryAfter
	}
	return 0
}

// CodeOf returns the contract code of err: its *Error's code, "" for nil, and
// CodeInternal for anything else.
func CodeOf(err error) Code {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return CodeInternal
}
