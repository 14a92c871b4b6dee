package protocol

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// roundTripFunc answers every request itself: no network.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

const fuzzToken = "fuzz-secret-token-3f9a"

// FuzzAnswer has the control plane answer one request of each kind
// (register, lease, progress, complete, heartbeat) with any status,
// Retry-After and body, and a task id from a lease answer in the path.
// Nothing panics, and the client keeps its word:
//
//   - a 2xx answer is decoded exactly as encoding/json decodes it, or is a
//     RetryableError when it does not decode (an empty body is no error);
//   - any other status is an *HTTPError with that status, the answer's
//     error code and message when it has them, retryable exactly for 408,
//     429 and 5xx, an auth error exactly for 401 and 403, with a
//     non-negative Retry-After (the one asked for, when retryable);
//   - the task id is path-escaped into one path segment;
//   - no error shows the token.
func FuzzAnswer(f *testing.F) {
	lease := `{"tasks": [{"id": "3b0e6a1c-6f0e-4c55-9d57-2f1f3a0e8b21", "type": "vm.create", "vm_name": "web-1", "vm_uuid": "9d4f7e2a-1b3c-4d5e-8f6a-7b8c9d0e1f2a", "spec": {"name": "web-1", "image_url": "https://cloud-images.ubuntu.com/minimal/releases/noble/release/ubuntu-24.04-minimal-cloudimg-amd64.img", "arch": "amd64", "vcpus": 2, "memory_mb": 2048, "pool": "default"}, "attempt": 1, "lease_id": "lease-8812", "lease_expires_at": "2026-11-25T12:01:30Z", "lease_ttl_seconds": 60}]}`
	for _, s := range []struct {
		op     uint8
		status uint16
		retry  string
		task   string
		body   string
	}{
		{0, 200, "", "", `{"protocol_version": 1, "node_id": "n-7", "interval_seconds": 10}`},
		{1, 200, "", "", lease},
		{1, 200, "", "", `{"tasks": []}`},
		{1, 200, "", "", `{"tasks": [{"id": "t-2", "type": "vm.stop", "vm_uuid": "9d4f7e2a-1b3c-4d5e-8f6a-7b8c9d0e1f2a", "spec": {"force": true}, "attempt": 2, "lease_id": "l", "lease_expires_at": "2026-11-25T12:01:30+02:00"}]}`},
		{1, 200, "", "", `{"tasks": [{"id": 5, "lease_expires_at": "yesterday"}]}`},
		{2, 200, "", "3b0e6a1c-6f0e-4c55-9d57-2f1f3a0e8b21", `{"lease_expires_at": "2026-11-25T12:01:50Z", "lease_ttl_seconds": 60}`},
		{2, 200, "", "a/b?c#d%2F é", `{"lease_expires_at": "2026-11-25T12:01:50Z", "cancelled": true}`},
		{2, 409, "", "t-1", `{"error": {"code": "conflict", "message": "lease lease-8812 is not the current lease"}}`},
		{3, 200, "", "t-1", ``},
		{3, 404, "", "t-1", `{"error": {"code": "not_found", "message": "task t-1 was never issued to hv-07"}}`},
		{3, 503, "120", "t-1", `{"error": {"code": "internal", "message": "database unavailable"}}`},
		{4, 200, "", "", `{"interval_seconds": 15, "desired": {"9d4f7e2a-1b3c-4d5e-8f6a-7b8c9d0e1f2a": "running", "c0ffee00-1111-4222-8333-444455556666": "stopped"}}`},
		{4, 200, "", "", `{"desired": null}`},
		{4, 429, "Wed, 21 Oct 2065 07:28:00 GMT", "", `{"error": {"code": "rate_limited", "message": "slow down"}}`},
		{4, 401, "", "", `{"error": {"code": "unauthorized", "message": "bad token"}}`},
		{0, 403, "", "", `<html><body>403 Forbidden</body></html>`},
		{1, 502, "-5", "", "<html>\r\n<head><title>502 Bad Gateway</title></head></html>"},
		{1, 200, "", "", `<html>captive portal</html>`},
		{1, 200, "", "", `{"tasks": [`},
		{0, 400, "", "", `{"error": {"code": "", "message": "no code"}}`},
		{0, 418, "", "", `{"error": "teapot"}`},
		{1, 204, "", "", "  \n"},
		{1, 302, "", "", ""},
	} {
		f.Add(s.op, s.status, s.retry, s.task, []byte(s.body))
	}
	tokenFile := filepath.Join(f.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(fuzzToken+"\n"), 0o600); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, op uint8, code uint16, retry, taskID string, body []byte) {
		status := 100 + int(code)%900
		var asked *http.Request
		c, err := NewClient(ClientConfig{
			BaseURL: "https://cp.example:8443/", Node: "hv-07", TokenFile: tokenFile, Timeout: 5 * time.Second,
			Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
				asked = r
				h := http.Header{"Content-Type": {"application/json"}}
				if retry != "" {
					h["Retry-After"] = []string{retry}
				}
				return &http.Response{StatusCode: status, Header: h, Body: io.NopCloser(bytes.NewReader(body)),
					ContentLength: int64(len(body)), Request: r}, nil
			}),
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		var got, want any
		var path string
		switch op % 5 {
		case 0:
			path = PathRegister
			want = &RegisterResponse{}
			var r *RegisterResponse
			r, err = c.Register(ctx, NodeInfo{Name: "hv-07"})
			got = r
		case 1:
			path = PathLease
			want = &LeaseResponse{}
			var r *LeaseResponse
			r, err = c.Lease(ctx, 0, 1)
			got = r
		case 2:
			path = ProgressPath(taskID)
			want = &ProgressResponse{}
			var r *ProgressResponse
			r, err = c.Progress(ctx, taskID, "lease-8812", &api.Progress{Phase: "download"})
			got = r
		case 3:
			path = CompletePath(taskID)
			err = c.Complete(ctx, taskID, CompleteRequest{LeaseID: "lease-8812", Attempt: 1, Status: api.TaskSuccess})
		case 4:
			path = PathHeartbeat
			want = &HeartbeatResponse{}
			var r *HeartbeatResponse
			r, err = c.Heartbeat(ctx, HeartbeatRequest{Seq: 1, State: NodeReady})
			got = r
		}
		if asked == nil {
			t.Fatalf("no request sent: %v", err)
		}
		checkPath(t, asked, path, taskID, op%5)
		if err != nil && strings.Contains(err.Error(), fuzzToken) {
			t.Fatalf("error shows the token: %v", err)
		}
		if status/100 == 2 {
			checkDecoded(t, err, got, want, body)
			return
		}
		checkHTTPError(t, err, status, retry, body)
	})
}

// checkPath checks that the request went to path, with the task id as one
// escaped segment.
func checkPath(t *testing.T, r *http.Request, path, taskID string, op uint8) {
	t.Helper()
	if r.Method != http.MethodPost || r.URL.Host != "cp.example:8443" || r.URL.RawQuery != "" || r.URL.Fragment != "" {
		t.Fatalf("request %s %s", r.Method, r.URL)
	}
	if got := r.URL.EscapedPath(); got != path {
		t.Fatalf("request path %q, want %q", got, path)
	}
	if op != 2 && op != 3 {
		return
	}
	seg := strings.TrimPrefix(path, PathTaskPrefix)
	seg = seg[:strings.LastIndexByte(seg, '/')]
	if strings.ContainsAny(seg, "/?#") {
		t.Fatalf("task id %q escaped to %q: not one path segment", taskID, seg)
	}
	if id, err := url.PathUnescape(seg); err != nil || id != taskID {
		t.Fatalf("task id %q escaped to %q, which unescapes to %q (%v)", taskID, seg, id, err)
	}
}

// checkDecoded checks the outcome of a 2xx answer: got (a typed nil
// pointer when there was an error) against want decoded from body.
func checkDecoded(t *testing.T, err error, got, want any, body []byte) {
	t.Helper()
	var herr *HTTPError
	if errors.As(err, &herr) || IsAuth(err) {
		t.Fatalf("2xx answer: %v", err)
	}
	if want == nil || len(bytes.TrimSpace(body)) == 0 {
		if err != nil {
			t.Fatalf("2xx answer with nothing to decode: %v", err)
		}
		if want != nil && (reflect.ValueOf(got).IsNil() || !reflect.ValueOf(got).Elem().IsZero()) {
			t.Fatalf("nothing decoded, yet %+v", got)
		}
		return
	}
	if jerr := json.Unmarshal(body, want); jerr != nil {
		if !errors.Is(err, ErrMalformedAnswer) || !IsRetryable(err) || RetryAfter(err) != 0 {
			t.Fatalf("undecodable 2xx answer (%v): error %v, want a retryable ErrMalformedAnswer without Retry-After", jerr, err)
		}
		return
	}
	if err != nil {
		t.Fatalf("decodable 2xx answer: %v", err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("decoded %+v, want %+v", got, want)
	}
}

// checkHTTPError checks the error of a non-2xx answer.
func checkHTTPError(t *testing.T, err error, status int, retry string, body []byte) {
	t.Helper()
	var herr *HTTPError
	if !errors.As(err, &herr) {
		t.Fatalf("status %d: %T %v, want an *HTTPError", status, err, err)
	}
	if herr.StatusCode != status {
		t.Fatalf("status %d: HTTPError.StatusCode %d", status, herr.StatusCode)
	}
	var env api.ErrorEnvelope
	wantCode, wantMsg := "", ""
	if json.Unmarshal(body, &env) == nil && env.Error.Code != "" {
		wantCode, wantMsg = env.Error.Code, env.Error.Message
	}
	if herr.Code != wantCode || herr.Message != wantMsg {
		t.Fatalf("status %d: code %q message %q, want %q %q", status, herr.Code, herr.Message, wantCode, wantMsg)
	}
	retryable := status == 408 || status == 429 || status >= 500
	if IsRetryable(err) != retryable {
		t.Fatalf("status %d: IsRetryable %v", status, IsRetryable(err))
	}
	if IsAuth(err) != (status == 401 || status == 403) {
		t.Fatalf("status %d: IsAuth %v", status, IsAuth(err))
	}
	if herr.RetryAfter < 0 {
		t.Fatalf("Retry-After %q: %v", retry, herr.RetryAfter)
	}
	// Retry-After is honoured whatever the status (docs/protocol.md).
	if RetryAfter(err) != herr.RetryAfter {
		t.Fatalf("status %d, Retry-After %q: RetryAfter %v, want %v", status, retry, RetryAfter(err), herr.RetryAfter)
	}
	checkRetryAfter(t, retry, herr.RetryAfter)
}

// checkRetryAfter checks d, what parseRetryAfter made of v: never
// negative; delay-seconds exactly, saturating at the longest duration.
func checkRetryAfter(t *testing.T, v string, d time.Duration) {
	t.Helper()
	if d < 0 {
		t.Fatalf("Retry-After %q: negative wait %v", v, d)
	}
	if s, err := strconv.Atoi(v); err == nil {
		want := time.Duration(0)
		switch {
		case s > math.MaxInt64/int(time.Second):
			want = math.MaxInt64
		case s > 0:
			want = time.Duration(s) * time.Second
		}
		if d != want {
			t.Fatalf("Retry-After %q: %v, want %v", v, d, want)
		}
	}
}

// FuzzParseRetryAfter checks the Retry-After parser alone: delay-seconds
// or an HTTP date (RFC 1123, RFC 850, asctime), never a negative wait.
func FuzzParseRetryAfter(f *testing.F) {
	for _, s := range []string{"", "0", "120", "-1", "+7", "Wed, 21 Oct 2065 07:28:00 GMT",
		"Wednesday, 21-Oct-65 07:28:00 GMT", "Wed Oct 21 07:28:00 2065", "Sun, 06 Nov 1994 08:49:37 GMT", "1.5", " 3"} {
		f.Add(s)
	}
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, v string) {
		d := parseRetryAfter(v, now)
		checkRetryAfter(t, v, d)
		if _, err := strconv.Atoi(v); err != nil {
			if at, err := http.ParseTime(v); err == nil && at.After(now) {
				if d <= 0 || d != at.Sub(now) {
					t.Fatalf("Retry-After %q: %v, want %v", v, d, at.Sub(now))
				}
			} else if d != 0 {
				t.Fatalf("Retry-After %q: %v, want 0", v, d)
			}
		}
	})
}
