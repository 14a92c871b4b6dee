package imagecache

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// proxy is a forward HTTP proxy on loopback, named by HTTP_PROXY for this
// test binary (loopback targets are never proxied, so other tests are not
// affected). It serves proxyImages for the host images.test.
var (
	proxyMu     sync.Mutex
	proxyImages = map[string][]byte{}
	proxySeen   []string
)

func TestMain(m *testing.M) {
	if os.Getenv("IMAGECACHE_TEST_HELPER") == "ingest" {
		helperIngest()
		return
	}
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		proxyMu.Lock()
		proxySeen = append(proxySeen, r.URL.String())
		data, ok := proxyImages[r.URL.Path]
		proxyMu.Unlock()
		if r.URL.Host != "images.test" || !ok {
			http.Error(w, "no such upstream", http.StatusBadGateway)
			return
		}
		w.Write(data)
	}))
	os.Setenv("HTTP_PROXY", proxy.URL)
	os.Setenv("http_proxy", proxy.URL)
	os.Unsetenv("NO_PROXY")
	os.Unsetenv("no_proxy")
	code := m.Run()
	proxy.Close()
	os.Exit(code)
}

// helperIngest runs in a child process: one Ensure that reports on stdout
// once half the image is in, and then waits to be killed.
func helperIngest() {
	dir, url := os.Getenv("HELPER_DIR"), os.Getenv("HELPER_URL")
	half, _ := strconv.ParseInt(os.Getenv("HELPER_HALF"), 10, 64)
	c, err := Open([]PoolConfig{{Name: "p", Dir: dir, Default: true}},
		Options{MinFreeBytes: -1, chunkSize: 64 << 10, checkpointBytes: 256 << 10, retryBackoff: -1})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(2)
	}
	said := false
	_, err = c.Ensure(context.Background(), "p", Request{URL: url}, func(done, _ int64) {
		if done >= half && !said {
			said = true
			fmt.Println("half")
		}
	})
	fmt.Println("ensure returned:", err)
	os.Exit(3)
}

func TestCrashMidIngest(t *testing.T) {
	dir := t.TempDir()
	s := newImageServer(t)
	data := randomBytes(4<<20, 60)
	const half = 2 << 20
	stall := make(chan struct{})
	defer close(stall)
	url := s.add("/img", &served{data: data, etag: `"x1"`, stall: stall, stallAfter: half})

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "IMAGECACHE_TEST_HELPER=ingest", "HELPER_DIR="+dir, "HELPER_URL="+url, "HELPER_HALF="+strconv.Itoa(half))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "half\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper said %q, %v", line, err)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()

	// Reopen: no entry, nothing in the store or index, and in ingest/ at
	// most the resumable partial with a consistent sidecar.
	c := openCache(t, dir, testOptions(t))
	if es, _ := c.List("p"); len(es) != 0 {
		t.Fatalf("entries after crash: %+v", es)
	}
	for _, sub := range []string{"sha256", "index"} {
		if ents, _ := os.ReadDir(filepath.Join(dir, "images", sub)); len(ents) != 0 {
			t.Fatalf("%s after crash: %v", sub, ents)
		}
	}
	ents, _ := os.ReadDir(filepath.Join(dir, "images", "ingest"))
	var sc *sidecar
	for _, e := range ents {
		switch {
		case strings.HasSuffix(e.Name(), ".json"):
			sc, err = readSidecar(filepath.Join(dir, "images", "ingest", e.Name()))
			if err != nil {
				t.Fatal(err)
			}
		case strings.HasSuffix(e.Name(), ".part"):
		default:
			t.Fatalf("ingest leftover %s", e.Name())
		}
	}
	if len(ents) != 2 || sc == nil || sc.Bytes <= 0 || sc.Bytes > half {
		t.Fatalf("ingest = %v, sidecar %+v; want a partial checkpointed by the time half was reported", ents, sc)
	}

	// A new Ensure resumes from the checkpoint and completes.
	s.add("/img", &served{data: data, etag: `"x1"`})
	before := s.served()
	e, err := c.Ensure(context.Background(), "p", Request{URL: url}, nil)
	if err != nil || e.Digest != sha(data) || fileSHA(t, e.Path) != sha(data) {
		t.Fatalf("Ensure after crash = %+v, %v", e, err)
	}
	reqs := s.requests()
	if last := reqs[len(reqs)-1]; last.Range != fmt.Sprintf("bytes=%d-", sc.Bytes) {
		t.Fatalf("resume request %+v, want from %d", last, sc.Bytes)
	}
	if got := s.served() - before; got != int64(len(data))-sc.Bytes {
		t.Fatalf("resume fetched %d bytes, want %d", got, int64(len(data))-sc.Bytes)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "images", "ingest")); len(ents) != 0 {
		t.Fatalf("ingest leftovers: %v", ents)
	}
}

func TestOpenSweepsAndReconciles(t *testing.T) {
	c, dir := newCache(t, testOptions(t))
	s := newImageServer(t)
	kept := randomBytes(1<<20, 61)
	e := mustEnsure(t, c, Request{URL: s.add("/kept", &served{data: kept})})
	lost := randomBytes(1<<20, 62)
	eLost := mustEnsure(t, c, Request{URL: s.add("/lost", &served{data: lost})})
	if err := c.CreateOverlay(context.Background(), "p", eLost.Digest, filepath.Join(dir, "vms", "d"), 0, "vm9"); err != nil {
		t.Fatal(err)
	}
	c.Close()

	ing := filepath.Join(dir, "images", "ingest")
	write := func(path, s string) {
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// Leftovers of interrupted work.
	write(filepath.Join(ing, "aaaa.part"), "orphan partial without sidecar")
	write(filepath.Join(ing, "bbbb.json"), "{not json")
	write(filepath.Join(ing, "bbbb.part"), "x")
	write(filepath.Join(ing, "cccc.json.tmp"), "{}")
	old, _ := json.Marshal(sidecar{Version: sidecarVersion, URL: "http://x/", Bytes: 1, Updated: time.Now().Add(-48 * time.Hour)})
	write(filepath.Join(ing, "dddd.json"), string(old))
	write(filepath.Join(ing, "dddd.part"), "x")
	short, _ := json.Marshal(sidecar{Version: sidecarVersion, URL: "http://x/", Bytes: 100, Updated: time.Now()})
	write(filepath.Join(ing, "eeee.json"), string(short))
	write(filepath.Join(ing, "eeee.part"), "only a few bytes")
	// A record whose file never got renamed in (crash before the commit
	// point), a stray file in the store, a temporary index file.
	ghost := sha([]byte("ghost"))
	write(filepath.Join(dir, "images", "index", ghost+".json"), `{"version":1,"digest":"`+ghost+`","format":"raw","size":5}`)
	write(filepath.Join(dir, "images", "sha256", "not-a-digest"), "junk")
	write(filepath.Join(dir, "images", "index", e.Digest+".json.tmp"), "junk")
	// A committed file whose record was lost: rebuilt, not deleted (a VM
	// disk may back onto it); its pins are gone with the record, so it is
	// re-described from qemu-img.
	os.Remove(filepath.Join(dir, "images", "index", eLost.Digest+".json"))

	c = openCache(t, dir, testOptions(t))
	if ents, _ := os.ReadDir(ing); len(ents) != 0 {
		t.Fatalf("ingest after Open: %v", ents)
	}
	wantDigests(t, c, e.Digest, eLost.Digest)
	for _, sub := range []string{"sha256", "index"} {
		ents, _ := os.ReadDir(filepath.Join(dir, "images", sub))
		if len(ents) != 2 {
			t.Fatalf("%s after Open: %v", sub, ents)
		}
	}
	es, _ := c.List("p")
	for _, x := range es {
		if x.Digest == e.Digest && (len(x.URLs) != 1 || x.Format != "raw") {
			t.Fatalf("kept entry changed: %+v", x)
		}
	}
}

func TestOpenPools(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	bad := []struct {
		name  string
		pools []PoolConfig
	}{
		{"two defaults", []PoolConfig{{Name: "a", Dir: a, Default: true}, {Name: "b", Dir: b, Default: true}}},
		{"duplicate name", []PoolConfig{{Name: "a", Dir: a}, {Name: "a", Dir: b}}},
		{"nested dirs", []PoolConfig{{Name: "a", Dir: a}, {Name: "b", Dir: filepath.Join(a, "sub")}}},
		{"same dir", []PoolConfig{{Name: "a", Dir: a}, {Name: "b", Dir: a + "/."}}},
		{"relative dir", []PoolConfig{{Name: "a", Dir: "pool"}}},
		{"bad name", []PoolConfig{{Name: "../x", Dir: a}}},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Open(tt.pools, testOptions(t))
			if err == nil {
				c.Close()
			}
			wantCode(t, err, errcode.ValidationFailed)
		})
	}

	c, err := Open([]PoolConfig{{Name: "a", Dir: a}, {Name: "b", Dir: b, Default: true}}, testOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if d, err := c.DefaultPool(); d != "b" || err != nil {
		t.Fatalf("DefaultPool = %q, %v", d, err)
	}
	if d, err := c.PoolDir("a"); d != a || err != nil {
		t.Fatalf("PoolDir = %q, %v", d, err)
	}
	if _, err := os.Stat(filepath.Join(a, "vms")); err != nil {
		t.Fatal(err)
	}
	_, err = c.PoolDir("zz")
	wantCode(t, err, errcode.PoolNotFound)
	_, err = c.List("zz")
	wantCode(t, err, errcode.PoolNotFound)
	st := c.Stats()
	if len(st) != 2 || st[0].Name != "a" || st[1].Name != "b" || !st[1].Default || st[0].Images != 0 {
		t.Fatalf("Stats = %+v", st)
	}
	// A second process (or Cache) on the same pool is refused.
	_, err = Open([]PoolConfig{{Name: "a", Dir: a}}, testOptions(t))
	wantCode(t, err, errcode.Conflict)

	c2, err := Open([]PoolConfig{{Name: "x", Dir: t.TempDir()}}, testOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	_, err = c2.DefaultPool()
	wantCode(t, err, errcode.DefaultPoolNotSet)
}
