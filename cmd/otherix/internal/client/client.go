// Package client is the otherix CLI's HTTP client for the seed-004 /v1 API:
// VMs addressed by name under /v1/vms and async tasks under /v1/tasks.
//
// Every method takes a context and returns either the decoded answer or an
// error: an *APIError when the server answered with a non-2xx status, or a
// transport error (the server could not be reached). Retryable tells the two
// kinds of transient failure apart from final ones.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// maxJSON bounds a JSON answer the client will read.
const maxJSON = 32 << 20

// Client talks to one otherix API server. The zero value is not usable:
// BaseURL must be set.
type Client struct {
	// BaseURL is the server's root, e.g. "http://127.0.0.1:7480".
	BaseURL string
	// Token, when set, is sent as "Authorization: Bearer <Token>".
	Token string
	// UserAgent, when set, is sent as the User-Agent header.
	UserAgent string
	// HTTP is the client used for requests; nil means http.DefaultClient.
	HTTP *http.Client
}

// APIError is a non-2xx answer of the server. Code and Message come from
// the {"error": {"code", "message"}} envelope when the body holds one.
type APIError struct {
	Status  int
	Code    string
	Message string
}

// Error renders the error as "<code>: <message>", the form the CLI prints.
func (e *APIError) Error() string { return e.Code + ": " + e.Message }

// Retryable reports whether the same request may succeed later: the server
// was overloaded (429), timed the request out (408) or failed (5xx).
func (e *APIError) Retryable() bool {
	return e.Status == http.StatusRequestTimeout || e.Status == http.StatusTooManyRequests || e.Status >= 500
}

// TransportError means the request never got an HTTP answer.
type TransportError struct {
	URL string
	Err error
}

func (e *TransportError) Error() string { return "cannot reach " + e.URL + ": " + e.Err.Error() }

// Unwrap returns the cause.
func (e *TransportError) Unwrap() error { return e.Err }

// Retryable reports whether err is a transient failure worth retrying: a
// retryable *APIError, or a transport error that is not the caller's own
// context ending.
func Retryable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.Retryable()
	}
	var te *TransportError
	return errors.As(err, &te)
}

// ListQuery holds the filters and page of GET /v1/vms. Empty fields are not
// sent.
type ListQuery struct {
	Limit  int
	Cursor string
	Pool   string
	Node   string
	Status string
}

// VMList is one page of GET /v1/vms.
type VMList struct {
	VMs        []api.VM `json:"vms"`
	NextCursor string   `json:"next_cursor,omitempty"`
}

// CreateVM submits POST /v1/vms and returns the vm.create task.
func (c *Client) CreateVM(ctx context.Context, spec api.CreateVM) (*api.Task, error) {
	var t api.Task
	if _, err := c.doJSON(ctx, http.MethodPost, "/v1/vms", nil, spec, &t); err != nil {
		return nil, err
	}
	return checkTask(&t)
}

// ListVMs returns one page of VMs and the raw JSON answer.
func (c *Client) ListVMs(ctx context.Context, q ListQuery) (*VMList, []byte, error) {
	v := url.Values{}
	if q.Limit != 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	for k, s := range map[string]string{"cursor": q.Cursor, "pool": q.Pool, "node": q.Node, "status": q.Status} {
		if s != "" {
			v.Set(k, s)
		}
	}
	var l VMList
	raw, err := c.doJSON(ctx, http.MethodGet, "/v1/vms", v, nil, &l)
	if err != nil {
		return nil, nil, err
	}
	return &l, raw, nil
}

// GetVM returns the VM named name and the raw JSON answer.
func (c *Client) GetVM(ctx context.Context, name string) (*api.VM, []byte, error) {
	var vm api.VM
	raw, err := c.doJSON(ctx, http.MethodGet, vmPath(name, ""), nil, nil, &vm)
	if err != nil {
		return nil, nil, err
	}
	return &vm, raw, nil
}

// Events returns a VM's history, oldest first, and the raw answer.
func (c *Client) Events(ctx context.Context, name string) ([]api.VMEvent, []byte, error) {
	var l api.VMEventList
	raw, err := c.doJSON(ctx, http.MethodGet, vmPath(name, "events"), nil, nil, &l)
	if err != nil {
		return nil, nil, err
	}
	return l.Events, raw, nil
}

// Async ops: the server answers 202 with a task.
const (
	OpStart    = "start"
	OpStop     = "stop"
	OpPoweroff = "poweroff"
	OpReboot   = "reboot"
	OpDelete   = "delete"
)

// Sync ops: the server answers 200 with the refreshed VM.
const (
	OpReset  = "reset"
	OpPause  = "pause"
	OpResume = "resume"
)

// Async submits an async op (OpStart, OpStop, OpPoweroff, OpReboot or
// OpDelete) on the VM named name and returns its task. OpStop sends a
// graceful api.StopSpec; OpDelete is DELETE /v1/vms/{name}.
func (c *Client) Async(ctx context.Context, name, op string) (*api.Task, error) {
	method, path := http.MethodPost, vmPath(name, op)
	var body any
	switch op {
	case OpStart, OpPoweroff, OpReboot:
	case OpStop:
		body = api.StopSpec{Force: false}
	case OpDelete:
		method, path = http.MethodDelete, vmPath(name, "")
	default:
		return nil, fmt.Errorf("unknown async op %q", op)
	}
	var t api.Task
	if _, err := c.doJSON(ctx, method, path, nil, body, &t); err != nil {
		return nil, err
	}
	return checkTask(&t)
}

// Sync runs a sync op (OpReset, OpPause or OpResume) on the VM named name
// and returns the refreshed VM and the raw JSON answer.
func (c *Client) Sync(ctx context.Context, name, op string) (*api.VM, []byte, error) {
	switch op {
	case OpReset, OpPause, OpResume:
	default:
		return nil, nil, fmt.Errorf("unknown sync op %q", op)
	}
	var vm api.VM
	raw, err := c.doJSON(ctx, http.MethodPost, vmPath(name, op), nil, nil, &vm)
	if err != nil {
		return nil, nil, err
	}
	return &vm, raw, nil
}

// GetRaw is a GET of path returning the body (at most 64 MiB).
func (c *Client) GetRaw(ctx context.Context, path string) ([]byte, error) {
	resp, err := c.do(ctx, http.MethodGet, path, nil, nil, "*/*")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(io.LimitReader(resp.Body, 64<<20))
}

// DoJSON sends body (nil for none) to path and decodes the answer into out
// (nil to ignore it); it returns the raw answer.
func (c *Client) DoJSON(ctx context.Context, method, path string, q url.Values, body, out any) ([]byte, error) {
	return c.doJSON(ctx, method, path, q, body, out)
}

// GetJSON is a GET of path decoded into out; it returns the raw answer.
func (c *Client) GetJSON(ctx context.Context, path string, out any) ([]byte, error) {
	return c.doJSON(ctx, http.MethodGet, path, nil, nil, out)
}

// Update is PATCH /v1/vms/{name}: 200 with the refreshed VM.
func (c *Client) Update(ctx context.Context, name string, u api.UpdateVM) (*api.VM, []byte, error) {
	var vm api.VM
	raw, err := c.doJSON(ctx, http.MethodPatch, "/v1/vms/"+url.PathEscape(name), nil, u, &vm)
	if err != nil {
		return nil, nil, err
	}
	return &vm, raw, nil
}

// Task is GET /v1/tasks/{id}.
func (c *Client) Task(ctx context.Context, id string) (*api.Task, error) {
	var t api.Task
	if _, err := c.doJSON(ctx, http.MethodGet, "/v1/tasks/"+url.PathEscape(id), nil, nil, &t); err != nil {
		return nil, err
	}
	return checkTask(&t)
}

// Console copies the serial console log of the VM named name to w. A tail
// above zero asks for the last tail bytes only.
func (c *Client) Console(ctx context.Context, name string, tail int64, w io.Writer) error {
	var q url.Values
	if tail > 0 {
		q = url.Values{"tail": {strconv.FormatInt(tail, 10)}}
	}
	resp, err := c.do(ctx, http.MethodGet, vmPath(name, "console"), q, nil, "text/plain")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(w, resp.Body); err != nil {
		return fmt.Errorf("read console of vm %s: %w", name, err)
	}
	return nil
}

func vmPath(name, op string) string {
	p := "/v1/vms/" + url.PathEscape(name)
	if op != "" {
		p += "/" + op
	}
	return p
}

func checkTask(t *api.Task) (*api.Task, error) {
	if t.ID == "" {
		return nil, errcode.New(errcode.Internal, "server answered a task without an id")
	}
	return t, nil
}

// doJSON sends body as JSON (when non-nil), decodes a 2xx answer into out
// and returns the raw answer.
func (c *Client) doJSON(ctx context.Context, method, path string, q url.Values, body, out any) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encode request: %w", err)
		}
		rd = bytes.NewReader(b)
	}
	resp, err := c.do(ctx, method, path, q, rd, "application/json")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxJSON+1))
	if err != nil {
		return nil, &TransportError{URL: c.BaseURL, Err: fmt.Errorf("read answer: %w", err)}
	}
	if len(raw) > maxJSON {
		return nil, errcode.New(errcode.Internal, "%s %s: answer over %d bytes", method, path, maxJSON)
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return nil, errcode.New(errcode.Internal, "%s %s: undecodable answer: %v", method, path, err)
	}
	return raw, nil
}

// do sends one request and returns the response when its status is 2xx;
// otherwise it reads the error envelope and returns an *APIError.
func (c *Client) do(ctx context.Context, method, path string, q url.Values, body io.Reader, accept string) (*http.Response, error) {
	u := strings.TrimRight(c.BaseURL, "/") + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	req.Header.Set("Accept", accept)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	if c.UserAgent != "" {
		req.Header.Set("User-Agent", c.UserAgent)
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, &TransportError{URL: c.BaseURL, Err: err}
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return resp, nil
	}
	defer resp.Body.Close()
	return nil, decodeError(resp)
}

// decodeError turns a non-2xx response into an *APIError. A body without
// the error envelope (a proxy's page, say) gets a code from the status.
func decodeError(resp *http.Response) *APIError {
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var env api.ErrorEnvelope
	if json.Unmarshal(raw, &env) == nil && env.Error.Code != "" {
		return &APIError{Status: resp.StatusCode, Code: env.Error.Code, Message: env.Error.Message}
	}
	msg := "server answered " + resp.Status
	if s := strings.Join(strings.Fields(string(raw)), " "); s != "" {
		if len(s) > 200 {
			s = s[:200] + "..."
		}
		msg += ": " + s
	}
	return &APIError{Status: resp.StatusCode, Code: string(codeOfStatus(resp.StatusCode)), Message: msg}
}

func codeOfStatus(status int) errcode.Code { return errcode.OfHTTPStatus(status) }
