package protocol

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"
)

// HTTPError is a non-2xx answer of the control plane.
type HTTPError struct {
	StatusCode int
	Code       string // the answer's {"error":{"code"}} when it has one
	Message    string
	RetryAfter time.Duration // parsed Retry-After, 0 when absent
}

func (e *HTTPError) Error() string {
	if e.Code != "" {
		return fmt.Sprintf("control plane: http %d: %s: %s", e.StatusCode, e.Code, e.Message)
	}
	if e.Message != "" {
		return fmt.Sprintf("control plane: http %d: %s", e.StatusCode, e.Message)
	}
	return fmt.Sprintf("control plane: http %d", e.StatusCode)
}

// Auth reports whether the control plane refused the agent's credentials.
func (e *HTTPError) Auth() bool {
	return e.StatusCode == http.StatusUnauthorized || e.StatusCode == http.StatusForbidden
}

// RetryableError marks an error worth retrying later: the network failed,
// the control plane was overloaded (429) or failing (5xx).
type RetryableError struct {
	Err error
	// After is the minimum wait the control plane asked for (Retry-After).
	After time.Duration
}

func (e *RetryableError) Error() string { return e.Err.Error() }

// Unwrap returns the cause.
func (e *RetryableError) Unwrap() error { return e.Err }

// Retryable reports true.
func (e *RetryableError) Retryable() bool { return true }

// IsRetryable reports whether err (or its chain) says it is retryable.
func IsRetryable(err error) bool {
	var r interface{ Retryable() bool }
	return errors.As(err, &r) && r.Retryable()
}

// RetryAfter returns the wait the control plane asked for with a
// Retry-After header on any non-2xx answer (a 503 or 429, a 401 or 400
// too), or 0.
func RetryAfter(err error) time.Duration {
	var r *RetryableError
	if errors.As(err, &r) && r.After > 0 {
		return r.After
	}
	var h *HTTPError
	if errors.As(err, &h) {
		return h.RetryAfter
	}
	return 0
}

// IsAuth reports whether err is the control plane refusing the credentials.
func IsAuth(err error) bool {
	var h *HTTPError
	return errors.As(err, &h) && h.Auth()
}

// StatusError is the error the Client returns for an answer with a status
// outside 2xx: an *HTTPError, wrapped in a *RetryableError when the status
// is worth retrying (408, 429, 5xx). An in-process control plane returns
// it for the refusals it would answer over HTTP.
func StatusError(status int, code, message string, retryAfter time.Duration) error {
	herr := &HTTPError{StatusCode: status, Code: code, Message: message, RetryAfter: retryAfter}
	if retryableStatus(status) {
		return &RetryableError{Err: herr, After: retryAfter}
	}
	return herr
}

// retryableStatus classifies an HTTP status: 408, 429 and 5xx are worth
// retrying, other 4xx are not.
func retryableStatus(code int) bool {
	return code == http.StatusRequestTimeout || code == http.StatusTooManyRequests || code >= 500
}

// parseRetryAfter reads a Retry-After header: delay-seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil {
		if s < 0 {
			return 0
		}
		if s > math.MaxInt64/int(time.Second) {
			return math.MaxInt64 // would overflow: the longest wait there is
		}
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}
