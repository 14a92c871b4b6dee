// Package httpmux tells what net/http's ServeMux would answer to a
// request none of its routes takes, so servers can answer it in their
// own error envelope instead of net/http's plain text.
package httpmux

import "net/http"

// Unrouted returns 0 when mux has a route for r. Otherwise it returns
// the status net/http would answer: 405 with the methods the path
// allows (its Allow header) when the path is routed for other methods,
// else 404.
func Unrouted(mux *http.ServeMux, r *http.Request) (status int, allow string) {
	h, pattern := mux.Handler(r)
	if pattern != "" {
		return 0, ""
	}
	rec := &recorder{header: http.Header{}}
	h.ServeHTTP(rec, r)
	if rec.status == http.StatusMethodNotAllowed {
		return http.StatusMethodNotAllowed, rec.header.Get("Allow")
	}
	return http.StatusNotFound, ""
}

// recorder keeps the status and header a handler answers with and drops
// its body.
type recorder struct {
	header http.Header
	status int
}

func (rc *recorder) Header() http.Header { return rc.header }

func (rc *recorder) WriteHeader(code int) {
	if rc.status == 0 {
		rc.status = code
	}
}

func (rc *recorder) Write(p []byte) (int, error) {
	rc.WriteHeader(http.StatusOK)
	return len(p), nil
}
