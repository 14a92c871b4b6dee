package standalone

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/internal/httpmux"
)

// decodeBody reads r's JSON body, at most limit bytes, into v and returns
// its bytes. Unknown fields and anything after the JSON value but
// whitespace are validation_failed. An empty body leaves v as it is when
// optional is true, and is validation_failed otherwise.
func decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any, optional bool) ([]byte, error) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		return nil, bodyErr(err, limit)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		if optional {
			return b, nil
		}
		return nil, errcode.New(errcode.ValidationFailed, "a JSON request body is required")
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return nil, bodyErr(err, limit)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errcode.New(errcode.ValidationFailed, "bad request body: data after the JSON value")
	}
	return b, nil
}

// bodyErr is the validation_failed answer to a request body that could not
// be read or decoded.
func bodyErr(err error, limit int64) error {
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		return errcode.New(errcode.ValidationFailed, "request body over %d bytes", limit)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return errcode.New(errcode.ValidationFailed, "request body not received in time")
	}
	return errcode.New(errcode.ValidationFailed, "bad request body: %s", strings.TrimPrefix(err.Error(), "json: "))
}

// defaultedKeys are the create fields whose absence takes a default: an
// explicit 0 is not "absent" but out of range (seed 004: vcpus 1..128).
var defaultedKeys = []string{"vcpus", "memory_mb", "disk_gib", "root_disk_size"}

// explicitZero refuses a JSON object b that gives one of keys the value 0
// (null stays "absent").
func explicitZero(b []byte, keys ...string) error {
	var m map[string]json.RawMessage
	if json.Unmarshal(b, &m) != nil {
		return nil // not an object: the typed decode said why
	}
	for _, k := range keys {
		raw, ok := m[k]
		if !ok {
			continue
		}
		var n float64
		if json.Unmarshal(raw, &n) == nil && n == 0 && string(bytes.TrimSpace(raw)) != "null" {
			return errcode.New(errcode.ValidationFailed, "%s 0 is out of range: leave %s out for its default", k, k)
		}
	}
	return nil
}

// routed serves mux, answering a request no route takes (404, or 405
// with Allow when the path exists for other methods) with the error
// envelope instead of net/http's plain text.
func routed(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		status, allow := httpmux.Unrouted(mux, r)
		if status == 0 {
			mux.ServeHTTP(w, r)
			return
		}
		if status == http.StatusMethodNotAllowed {
			w.Header().Set("Allow", allow)
			writeJSON(w, http.StatusMethodNotAllowed, api.ErrorEnvelope{Error: api.Error{Code: string(errcode.ValidationFailed),
				Message: "method " + r.Method + " is not allowed on " + r.URL.Path + ": use " + allow}})
			return
		}
		writeErr(w, errcode.New(errcode.NotFound, "no such endpoint: %s %s", r.Method, r.URL.Path))
	})
}
