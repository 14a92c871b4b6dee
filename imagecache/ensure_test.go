package imagecache

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/internal/errcode"
)

func TestEnsureDownloadsOnceThenHits(t *testing.T) {
	c, dir := newCache(t, testOptions(t))
	s := newImageServer(t)
	data := randomBytes(3<<20+1536, 1)
	url := s.add("/img.raw", &served{data: data, etag: `"v1"`})

	var last [2]int64
	e, err := c.Ensure(context.Background(), "p", Request{URL: url}, func(done, total int64) { last = [2]int64{done, total} })
	if err != nil {
		t.Fatal(err)
	}
	if e.Digest != sha(data) || e.Format != "raw" || e.Size != int64(len(data)) || e.VirtualSize != int64(len(data)) {
		t.Fatalf("entry = %+v", e)
	}
	if want := filepath.Join(dir, "images", "sha256", sha(data)); e.Path != want {
		t.Fatalf("Path = %s, want %s", e.Path, want)
	}
	if last != [2]int64{int64(len(data)), int64(len(data))} {
		t.Fatalf("last progress = %v", last)
	}
	fi, err := os.Stat(e.Path)
	if err != nil || fi.Mode().Perm() != 0o444 {
		t.Fatalf("cached file: %v, %v; want mode 0444", fi, err)
	}
	if got := fileSHA(t, e.Path); got != sha(data) {
		t.Fatalf("cached file sha = %s", got)
	}
	if len(e.URLs) != 1 || e.URLs[0] != url {
		t.Fatalf("URLs = %v", e.URLs)
	}
	// Hits: by URL, and by digest from another URL; no new download.
	e2 := mustEnsure(t, c, Request{URL: url, Format: "raw"})
	e3 := mustEnsure(t, c, Request{URL: s.URL + "/mirror.raw", SHA256: "SHA256:" + strings.ToUpper(sha(data))})
	if e2.Digest != e.Digest || e3.Digest != e.Digest || len(e3.URLs) != 2 {
		t.Fatalf("hits = %+v, %+v", e2, e3)
	}
	if !e3.LastUsed.After(e.LastUsed) {
		t.Errorf("LastUsed not updated by a hit: %v then %v", e.LastUsed, e3.LastUsed)
	}
	if n := len(s.requests()); n != 1 {
		t.Fatalf("server saw %d requests, want 1", n)
	}
	st := c.Stats()
	if len(st) != 1 || st[0].Images != 1 || st[0].CacheBytes < int64(len(data)) || st[0].TotalBytes <= 0 || st[0].FreeBytes <= 0 || !st[0].Default {
		t.Fatalf("Stats = %+v", st)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "images", "ingest")); len(ents) != 0 {
		t.Fatalf("ingest leftovers: %v", ents)
	}
	// The index survives a restart.
	c.Close()
	c = openCache(t, dir, testOptions(t))
	es, err := c.List("p")
	if err != nil || len(es) != 1 || es[0].Digest != e.Digest || len(es[0].URLs) != 2 {
		t.Fatalf("List after restart = %+v, %v", es, err)
	}
	mustEnsure(t, c, Request{URL: url})
	if n := len(s.requests()); n != 1 {
		t.Fatalf("server saw %d requests after restart, want 1", n)
	}
}

func TestEnsureChecksumMismatchLeavesNothing(t *testing.T) {
	c, dir := newCache(t, testOptions(t))
	s := newImageServer(t)
	data := randomBytes(2<<20, 2)
	url := s.add("/img", &served{data: data})
	_, err := c.Ensure(context.Background(), "p", Request{URL: url, SHA256: sha([]byte("other"))}, nil)
	wantCode(t, err, errcode.ImageChecksumMismatch)
	if !strings.Contains(err.Error(), sha(data)) {
		t.Errorf("message lacks the computed digest: %v", err)
	}
	wantEmptyCache(t, c, dir)
	// The right digest works.
	if e := mustEnsure(t, c, Request{URL: url, SHA256: sha(data)}); e.Digest != sha(data) {
		t.Fatal(e)
	}
}

func TestEnsureBrokenTransfers(t *testing.T) {
	data := randomBytes(1<<20, 3)
	tests := []struct {
		name string
		f    *served
		req  func(url string) Request
		code errcode.Code
	}{
		// A chunked body cut in the middle, every time: retried, then failed.
		{"truncated chunked body", &served{data: data, chunked: true, drops: []int64{300 << 10, 300 << 10, 300 << 10, 300 << 10, 300 << 10}},
			func(u string) Request { return Request{URL: u} }, errcode.ImageDownloadFailed},
		// Content-Length claims more than is sent.
		{"content-length too large", &served{data: data, declaredLen: int64(len(data)) + 1000},
			func(u string) Request { return Request{URL: u} }, errcode.ImageDownloadFailed},
		// Content-Length claims less: the image is short, the digest says so.
		{"content-length too small", &served{data: data, declaredLen: int64(len(data)) - 1000},
			func(u string) Request { return Request{URL: u, SHA256: sha(data)} }, errcode.ImageChecksumMismatch},
		{"not found", &served{status: 404}, func(u string) Request { return Request{URL: u} }, errcode.ImageDownloadFailed},
		{"server error", &served{status: 500}, func(u string) Request { return Request{URL: u} }, errcode.ImageDownloadFailed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, dir := newCache(t, testOptions(t))
			s := newImageServer(t)
			url := s.add("/img", tt.f)
			_, err := c.Ensure(context.Background(), "p", tt.req(url), nil)
			wantCode(t, err, tt.code)
			if tt.f.status != 0 && !strings.Contains(err.Error(), http_status(tt.f.status)) {
				t.Errorf("message lacks the HTTP status: %v", err)
			}
			wantEmptyCache(t, c, dir)
			if n := len(s.requests()); tt.f.status != 0 && n != 1 {
				t.Errorf("%d requests for a status error, want 1 (no retry)", n)
			}
			if n := len(s.requests()); tt.f.drops != nil && n < 2 {
				t.Errorf("%d requests for a dropped stream, want retries", n)
			}
		})
	}
}

func http_status(code int) string {
	return map[int]string{404: "404 Not Found", 500: "500 Internal Server Error"}[code]
}

func TestEnsureResumesWithRange(t *testing.T) {
	for _, tt := range []struct {
		name string
		f    func(data []byte) *served
	}{
		{"etag", func(d []byte) *served { return &served{data: d, etag: `"abc"`} }},
		{"last-modified", func(d []byte) *served {
			return &served{data: d, modTime: time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, dir := newCache(t, testOptions(t))
			s := newImageServer(t)
			data := randomBytes(3<<20, 4)
			const cut = 1<<20 + 4567
			f := tt.f(data)
			f.drops = []int64{cut}
			url := s.add("/img", f)
			e := mustEnsure(t, c, Request{URL: url})
			if e.Digest != sha(data) || fileSHA(t, e.Path) != sha(data) {
				t.Fatalf("digest %s, want %s", e.Digest, sha(data))
			}
			reqs := s.requests()
			if len(reqs) != 2 {
				t.Fatalf("requests = %+v, want 2", reqs)
			}
			if want := "bytes=1053143-"; reqs[1].Range != want || reqs[1].IfRange == "" {
				t.Fatalf("second request Range %q If-Range %q, want %q with If-Range", reqs[1].Range, reqs[1].IfRange, want)
			}
			// The server sent every byte exactly once.
			if got := s.served(); got != int64(len(data)) {
				t.Fatalf("server sent %d bytes, want %d", got, len(data))
			}
			if ents, _ := os.ReadDir(filepath.Join(dir, "images", "ingest")); len(ents) != 0 {
				t.Fatalf("ingest leftovers: %v", ents)
			}
		})
	}
}

func TestEnsureStartsOverWithoutRangeSupport(t *testing.T) {
	c, _ := newCache(t, testOptions(t))
	s := newImageServer(t)
	data := randomBytes(2<<20, 5)
	const cut = 700 << 10
	url := s.add("/img", &served{data: data, noRange: true, modTime: time.Unix(1e9, 0), drops: []int64{cut}})
	e := mustEnsure(t, c, Request{URL: url})
	if e.Digest != sha(data) || fileSHA(t, e.Path) != sha(data) {
		t.Fatalf("digest %s, want %s", e.Digest, sha(data))
	}
	reqs := s.requests()
	if len(reqs) != 2 || reqs[1].Range == "" {
		t.Fatalf("requests = %+v; want a range request answered in full", reqs)
	}
	if got := s.served(); got != cut+int64(len(data)) {
		t.Fatalf("server sent %d bytes, want %d", got, cut+len(data))
	}
}

func TestEnsureStartsOverWhenValidatorChanges(t *testing.T) {
	c, _ := newCache(t, testOptions(t))
	s := newImageServer(t)
	v1, v2 := randomBytes(2<<20, 6), randomBytes(2<<20, 7)
	const cut = 900 << 10
	url := s.add("/img", &served{data: v1, etag: `"v1"`, drops: []int64{cut}})
	// The file changes between the cut response and the retry.
	s.onRequest = func(path string, n int) {
		if n == 1 {
			s.files[path] = &served{data: v2, etag: `"v2"`}
		}
	}
	e := mustEnsure(t, c, Request{URL: url})
	if e.Digest != sha(v2) || fileSHA(t, e.Path) != sha(v2) {
		t.Fatalf("digest %s, want the new content %s", e.Digest, sha(v2))
	}
	reqs := s.requests()
	if len(reqs) != 2 || reqs[1].IfRange != `"v1"` || reqs[1].Range == "" {
		t.Fatalf("requests = %+v", reqs)
	}
	if got := s.served(); got != cut+int64(len(v2)) {
		t.Fatalf("server sent %d bytes, want %d (cut, then all of v2)", got, cut+len(v2))
	}
}

func TestEnsureRedirects(t *testing.T) {
	c, _ := newCache(t, testOptions(t))
	s := newImageServer(t)
	data := randomBytes(1<<20, 8)
	s.add("/real", &served{data: data})
	s.add("/r3", &served{redirect: "/r2"})
	s.add("/r2", &served{redirect: "/r1"})
	s.add("/r1", &served{redirect: "/real"})
	if e := mustEnsure(t, c, Request{URL: s.URL + "/r3"}); e.Digest != sha(data) {
		t.Fatal(e)
	}
	loop := s.add("/loop", &served{redirect: "/loop"})
	_, err := c.Ensure(context.Background(), "p", Request{URL: loop}, nil)
	wantCode(t, err, errcode.ImageDownloadFailed)
	if !strings.Contains(err.Error(), "redirects") {
		t.Errorf("message: %v", err)
	}
	n := 0
	for _, r := range s.requests() {
		if r.Path == "/loop" {
			n++
		}
	}
	if n != maxRedirects {
		t.Errorf("loop requests = %d, want %d", n, maxRedirects)
	}
}

func TestEnsureSharesOneDownload(t *testing.T) {
	const n = 20
	opts := testOptions(t)
	joined := make(chan struct{}, n)
	opts.joined = func() { joined <- struct{}{} }
	c, _ := newCache(t, opts)
	s := newImageServer(t)
	data := randomBytes(2<<20, 9)
	gate := make(chan struct{})
	url := s.add("/img", &served{data: data, gate: gate})
	type result struct {
		e   Entry
		err error
	}
	results := make(chan result, n)
	for range n {
		go func() {
			e, err := c.Ensure(context.Background(), "p", Request{URL: url}, nil)
			results <- result{e, err}
		}()
	}
	for range n {
		<-joined
	}
	close(gate)
	for range n {
		r := <-results
		if r.err != nil || r.e.Digest != sha(data) {
			t.Fatalf("Ensure = %+v, %v", r.e, r.err)
		}
	}
	if reqs := s.requests(); len(reqs) != 1 || s.served() != int64(len(data)) {
		t.Fatalf("server saw %d requests, sent %d bytes; want 1 full download", len(reqs), s.served())
	}
}

func TestEnsureWaiterLeavesOthersStay(t *testing.T) {
	opts := testOptions(t)
	joined := make(chan struct{}, 2)
	opts.joined = func() { joined <- struct{}{} }
	c, dir := newCache(t, opts)
	s := newImageServer(t)
	data := randomBytes(1<<20, 10)
	gate := make(chan struct{})
	url := s.add("/img", &served{data: data, gate: gate})

	ctxA, cancelA := context.WithCancel(context.Background())
	errA := make(chan error, 1)
	go func() { _, err := c.Ensure(ctxA, "p", Request{URL: url}, nil); errA <- err }()
	resB := make(chan error, 1)
	go func() {
		e, err := c.Ensure(context.Background(), "p", Request{URL: url}, nil)
		if err == nil && e.Digest != sha(data) {
			err = errors.New("wrong digest")
		}
		resB <- err
	}()
	<-joined
	<-joined
	cancelA()
	err := <-errA
	wantCode(t, err, errcode.Cancelled)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("error %v does not wrap context.Canceled", err)
	}
	close(gate)
	if err := <-resB; err != nil {
		t.Fatal(err)
	}

	// When every waiter leaves, the download is cancelled.
	left := make(chan struct{})
	gate2 := make(chan struct{})
	url2 := s.add("/img2", &served{data: randomBytes(1<<20, 11), gate: gate2, left: left})
	arrived := make(chan struct{}, 1)
	s.onRequest = func(path string, _ int) {
		if path == "/img2" {
			arrived <- struct{}{}
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { _, err := c.Ensure(ctx, "p", Request{URL: url2}, nil); errc <- err }()
	<-joined
	<-arrived
	cancel()
	wantCode(t, <-errc, errcode.Cancelled)
	<-left // the server saw the client go
	c.Close()
	if ents, _ := os.ReadDir(filepath.Join(dir, "images", "ingest")); len(ents) != 0 {
		t.Fatalf("ingest leftovers: %v", ents)
	}
}

func TestEnsureParallelLimit(t *testing.T) {
	opts := testOptions(t)
	opts.MaxConcurrentDownloads = 2
	c, _ := newCache(t, opts)
	s := newImageServer(t)
	// The first two downloads must be in flight together before either
	// may answer: that proves they run in parallel.
	arrived := make(chan struct{}, 3)
	gate := make(chan struct{})
	var urls []string
	for i := range 3 {
		f := &served{data: randomBytes(512<<10, uint64(20+i)), gate: gate}
		urls = append(urls, s.add("/img"+string(rune('a'+i)), f))
	}
	s.onRequest = func(string, int) { arrived <- struct{}{} }
	errc := make(chan error, 3)
	for _, u := range urls {
		go func() { _, err := c.Ensure(context.Background(), "p", Request{URL: u}, nil); errc <- err }()
	}
	<-arrived
	<-arrived
	close(gate)
	for range 3 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	s.mu.Lock()
	peak := s.peak
	s.mu.Unlock()
	if peak != 2 {
		t.Fatalf("peak concurrent downloads = %d, want 2", peak)
	}
}

func TestEnsureResumesAfterCancelAndRestart(t *testing.T) {
	opts := testOptions(t)
	c, dir := newCache(t, opts)
	s := newImageServer(t)
	data := randomBytes(4<<20, 12)
	const half = 2 << 20
	f := &served{data: data, etag: `"e1"`, stall: make(chan struct{}), stallAfter: half}
	url := s.add("/img", f)
	ctx, cancel := context.WithCancel(context.Background())
	reached := make(chan struct{})
	var once sync.Once
	errc := make(chan error, 1)
	go func() {
		_, err := c.Ensure(ctx, "p", Request{URL: url}, func(done, _ int64) {
			if done >= half {
				once.Do(func() { close(reached) })
			}
		})
		errc <- err
	}()
	<-reached
	cancel()
	wantCode(t, <-errc, errcode.Cancelled)
	c.Close() // waits for the download to wind down
	ents, _ := os.ReadDir(filepath.Join(dir, "images", "ingest"))
	if len(ents) != 2 {
		t.Fatalf("ingest = %v, want a partial and its sidecar", ents)
	}

	c = openCache(t, dir, opts)
	s.add("/img", &served{data: data, etag: `"e1"`})
	before := s.served()
	e := mustEnsure(t, c, Request{URL: url})
	if e.Digest != sha(data) || fileSHA(t, e.Path) != sha(data) {
		t.Fatalf("digest %s, want %s", e.Digest, sha(data))
	}
	reqs := s.requests()
	if last := reqs[len(reqs)-1]; last.Range != "bytes=2097152-" || last.IfRange != `"e1"` {
		t.Fatalf("resume request = %+v", last)
	}
	if got := s.served() - before; got != int64(len(data))-half {
		t.Fatalf("resume fetched %d bytes, want %d", got, len(data)-half)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "images", "ingest")); len(ents) != 0 {
		t.Fatalf("ingest leftovers: %v", ents)
	}
}

func TestEnsureURLPolicy(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	data := randomBytes(1<<20, 13)
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	c, _ := newCache(t, testOptions(t))
	for _, u := range []string{"file://" + img, "ftp://example.com/x.img", "gopher://x/", "http:///nohost", "", " http://x/", "https://"} {
		_, err := c.Ensure(context.Background(), "p", Request{URL: u}, nil)
		wantCode(t, err, errcode.ValidationFailed)
	}
	_, err := c.Ensure(context.Background(), "p", Request{URL: "http://127.0.0.1/x", SHA256: "abc"}, nil)
	wantCode(t, err, errcode.ValidationFailed)
	_, err = c.Ensure(context.Background(), "p", Request{URL: "http://127.0.0.1/x", Format: "vmdk"}, nil)
	wantCode(t, err, errcode.ValidationFailed)
	_, err = c.Ensure(context.Background(), "nope", Request{URL: "http://127.0.0.1/x"}, nil)
	wantCode(t, err, errcode.PoolNotFound)

	opts := testOptions(t)
	opts.AllowFileURLs = true
	c2, _ := newCache(t, opts)
	e, err := c2.Ensure(context.Background(), "p", Request{URL: "file://" + img}, nil)
	if err != nil || e.Digest != sha(data) {
		t.Fatalf("file URL: %+v, %v", e, err)
	}
	_, err = c2.Ensure(context.Background(), "p", Request{URL: "file://" + img + ".missing"}, nil)
	wantCode(t, err, errcode.ImageDownloadFailed)
	_, err = c2.Ensure(context.Background(), "p", Request{URL: "file://otherhost/etc/hostname"}, nil)
	wantCode(t, err, errcode.ValidationFailed)
}

func TestEnsureMaxImageBytes(t *testing.T) {
	opts := testOptions(t)
	opts.MaxImageBytes = 1 << 20
	c, dir := newCache(t, opts)
	s := newImageServer(t)
	data := randomBytes(2<<20, 14)
	for _, f := range []*served{{data: data}, {data: data, chunked: true}} {
		url := s.add("/img", f)
		_, err := c.Ensure(context.Background(), "p", Request{URL: url}, nil)
		wantCode(t, err, errcode.ImageDownloadFailed)
		wantEmptyCache(t, c, dir)
	}
}

func TestEnsureSparseRaw(t *testing.T) {
	c, _ := newCache(t, testOptions(t))
	s := newImageServer(t)
	data := make([]byte, 32<<20)
	copy(data, randomBytes(1<<20, 15))
	copy(data[20<<20:], randomBytes(100, 16))
	e := mustEnsure(t, c, Request{URL: s.add("/sparse", &served{data: data})})
	if e.Size != int64(len(data)) || fileSHA(t, e.Path) != sha(data) {
		t.Fatalf("entry %+v", e)
	}
	if e.DiskBytes > 2<<20 {
		t.Fatalf("cached file takes %d bytes on disk; want holes for the zeros", e.DiskBytes)
	}
}

func TestEnsureUsesProxyFromEnvironment(t *testing.T) {
	c, _ := newCache(t, testOptions(t))
	data := randomBytes(1<<20, 17)
	proxyMu.Lock()
	proxyImages["/via-proxy.img"] = data
	proxyMu.Unlock()
	e := mustEnsure(t, c, Request{URL: "http://images.test/via-proxy.img"})
	if e.Digest != sha(data) {
		t.Fatal(e)
	}
	proxyMu.Lock()
	defer proxyMu.Unlock()
	if !contains(proxySeen, "http://images.test/via-proxy.img") {
		t.Fatalf("proxy saw %v", proxySeen)
	}
}

func TestEnsureTLS(t *testing.T) {
	data := randomBytes(1<<20, 18)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/down" {
			http.Redirect(w, r, "http://127.0.0.1:1/img", http.StatusFound)
			return
		}
		w.Write(data)
	}))
	defer srv.Close()
	// The default client verifies certificates: a self-signed one fails,
	// without retries.
	c, dir := newCache(t, testOptions(t))
	_, err := c.Ensure(context.Background(), "p", Request{URL: srv.URL + "/img"}, nil)
	wantCode(t, err, errcode.ImageDownloadFailed)
	if !strings.Contains(err.Error(), "certificate") {
		t.Errorf("message: %v", err)
	}
	wantEmptyCache(t, c, dir)

	// A client that trusts the server's CA works; a redirect from https to
	// http is still refused.
	opts := testOptions(t)
	opts.HTTPClient = srv.Client()
	c2, _ := newCache(t, opts)
	if e := mustEnsure(t, c2, Request{URL: srv.URL + "/img"}); e.Digest != sha(data) {
		t.Fatal(e)
	}
	_, err = c2.Ensure(context.Background(), "p", Request{URL: srv.URL + "/down"}, nil)
	wantCode(t, err, errcode.ImageDownloadFailed)
}

func TestEnsureIdleStreamIsRetried(t *testing.T) {
	opts := testOptions(t)
	opts.idleTimeout = 200 * time.Millisecond
	c, _ := newCache(t, opts)
	s := newImageServer(t)
	data := randomBytes(2<<20, 19)
	// The first response stalls after 1 MiB and never goes on; the retry
	// resumes from there.
	url := s.add("/img", &served{data: data, etag: `"s"`, stall: make(chan struct{}), stallAfter: 1 << 20})
	s.onRequest = func(path string, n int) {
		if n == 1 {
			s.files[path] = &served{data: data, etag: `"s"`}
		}
	}
	e := mustEnsure(t, c, Request{URL: url})
	if e.Digest != sha(data) {
		t.Fatal(e)
	}
	reqs := s.requests()
	if len(reqs) != 2 || reqs[1].Range != "bytes=1048576-" {
		t.Fatalf("requests = %+v", reqs)
	}
}
