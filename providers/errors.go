package providers

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// ErrNotFound reports that an instance does not exist.
// errors.Is(err, ErrNotFound) holds for every error of KindNotFound.
var ErrNotFound = errors.New("instance not found")

// ErrClosed reports a call on a provider that has been shut down.
var ErrClosed = errors.New("provider is shut down")

// Kind classifies a provider error. The kind survives the plugin process
// boundary.
type Kind int

// Error kinds.
const (
	// KindUnknown is an error the provider did not classify.
	KindUnknown Kind = iota
	// KindNotFound: the instance does not exist.
	KindNotFound
	// KindQuotaExceeded: a cloud quota (CPUs, instances, addresses) is used up.
	KindQuotaExceeded
	// KindRateLimited: the API refused the call for now (HTTP 429, throttling).
	KindRateLimited
	// KindCapacityExhausted: the zone or pool has no capacity for the
	// requested machine type.
	KindCapacityExhausted
	// KindPermanent: retrying the same call will fail the same way.
	KindPermanent
	// KindTransient: retrying the same call later may succeed.
	KindTransient
	// KindInvalidArgument: the call or the settings are malformed.
	KindInvalidArgument
)

var kindNames = map[Kind]string{
	KindUnknown:           "unknown",
	KindNotFound:          "not_found",
	KindQuotaExceeded:     "quota_exceeded",
	KindRateLimited:       "rate_limited",
	KindCapacityExhausted: "capacity_exhausted",
	KindPermanent:         "permanent",
	KindTransient:         "transient",
	KindInvalidArgument:   "invalid_argument",
}

// String returns the snake_case name of k, as used in metrics labels.
func (k Kind) String() string {
	if s, ok := kindNames[k]; ok {
		return s
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// ParseKind returns the Kind named s (as returned by Kind.String).
func ParseKind(s string) (Kind, error) {
	for k, name := range kindNames {
		if name == s {
			return k, nil
		}
	}
	return KindUnknown, fmt.Errorf("unknown error kind %q", s)
}

// Error is a classified provider error.
type Error struct {
	Kind Kind
	// Msg describes the failure; Err, if set, is appended.
	Msg string
	// RetryAfter is the wait the API asked for (KindRateLimited).
	RetryAfter time.Duration
	// Scope is the zone, region or pool concerned (quota, capacity).
	Scope string
	// Err is the underlying cause, if any.
	Err error
}

// Error implements error.
func (e *Error) Error() string {
	switch {
	case e.Msg != "" && e.Err != nil:
		return e.Msg + ": " + e.Err.Error()
	case e.Msg != "":
		return e.Msg
	case e.Err != nil:
		return e.Err.Error()
	}
	return e.Kind.String()
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Is makes errors.Is(err, ErrNotFound) true for KindNotFound.
func (e *Error) Is(target error) bool {
	return target == ErrNotFound && e.Kind == KindNotFound
}

// NotFound returns a KindNotFound error for instance id.
func NotFound(id string) error {
	return &Error{Kind: KindNotFound, Msg: fmt.Sprintf("instance %q not found", id)}
}

// QuotaExceeded returns a KindQuotaExceeded error for scope (may be empty).
func QuotaExceeded(scope string, cause error) error {
	return &Error{Kind: KindQuotaExceeded, Msg: withScope("quota exceeded", scope), Scope: scope, Err: cause}
}

// RateLimited returns a KindRateLimited error asking to wait retryAfter
// (0 when the API gave no hint).
func RateLimited(retryAfter time.Duration, cause error) error {
	msg := "rate limited"
	if retryAfter > 0 {
		msg = fmt.Sprintf("rate limited, retry after %s", retryAfter)
	}
	return &Error{Kind: KindRateLimited, Msg: msg, RetryAfter: retryAfter, Err: cause}
}

// CapacityExhausted returns a KindCapacityExhausted error for scope.
func CapacityExhausted(scope string, cause error) error {
	return &Error{Kind: KindCapacityExhausted, Msg: withScope("capacity exhausted", scope), Scope: scope, Err: cause}
}

// Permanent marks cause as an error that retrying will not fix.
func Permanent(cause error) error {
	return &Error{Kind: KindPermanent, Err: cause}
}

// Transient marks cause as an error that retrying later may fix.
func Transient(cause error) error {
	return &Error{Kind: KindTransient, Err: cause}
}

// InvalidArgument marks cause as a malformed call or settings.
func InvalidArgument(cause error) error {
	return &Error{Kind: KindInvalidArgument, Err: cause}
}

func withScope(msg, scope string) string {
	if scope == "" {
		return msg
	}
	return msg + " in " + scope
}

// KindOf classifies err. A context deadline counts as transient (the
// outcome of the call is unknown); unclassified errors are KindUnknown.
func KindOf(err error) Kind {
	if err == nil {
		return KindUnknown
	}
	if e, ok := errors.AsType[*Error](err); ok {
		return e.Kind
	}
	switch {
	case errors.Is(err, ErrNotFound):
		return KindNotFound
	case errors.Is(err, ErrClosed):
		return KindPermanent
	case errors.Is(err, context.DeadlineExceeded):
		return KindTransient
	}
	return KindUnknown
}

// IsNotFound reports whether err says the instance does not exist.
func IsNotFound(err error) bool { return KindOf(err) == KindNotFound }

// IsQuotaExceeded reports whether err is a quota error, and its scope.
func IsQuotaExceeded(err error) (scope string, ok bool) {
	if e, found := errors.AsType[*Error](err); found && e.Kind == KindQuotaExceeded {
		return e.Scope, true
	}
	return "", false
}

// IsRateLimited reports whether err is a rate limit, and the wait the API
// asked for (0 if none).
func IsRateLimited(err error) (retryAfter time.Duration, ok bool) {
	if e, found := errors.AsType[*Error](err); found && e.Kind == KindRateLimited {
		return e.RetryAfter, true
	}
	return 0, false
}

// IsCapacityExhausted reports whether err says a zone or pool has no
// capacity, and which.
func IsCapacityExhausted(err error) (scope string, ok bool) {
	if e, found := errors.AsType[*Error](err); found && e.Kind == KindCapacityExhausted {
		return e.Scope, true
	}
	return "", false
}

// IsPermanent reports whether retrying the call unchanged will fail again
// (KindPermanent, KindInvalidArgument).
func IsPermanent(err error) bool {
	k := KindOf(err)
	return k == KindPermanent || k == KindInvalidArgument
}

// IsTransient reports whether retrying the call later may succeed:
// KindTransient, KindRateLimited, KindCapacityExhausted and
// KindQuotaExceeded (quota frees up as instances are deleted).
func IsTransient(err error) bool {
	switch KindOf(err) {
	case KindTransient, KindRateLimited, KindCapacityExhausted, KindQuotaExceeded:
		return true
	}
	return false
}
