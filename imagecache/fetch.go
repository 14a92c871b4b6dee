package imagecache

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Request asks for an image. SHA256 (hex, optionally "sha256:"-prefixed)
// and Format ("qcow2" or "raw") are optional.
type Request struct{ URL, SHA256, Format string }

// Progress receives download progress: bytes done and total (-1 when the
// total is unknown). It is called from the download's goroutine and must
// return quickly.
type Progress func(done, total int64)

// request is a checked Request.
type request struct {
	url    string // canonical form, the cache's key
	u      *url.URL
	sha    string // lowercase hex or ""
	format string // "", "qcow2" or "raw"
}

const maxURLLen = 8192

func (c *Cache) parseRequest(req Request) (request, error) {
	var r request
	if req.URL == "" {
		return r, errcode.New(errcode.ValidationFailed, "image URL is required")
	}
	if len(req.URL) > maxURLLen || strings.TrimSpace(req.URL) != req.URL {
		return r, errcode.New(errcode.ValidationFailed, "invalid image URL")
	}
	u, err := url.Parse(req.URL)
	if err != nil {
		return r, errcode.New(errcode.ValidationFailed, "invalid image URL: %v", errors.Unwrap(err))
	}
	u.Fragment, u.RawFragment = "", ""
	switch u.Scheme = strings.ToLower(u.Scheme); u.Scheme {
	case "http", "https":
		if u.Host == "" {
			return r, errcode.New(errcode.ValidationFailed, "image URL %s has no host", redact(u))
		}
	case "file":
		if !c.opts.AllowFileURLs {
			return r, errcode.New(errcode.ValidationFailed, "file:// image URLs are not allowed on this agent")
		}
		if (u.Host != "" && u.Host != "localhost") || u.Opaque != "" || !strings.HasPrefix(u.Path, "/") || u.RawQuery != "" || u.User != nil {
			return r, errcode.New(errcode.ValidationFailed, "file URL must be file:///absolute/path")
		}
	default:
		return r, errcode.New(errcode.ValidationFailed, "image URL scheme %q is not supported (want http or https)", u.Scheme)
	}
	r.u, r.url = u, u.String()
	if req.SHA256 != "" {
		s := strings.ToLower(strings.TrimPrefix(strings.TrimPrefix(req.SHA256, "sha256:"), "SHA256:"))
		if !hexRE.MatchString(s) {
			return r, errcode.New(errcode.ValidationFailed, "invalid sha256 %q: want 64 hex digits", truncate(req.SHA256, 80))
		}
		r.sha = s
	}
	switch f := strings.ToLower(req.Format); f {
	case "", "qcow2", "raw":
		r.format = f
	default:
		return r, errcode.New(errcode.ValidationFailed, "image format %q is not supported (want qcow2 or raw)", truncate(req.Format, 40))
	}
	return r, nil
}

// redact renders u for logs and messages: no credentials, no query (a
// signed URL's query is a secret).
func redact(u *url.URL) string {
	v := url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}
	s := v.String()
	if u.RawQuery != "" {
		s += "?…"
	}
	return s
}

var (
	errTooManyRedirects = errors.New("too many redirects")
	errRedirectRefused  = errors.New("redirect refused")
	errIdle             = errors.New("no data received")
)

func checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= maxRedirects {
		return fmt.Errorf("stopped after %d redirects: %w", maxRedirects, errTooManyRedirects)
	}
	if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
		return fmt.Errorf("%w: unsupported scheme %q", errRedirectRefused, req.URL.Scheme)
	}
	if via[0].URL.Scheme == "https" && req.URL.Scheme == "http" {
		return fmt.Errorf("%w: from https to http", errRedirectRefused)
	}
	return nil
}

// httpClient returns the download client: base, or a default one that
// takes proxies from the environment and verifies TLS; either way with the
// redirect policy above unless base has its own.
func httpClient(base *http.Client) *http.Client {
	if base != nil {
		cl := *base
		if cl.CheckRedirect == nil {
			cl.CheckRedirect = checkRedirect
		}
		return &cl
	}
	tr := http.DefaultTransport.(*http.Transport).Clone() // ProxyFromEnvironment, dial and TLS timeouts
	tr.ResponseHeaderTimeout = time.Minute
	tr.DisableCompression = true
	return &http.Client{Transport: tr, CheckRedirect: checkRedirect}
}

// response is an opened source.
type response struct {
	body          io.ReadCloser
	start         int64 // offset of the body's first byte
	total         int64 // -1 unknown
	etag, lastMod string
}

// errRestart asks for the download to start over (a resume was refused
// in a way that needs a fresh request).
var errRestart = errors.New("resume not possible, starting over")

// open starts reading r's image, resuming at st.off when st allows it.
// A *errcode.Error is final; any other error may be retried.
func (c *Cache) open(ctx context.Context, r request, st *partial) (*response, error) {
	if r.u.Scheme == "file" {
		return openFile(r)
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodGet, r.url, nil)
	if err != nil {
		return nil, errcode.New(errcode.ValidationFailed, "invalid image URL %s", redact(r.u))
	}
	hreq.Header.Set("Accept-Encoding", "identity")
	hreq.Header.Set("User-Agent", "otherix-agent-imagecache/1")
	resume := st.off > 0 && st.canResume(r)
	if resume {
		hreq.Header.Set("Range", fmt.Sprintf("bytes=%d-", st.off))
		if strongETag(st.etag) {
			hreq.Header.Set("If-Range", st.etag)
		} else if st.lastMod != "" {
			hreq.Header.Set("If-Range", st.lastMod)
		}
	}
	resp, err := c.client.Do(hreq)
	if err != nil {
		return nil, classifyHTTPError(r, err)
	}
	res := &response{body: resp.Body, total: -1, etag: resp.Header.Get("ETag"), lastMod: resp.Header.Get("Last-Modified")}
	fail := func(err error) (*response, error) {
		resp.Body.Close()
		return nil, err
	}
	switch resp.StatusCode {
	case http.StatusOK:
		res.total = resp.ContentLength
	case http.StatusPartialContent:
		if !resume {
			return fail(errcode.New(errcode.ImageDownloadFailed, "download %s: unexpected 206 to a plain request", redact(r.u)))
		}
		start, total, ok := parseContentRange(resp.Header.Get("Content-Range"))
		switch {
		case !ok || start != st.off:
			return fail(fmt.Errorf("bad Content-Range %q: %w", resp.Header.Get("Content-Range"), errRestart))
		case total >= 0 && st.total >= 0 && total != st.total:
			return fail(fmt.Errorf("size changed from %d to %d: %w", st.total, total, errRestart))
		case st.etag != "" && res.etag != "" && res.etag != st.etag:
			return fail(fmt.Errorf("ETag changed: %w", errRestart))
		}
		res.start, res.total = start, total
		if total < 0 {
			res.total = st.total
		}
	case http.StatusRequestedRangeNotSatisfiable:
		return fail(fmt.Errorf("range not satisfiable: %w", errRestart))
	default:
		return fail(errcode.New(errcode.ImageDownloadFailed, "download %s: http status %s", redact(r.u), resp.Status))
	}
	if ce := resp.Header.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
		return fail(errcode.New(errcode.ImageDownloadFailed, "download %s: unexpected Content-Encoding %q", redact(r.u), truncate(ce, 40)))
	}
	return res, nil
}

func openFile(r request) (*response, error) {
	f, err := os.Open(r.u.Path)
	if err != nil {
		return nil, errcode.Wrap(errcode.ImageDownloadFailed, errors.Unwrap(err), "open %s", r.u.Path)
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, errcode.New(errcode.ValidationFailed, "%s is not a regular file", r.u.Path)
	}
	return &response{body: f, total: fi.Size()}, nil
}

// classifyHTTPError turns a client error into a final *errcode.Error or a
// retryable error. The url.Error wrapper is dropped: it would print the
// URL's query.
func classifyHTTPError(r request, err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	var certErr *tls.CertificateVerificationError
	var unknownAuth x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	case errors.Is(err, errTooManyRedirects), errors.Is(err, errRedirectRefused),
		errors.As(err, &certErr), errors.As(err, &unknownAuth),
		errors.As(err, &hostErr), errors.As(err, &invalid):
		return errcode.Wrap(errcode.ImageDownloadFailed, err, "download %s", redact(r.u))
	}
	return err
}

func strongETag(e string) bool { return e != "" && !strings.HasPrefix(e, "W/") }

var contentRangeRE = regexp.MustCompile(`^bytes (\d+)-(\d+)/(\d+|\*)$`)

// parseContentRange parses "bytes first-last/total" (total -1 for "*").
func parseContentRange(s string) (start, total int64, ok bool) {
	m := contentRangeRE.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return 0, 0, false
	}
	start, err1 := strconv.ParseInt(m[1], 10, 64)
	last, err2 := strconv.ParseInt(m[2], 10, 64)
	if err1 != nil || err2 != nil || last < start {
		return 0, 0, false
	}
	total = -1
	if m[3] != "*" {
		t, err := strconv.ParseInt(m[3], 10, 64)
		if err != nil || t <= last {
			return 0, 0, false
		}
		total = t
	}
	return start, total, true
}

// idleReader cancels its attempt when a read has waited too long.
type idleReader struct {
	r io.Reader
	t *time.Timer
	d time.Duration
}

func (ir *idleReader) Read(p []byte) (int, error) {
	ir.t.Reset(ir.d)
	return ir.r.Read(p)
}
