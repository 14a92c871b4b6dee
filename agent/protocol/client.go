package protocol

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// ClientConfig configures a Client.
type ClientConfig struct {
	// BaseURL of the control plane, e.g. https://cp.example:8443. Plain
	// http is refused unless the host is a loopback address or
	// AllowInsecureHTTP is set: the bearer token must not cross a network
	// in clear.
	BaseURL           string
	AllowInsecureHTTP bool
	// Node is this host's name, sent in every request.
	Node string
	// AgentVersion goes into the User-Agent.
	AgentVersion string
	// TokenFile holds the bearer token. It must not be readable or
	// writable by group or others. It is re-read when it changes.
	TokenFile string
	// CAFile, when set, is the only CA trusted for the control plane's
	// certificate (PEM). Otherwise the system roots are used.
	CAFile string
	// CertFile and KeyFile, when both set, are a client certificate.
	CertFile, KeyFile string
	// Timeout bounds each request; a lease waits WaitSeconds more.
	// Default 15s.
	Timeout time.Duration
	// CompressMin gzips request bodies of at least this many bytes.
	// 0 means 1024; negative disables compression.
	CompressMin int
	// Transport overrides the HTTP transport (tests). CAFile and the
	// client certificate are then ignored.
	Transport http.RoundTripper
	// Observe, when set, is called after every request with its path,
	// latency and error (metrics). It must not block.
	Observe func(path string, d time.Duration, err error)
}

// Client speaks the agent side of the protocol. It does not retry: it
// classifies failures (IsRetryable, RetryAfter) and its caller decides when
// to try again. It is safe for concurrent use.
type Client struct {
	observe     func(path string, d time.Duration, err error)
	base        *url.URL
	node        string
	userAgent   string
	timeout     time.Duration
	compressMin int
	token       *tokenFile
	hc          *http.Client
}

// NewClient checks the configuration, reads the token file and loads the
// TLS material.
func NewClient(cfg ClientConfig) (*Client, error) {
	base, err := url.Parse(strings.TrimRight(cfg.BaseURL, "/"))
	if err != nil {
		return nil, fmt.Errorf("control plane url: %w", err)
	}
	switch base.Scheme {
	case "https":
	case "http":
		if !cfg.AllowInsecureHTTP && !isLoopback(base.Hostname()) {
			return nil, fmt.Errorf("control plane url %q: plain http to a non-loopback host would send the token in clear; use https", cfg.BaseURL)
		}
	default:
		return nil, fmt.Errorf("control plane url %q: scheme must be https", cfg.BaseURL)
	}
	if cfg.Node == "" {
		return nil, errors.New("node name is empty")
	}
	if cfg.TokenFile == "" {
		return nil, errors.New("token file is not set")
	}
	tok := &tokenFile{path: cfg.TokenFile}
	if _, err := tok.get(); err != nil {
		return nil, err
	}
	rt := cfg.Transport
	if rt == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig, err = tlsConfig(cfg)
		if err != nil {
			return nil, err
		}
		tr.MaxIdleConnsPerHost = 4
		tr.IdleConnTimeout = 90 * time.Second
		rt = tr
	}
	c := &Client{
		base:        base,
		observe:     cfg.Observe,
		node:        cfg.Node,
		userAgent:   fmt.Sprintf("otherix-agent/%s (protocol %d; %s/%s)", orDefault(cfg.AgentVersion, "dev"), Version, runtime.GOOS, runtime.GOARCH),
		timeout:     cfg.Timeout,
		compressMin: cfg.CompressMin,
		token:       tok,
		hc:          &http.Client{Transport: rt},
	}
	if c.timeout <= 0 {
		c.timeout = 15 * time.Second
	}
	if c.compressMin == 0 {
		c.compressMin = 1024
	}
	return c, nil
}

// Node returns the node name the client sends.
func (c *Client) Node() string { return c.node }

// UserAgent returns the User-Agent the client sends.
func (c *Client) UserAgent() string { return c.userAgent }

// Register announces this host.
func (c *Client) Register(ctx context.Context, n NodeInfo) (*RegisterResponse, error) {
	var out RegisterResponse
	err := c.post(ctx, PathRegister, RegisterRequest{ProtocolVersion: Version, Node: n}, &out, c.timeout)
	if err != nil {
		return nil, err
	}
	return &out, nil
}

// Lease long-polls for up to max tasks, waiting up to wait for one.
func (c *Client) Lease(ctx context.Context, wait time.Duration, max int) (*LeaseResponse, error) {
	secs := int(wait / time.Second)
	req := LeaseRequest{ProtocolVersion: Version, Node: c.node, WaitSeconds: secs, Max: max}
	var out LeaseResponse
	if err := c.post(ctx, PathLease, req, &out, time.Duration(secs)*time.Second+c.timeout); err != nil {
		return nil, err
	}
	return &out, nil
}

// Progress extends a task's lease and reports its progress (p may be nil).
func (c *Client) Progress(ctx context.Context, taskID, leaseID string, p *api.Progress) (*ProgressResponse, error) {
	req := ProgressRequest{ProtocolVersion: Version, Node: c.node, LeaseID: leaseID, Progress: p}
	var out ProgressResponse
	if err := c.post(ctx, ProgressPath(taskID), req, &out, c.timeout); err != nil {
		return nil, err
	}
	return &out, nil
}

// Complete reports a task's outcome. ProtocolVersion and Node are filled in.
func (c *Client) Complete(ctx context.Context, taskID string, req CompleteRequest) error {
	req.ProtocolVersion = Version
	req.Node = c.node
	return c.post(ctx, CompletePath(taskID), req, nil, c.timeout)
}

// Heartbeat reports the node and its VMs. ProtocolVersion and Node are
// filled in.
func (c *Client) Heartbeat(ctx context.Context, req HeartbeatRequest) (*HeartbeatResponse, error) {
	req.ProtocolVersion = Version
	req.Node = c.node
	var out HeartbeatResponse
	if err := c.post(ctx, PathHeartbeat, req, &out, c.timeout); err != nil {
		return nil, err
	}
	return &out, nil
}

// MaxAnswerBytes is the largest answer body the agent reads, after gzip
// decoding. A 2xx answer that is larger, or that does not decode into the
// answer's type, is a failed request (ErrMalformedAnswer, retryable); a
// larger non-2xx answer keeps its status and loses only its error body.
const MaxAnswerBytes = 16 << 20

// ErrMalformedAnswer is in the chain of the error for a 2xx answer the
// agent cannot use: larger than MaxAnswerBytes or not valid JSON of the
// answer's type. Such a request failed; it is retryable.
var ErrMalformedAnswer = errors.New("malformed answer")

func (c *Client) post(ctx context.Context, path string, in, out any, timeout time.Duration) (err error) {
	if c.observe != nil {
		start := time.Now()
		defer func() { c.observe(path, time.Since(start), err) }()
	}
	body, gz, err := c.encode(in)
	if err != nil {
		return err
	}
	token, err := c.token.get()
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodPost, c.base.String()+path, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("control plane request %s: %w", path, err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", c.userAgent)
	if gz {
		req.Header.Set("Content-Encoding", "gzip")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var verr *tls.CertificateVerificationError
		if errors.As(err, &verr) {
			// A certificate we do not trust will not become trusted
			// by asking again.
			return fmt.Errorf("control plane %s: %w", path, err)
		}
		return &RetryableError{Err: fmt.Errorf("control plane %s: %w", path, err)}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, MaxAnswerBytes+1))
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return &RetryableError{Err: fmt.Errorf("control plane %s: read answer: %w", path, err)}
	}
	tooLarge := len(data) > MaxAnswerBytes
	if tooLarge {
		data = data[:MaxAnswerBytes]
	}
	if resp.StatusCode/100 != 2 {
		var env api.ErrorEnvelope
		if json.Unmarshal(data, &env) != nil || env.Error.Code == "" {
			env.Error = api.Error{}
		}
		err := StatusError(resp.StatusCode, env.Error.Code, env.Error.Message, parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()))
		if IsAuth(err) {
			c.token.invalidate()
		}
		return err
	}
	if out == nil {
		return nil // a completion: any 2xx acknowledges it, whatever its body
	}
	// A garbled or oversized answer is the control plane's (or a
	// proxy's) fault and may pass: the request failed, retry.
	if tooLarge {
		return &RetryableError{Err: fmt.Errorf("control plane %s: %w: larger than %d bytes", path, ErrMalformedAnswer, MaxAnswerBytes)}
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil // an empty body reads as {}
	}
	if err := json.Unmarshal(data, out); err != nil {
		return &RetryableError{Err: fmt.Errorf("control plane %s: %w: %w", path, ErrMalformedAnswer, err)}
	}
	return nil
}

// encode marshals v and gzips it when it is large enough to be worth it.
func (c *Client) encode(v any) ([]byte, bool, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return nil, false, fmt.Errorf("encode request: %w", err)
	}
	if c.compressMin < 0 || len(data) < c.compressMin {
		return data, false, nil
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(data); err != nil {
		return nil, false, fmt.Errorf("compress request: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, false, fmt.Errorf("compress request: %w", err)
	}
	return buf.Bytes(), true, nil
}

func tlsConfig(cfg ClientConfig) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("control plane ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("control plane ca %s: no PEM certificate found", cfg.CAFile)
		}
		tc.RootCAs = pool
	}
	switch {
	case cfg.CertFile != "" && cfg.KeyFile != "":
		cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	case cfg.CertFile != "" || cfg.KeyFile != "":
		return nil, errors.New("client certificate: both a cert file and a key file are needed")
	}
	return tc, nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func escape(s string) string { return url.PathEscape(s) }

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
