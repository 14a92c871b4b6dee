package httpmux

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestUnrouted(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/vms", func(http.ResponseWriter, *http.Request) {})
	for _, tc := range []struct {
		method, path string
		status       int
		allow        string
	}{
		{"GET", "/v1/vms", 0, ""},
		{"POST", "/v1/vms", http.StatusMethodNotAllowed, "GET, HEAD"},
		{"GET", "/v1/nope", http.StatusNotFound, ""},
	} {
		status, allow := Unrouted(mux, httptest.NewRequest(tc.method, tc.path, nil))
		if status != tc.status || allow != tc.allow {
			t.Errorf("%s %s: %d %q, want %d %q", tc.method, tc.path, status, allow, tc.status, tc.allow)
		}
	}
}
