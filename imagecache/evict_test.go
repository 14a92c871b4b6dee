package imagecache

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/otherix/otherix-agent/internal/errcode"
)

func TestEvictionLRUNeverPinned(t *testing.T) {
	const size = 1 << 20
	opts := testOptions(t)
	opts.MaxCacheBytes = 2*size + size/2 // room for two images
	c, dir := newCache(t, opts)
	s := newImageServer(t)
	img := func(name string, seed uint64) (string, string) {
		data := randomBytes(size, seed)
		return s.add("/"+name, &served{data: data}), sha(data)
	}
	uA, a := img("a", 40)
	uB, b := img("b", 41)
	uC, cc := img("c", 42)
	uD, d := img("d", 43)
	uE, e := img("e", 44)

	mustEnsure(t, c, Request{URL: uA})
	mustEnsure(t, c, Request{URL: uB})
	mustEnsure(t, c, Request{URL: uA}) // A is now more recent than B
	mustEnsure(t, c, Request{URL: uC}) // over the limit: B, the LRU, goes
	wantDigests(t, c, a, cc)

	// Pin A, then make it the least recently used: the next eviction must
	// skip it and take C.
	if err := c.CreateOverlay(context.Background(), "p", a, filepath.Join(dir, "vms", "vm1.qcow2"), 0, "vm1"); err != nil {
		t.Fatal(err)
	}
	mustEnsure(t, c, Request{URL: uC}) // A (pinned) is now the LRU
	mustEnsure(t, c, Request{URL: uD}) // over the limit: A is skipped, C goes
	wantDigests(t, c, a, d)

	// Pins survive a restart.
	c.Close()
	c = openCache(t, dir, opts)
	mustEnsure(t, c, Request{URL: uE})
	wantDigests(t, c, a, e)

	err := c.Evict(context.Background(), "p", a)
	wantCode(t, err, errcode.Conflict)
	wantCode(t, c.Evict(context.Background(), "p", b), errcode.NotFound)
	wantCode(t, c.Evict(context.Background(), "nope", a), errcode.PoolNotFound)
	if err := c.Unpin("p", a, "vm1"); err != nil {
		t.Fatal(err)
	}
	if err := c.Unpin("p", a, "vm1"); err != nil { // idempotent
		t.Fatal(err)
	}
	if err := c.Evict(context.Background(), "p", a); err != nil {
		t.Fatal(err)
	}
	wantDigests(t, c, e)
	if _, err := os.Stat(filepath.Join(dir, "images", "sha256", a)); !os.IsNotExist(err) {
		t.Fatalf("evicted file still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "images", "index", a+".json")); !os.IsNotExist(err) {
		t.Fatalf("evicted record still there: %v", err)
	}
}

func TestPrune(t *testing.T) {
	opts := testOptions(t)
	c, dir := newCache(t, opts)
	s := newImageServer(t)
	var digests []string
	for i := range 3 {
		data := randomBytes(1<<20, uint64(50+i))
		mustEnsure(t, c, Request{URL: s.add("/"+string(rune('a'+i)), &served{data: data})})
		digests = append(digests, sha(data))
	}
	if err := c.CreateOverlay(context.Background(), "p", digests[0], filepath.Join(dir, "vms", "x"), 0, "vm"); err != nil {
		t.Fatal(err)
	}
	c.opts.MaxCacheBytes = 1 // everything unpinned must go
	got, err := c.Prune(context.Background(), "p")
	if err != nil || len(got) != 2 || got[0] != digests[1] || got[1] != digests[2] {
		t.Fatalf("Prune = %v, %v; want %v in LRU order", got, err, digests[1:])
	}
	wantDigests(t, c, digests[0])
}

func wantDigests(t *testing.T, c *Cache, want ...string) {
	t.Helper()
	es, err := c.List("p")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, e := range es {
		got[e.Digest] = true
	}
	if len(got) != len(want) {
		t.Fatalf("cache holds %d entries, want %d", len(got), len(want))
	}
	for _, w := range want {
		if !got[w] {
			t.Fatalf("cache lacks %s", w[:12])
		}
	}
}
