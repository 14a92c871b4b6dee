package imagecache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// testOptions are small and fast: no retry backoff, small buffers and
// checkpoints, a 1 MiB free-space floor.
func testOptions(t testing.TB) Options {
	return Options{
		MinFreeBytes:    1 << 20,
		Logger:          zaptest.NewLogger(t),
		chunkSize:       256 << 10,
		checkpointBytes: 1 << 20,
		retryBackoff:    -1,
	}
}

// newCache opens a cache with one default pool "p" in a temporary
// directory; it is closed at cleanup.
func newCache(t testing.TB, opts Options) (*Cache, string) {
	t.Helper()
	dir := t.TempDir()
	return openCache(t, dir, opts), dir
}

func openCache(t testing.TB, dir string, opts Options) *Cache {
	t.Helper()
	c, err := Open([]PoolConfig{{Name: "p", Dir: dir, Default: true}}, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// randomBytes returns n reproducible pseudo-random bytes.
func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16)})
	r.Read(b)
	return b
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// qemuImg runs the real qemu-img.
func qemuImg(t testing.TB, args ...string) []byte {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// qcow2Of converts raw bytes to a qcow2 image and returns its bytes.
func qcow2Of(t testing.TB, raw []byte) []byte {
	t.Helper()
	dir := t.TempDir()
	in, out := filepath.Join(dir, "in.raw"), filepath.Join(dir, "out.qcow2")
	if err := os.WriteFile(in, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, "convert", "-f", "raw", "-O", "qcow2", in, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func wantCode(t testing.TB, err error, code errcode.Code) {
	t.Helper()
	if got := errcode.Of(err); got != code {
		t.Fatalf("error = %v (code %q), want code %q", err, got, code)
	}
}

// wantEmptyCache checks that the pool holds no entry and no file in its
// image store, index or ingest directories.
func wantEmptyCache(t testing.TB, c *Cache, dir string) {
	t.Helper()
	if es, err := c.List("p"); err != nil || len(es) != 0 {
		t.Errorf("List = %v, %v; want no entries", es, err)
	}
	for _, sub := range []string{"sha256", "index", "ingest"} {
		ents, err := os.ReadDir(filepath.Join(dir, "images", sub))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			t.Errorf("leftover %s/%s", sub, e.Name())
		}
	}
}

// imageServer is a loopback HTTP server of test images that counts what
// it serves and can misbehave on purpose.
type imageServer struct {
	*httptest.Server
	mu     sync.Mutex
	files  map[string]*served
	reqs   []seenRequest
	bytes  int64 // body bytes written, all requests
	active int
	peak   int // most requests in flight at once
	counts map[string]int
	// onRequest, when set, is called (with mu held) before a request is
	// served, with the path and how many requests for it came before.
	onRequest func(path string, n int)
}

type seenRequest struct {
	Path, Range, IfRange string
	Status               int
}

// served is one path's behaviour.
type served struct {
	data    []byte
	etag    string    // strong validator, optional
	modTime time.Time // Last-Modified when not zero
	noRange bool      // ignore Range: always 200 with the whole body
	chunked bool      // no Content-Length
	// declaredLen, when not zero, is the Content-Length announced
	// (a lie when it differs from len(data)); implies noRange.
	declaredLen int64
	status      int // answer with this status instead
	redirect    string
	// drops[i] > 0: request i (counted per path) is cut after that many
	// body bytes, flushed to the client first.
	drops []int64
	// stall, when set: after stallAfter body bytes the handler waits for
	// stall to close (or the client to leave), then goes on.
	stall      chan struct{}
	stallAfter int64
	// reached is closed when the body got to stallAfter.
	reached chan struct{}
	// gate, when set: the handler waits for it before answering.
	gate chan struct{}
	// left is closed when a client leaves while the handler waits.
	left chan struct{}
	n    int // requests so far
}

func newImageServer(t testing.TB) *imageServer {
	s := &imageServer{files: make(map[string]*served), counts: make(map[string]int)}
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

// add serves f at path and returns its URL.
func (s *imageServer) add(path string, f *served) string {
	s.mu.Lock()
	s.files[path] = f
	s.mu.Unlock()
	return s.URL + path
}

func (s *imageServer) requests() []seenRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]seenRequest(nil), s.reqs...)
}

func (s *imageServer) served() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bytes
}

func (s *imageServer) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	if s.onRequest != nil {
		s.onRequest(r.URL.Path, s.counts[r.URL.Path])
	}
	s.counts[r.URL.Path]++
	f := s.files[r.URL.Path]
	s.active++
	s.peak = max(s.peak, s.active)
	idx := -1
	if f != nil {
		idx = f.n
		f.n++
	}
	s.reqs = append(s.reqs, seenRequest{Path: r.URL.Path, Range: r.Header.Get("Range"), IfRange: r.Header.Get("If-Range")})
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.active--
		s.mu.Unlock()
	}()
	if f == nil {
		http.NotFound(w, r)
		return
	}
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-r.Context().Done():
			if f.left != nil {
				close(f.left)
			}
			return
		}
	}
	switch {
	case f.redirect != "":
		http.Redirect(w, r, f.redirect, http.StatusFound)
		return
	case f.status != 0:
		http.Error(w, http.StatusText(f.status), f.status)
		return
	}
	cw := &countingWriter{ResponseWriter: w, s: s, f: f, ctx: r.Context()}
	if idx < len(f.drops) {
		cw.dropAt = f.drops[idx]
	}
	if f.etag != "" {
		w.Header().Set("ETag", f.etag)
	}
	switch {
	case f.declaredLen != 0:
		w.Header().Set("Content-Length", strconv.FormatInt(f.declaredLen, 10))
		n := min(f.declaredLen, int64(len(f.data)))
		cw.Write(f.data[:n])
		cw.Write(f.data[n:]) // refused by net/http past the declared length
	case f.chunked:
		cw.Write(f.data)
	case f.noRange:
		if !f.modTime.IsZero() {
			w.Header().Set("Last-Modified", f.modTime.UTC().Format(http.TimeFormat))
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(f.data)))
		cw.Write(f.data)
	default:
		http.ServeContent(cw, r, "", f.modTime, bytes.NewReader(f.data))
	}
}

// countingWriter counts body bytes and cuts or stalls the response.
type countingWriter struct {
	http.ResponseWriter
	s       *imageServer
	f       *served
	ctx     context.Context
	dropAt  int64
	written int64
	stalled bool
}

func (cw *countingWriter) Write(p []byte) (int, error) {
	total := 0
	for len(p) > 0 {
		n := len(p)
		if cw.dropAt > 0 {
			n = int(min(int64(n), cw.dropAt-cw.written))
		}
		if cw.f.stall != nil && !cw.stalled {
			n = int(min(int64(n), cw.f.stallAfter-cw.written))
		}
		m, err := cw.ResponseWriter.Write(p[:n])
		cw.written += int64(m)
		total += m
		cw.s.mu.Lock()
		cw.s.bytes += int64(m)
		cw.s.mu.Unlock()
		if err != nil {
			return total, err
		}
		p = p[m:]
		if cw.dropAt > 0 && cw.written >= cw.dropAt {
			cw.ResponseWriter.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
		if cw.f.stall != nil && !cw.stalled && cw.written >= cw.f.stallAfter {
			cw.stalled = true
			cw.ResponseWriter.(http.Flusher).Flush()
			if cw.f.reached != nil {
				close(cw.f.reached)
			}
			select {
			case <-cw.f.stall:
			case <-cw.ctx.Done():
				panic(http.ErrAbortHandler)
			}
		}
	}
	return total, nil
}

// plant commits a file as a cache entry through the real commit path,
// with a digest the caller vouches for (used for images too large to
// download in a unit test).
func plant(t testing.TB, c *Cache, path, digest, url string) Entry {
	t.Helper()
	p := c.pools["p"]
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	st := &partial{part: path, side: path + ".json", f: f, off: fi.Size(), fileSize: fi.Size()}
	info, err := c.imageInfo(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.parseRequest(Request{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.finish(); err != nil {
		t.Fatal(err)
	}
	e, err := c.commit(p, st, r, digest, info)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func mustEnsure(t testing.TB, c *Cache, req Request) Entry {
	t.Helper()
	e, err := c.Ensure(context.Background(), "p", req, nil)
	if err != nil {
		t.Fatalf("Ensure(%s): %v", req.URL, err)
	}
	return e
}

func fileSHA(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha(b)
}
