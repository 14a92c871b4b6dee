package client

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
)

func TestErrorsAndRetryable(t *testing.T) {
	for _, tc := range []struct {
		status    int
		body      string
		want      string
		retryable bool
	}{
		{400, `{"error":{"code":"validation_failed","message":"arch must be amd64 or arm64"}}`, "validation_failed: arch must be amd64 or arm64", false},
		{409, `{"error":{"code":"pool_not_on_node","message":"pool fast is not on node-2"}}`, "pool_not_on_node: pool fast is not on node-2", false},
		{400, "plain", "validation_failed: server answered 400 Bad Request: plain", false},
		{401, "", "unauthorized: server answered 401 Unauthorized", false},
		{404, "404 page not found\n", "not_found: server answered 404 Not Found: 404 page not found", false},
		{409, "", "conflict: server answered 409 Conflict", false},
		{429, "slow down", "internal: server answered 429 Too Many Requests: slow down", true},
		{500, `{"error":{"code":"internal","message":"boom"}}`, "internal: boom", true},
		{503, `{"error":{}}`, "internal: server answered 503 Service Unavailable: {\"error\":{}}", true},
		{502, strings.Repeat("x", 300), "internal: server answered 502 Bad Gateway: " + strings.Repeat("x", 200) + "...", true},
	} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(tc.status)
			io.WriteString(w, tc.body)
		}))
		c := &Client{BaseURL: srv.URL}
		_, err := c.Task(t.Context(), "t1")
		srv.Close()
		var ae *APIError
		if !errors.As(err, &ae) || ae.Status != tc.status || err.Error() != tc.want || Retryable(err) != tc.retryable {
			t.Errorf("%d %q: err %v (retryable %v), want %q (retryable %v)", tc.status, tc.body, err, Retryable(err), tc.want, tc.retryable)
		}
	}
}

func TestTransportAndContextErrors(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	_, _, err := (&Client{BaseURL: url}).GetVM(t.Context(), "web-1")
	var te *TransportError
	if !errors.As(err, &te) || !Retryable(err) {
		t.Errorf("closed server: err %v, want a retryable *TransportError", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, _, err = (&Client{BaseURL: url}).GetVM(ctx, "web-1")
	if !errors.Is(err, context.Canceled) || Retryable(err) {
		t.Errorf("cancelled: err %v, want context.Canceled, not retryable", err)
	}
}

func TestBadAnswers(t *testing.T) {
	answer := ""
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusAccepted)
		io.WriteString(w, answer)
	}))
	defer srv.Close()
	c := &Client{BaseURL: srv.URL}
	for body, want := range map[string]string{
		`{"status":"pending"}`: "internal: server answered a task without an id",
		`<html>`:               "internal: POST /v1/vms/web-1/start: undecodable answer: invalid character '<' looking for beginning of value",
	} {
		answer = body
		if _, err := c.Async(t.Context(), "web-1", OpStart); err == nil || err.Error() != want {
			t.Errorf("answer %q: err %v, want %q", body, err, want)
		}
	}
	if _, err := c.Async(t.Context(), "web-1", "explode"); err == nil {
		t.Error("unknown async op accepted")
	}
	if _, _, err := c.Sync(t.Context(), "web-1", OpStart); err == nil {
		t.Error("start accepted as a sync op")
	}
}

func TestRequests(t *testing.T) {
	type seen struct{ method, uri, auth, ua, ctype, accept, body string }
	var got []seen
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got = append(got, seen{r.Method, r.RequestURI, r.Header.Get("Authorization"), r.Header.Get("User-Agent"), r.Header.Get("Content-Type"), r.Header.Get("Accept"), string(b)})
		io.WriteString(w, `{"id":"t1","status":"pending","name":"a b"}`)
	}))
	defer srv.Close()
	c := &Client{BaseURL: srv.URL + "/", Token: "s3cret", UserAgent: "otherix/test"}
	ctx := t.Context()
	c.CreateVM(ctx, api.CreateVM{Name: "a b", ImageURL: "u", Arch: "amd64"})
	c.Async(ctx, "a b", OpStop)
	c.Async(ctx, "a b", OpDelete)
	c.Sync(ctx, "a b", OpPause)
	c.ListVMs(ctx, ListQuery{Limit: 5, Status: "running"})
	var sb strings.Builder
	c.Console(ctx, "a b", 10, &sb)
	want := []seen{
		{"POST", "/v1/vms", "Bearer s3cret", "otherix/test", "application/json", "application/json", `{"name":"a b","image_url":"u","arch":"amd64"}`},
		{"POST", "/v1/vms/a%20b/stop", "Bearer s3cret", "otherix/test", "application/json", "application/json", `{}`},
		{"DELETE", "/v1/vms/a%20b", "Bearer s3cret", "otherix/test", "", "application/json", ""},
		{"POST", "/v1/vms/a%20b/pause", "Bearer s3cret", "otherix/test", "", "application/json", ""},
		{"GET", "/v1/vms?limit=5&status=running", "Bearer s3cret", "otherix/test", "", "application/json", ""},
		{"GET", "/v1/vms/a%20b/console?tail=10", "Bearer s3cret", "otherix/test", "", "text/plain", ""},
	}
	if len(got) != len(want) {
		t.Fatalf("requests = %+v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("request %d = %+v, want %+v", i, got[i], want[i])
		}
	}
}
