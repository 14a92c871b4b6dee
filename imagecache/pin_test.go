package imagecache

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// TestPin: an entry pinned with Pin (no overlay) survives eviction and a
// restart, its record on disk names the owner, pinning twice keeps one
// pin, it coexists with an overlay's pin, and once every pin is dropped
// the entry is evictable again. Pin on an entry that is gone is
// not_found; bad arguments are refused.
func TestPin(t *testing.T) {
	const size = 1 << 20
	opts := testOptions(t)
	opts.MaxCacheBytes = 2*size + size/2 // room for two images
	c, dir := newCache(t, opts)
	s := newImageServer(t)
	img := func(name string, seed uint64) (string, string) {
		data := randomBytes(size, seed)
		return s.add("/"+name, &served{data: data}), sha(data)
	}
	uA, a := img("a", 60)
	uB, b := img("b", 61)
	uC, cc := img("c", 62)
	uD, d := img("d", 63)

	mustEnsure(t, c, Request{URL: uA})
	for range 2 {
		if err := c.Pin("p", a, "vm1:cdrom"); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.CreateOverlay(context.Background(), "p", a, filepath.Join(dir, "vms", "vm2.qcow2"), 0, "vm2"); err != nil {
		t.Fatal(err)
	}
	wantPins(t, c, a, "vm1:cdrom", "vm2")
	rec, err := readRecord(filepath.Join(dir, "images", "index", a+".json"))
	if err != nil || !slices.Equal(rec.PinnedBy, []string{"vm1:cdrom", "vm2"}) {
		t.Fatalf("index record: %+v %v", rec, err)
	}
	if err := os.Remove(filepath.Join(dir, "vms", "vm2.qcow2")); err != nil {
		t.Fatal(err)
	}
	if err := c.Unpin("p", a, "vm2"); err != nil {
		t.Fatal(err)
	}

	// A is the least recently used; the ingest of C goes over the limit
	// and evicts B, not the pinned A.
	mustEnsure(t, c, Request{URL: uB})
	mustEnsure(t, c, Request{URL: uC})
	wantDigests(t, c, a, cc)
	wantCode(t, c.Evict(context.Background(), "p", a), errcode.Conflict)

	// The pin survives a restart.
	c.Close()
	c = openCache(t, dir, opts)
	wantPins(t, c, a, "vm1:cdrom")
	mustEnsure(t, c, Request{URL: uD}) // C goes, A stays
	wantDigests(t, c, a, d)

	// Unpinned, A is evictable again: the LRU goes at the next ingest.
	if err := c.Unpin("p", a, "vm1:cdrom"); err != nil {
		t.Fatal(err)
	}
	wantPins(t, c, a)
	mustEnsure(t, c, Request{URL: uB})
	wantDigests(t, c, d, b)

	// Gone (evicted between Ensure and Pin): not_found, and no record
	// comes back.
	wantCode(t, c.Pin("p", a, "vm1:cdrom"), errcode.NotFound)
	if _, err := os.Stat(filepath.Join(dir, "images", "index", a+".json")); !os.IsNotExist(err) {
		t.Fatalf("record of an evicted entry after Pin: %v", err)
	}
	wantCode(t, c.Pin("nope", b, "vm1"), errcode.PoolNotFound)
	wantCode(t, c.Pin("p", "ABC", "vm1"), errcode.ValidationFailed)
	for _, owner := range []string{"", "a b", "x\n", string(make([]byte, 129))} {
		wantCode(t, c.Pin("p", b, owner), errcode.ValidationFailed)
	}
	wantPins(t, c, b)
}

func wantPins(t *testing.T, c *Cache, digest string, owners ...string) {
	t.Helper()
	es, err := c.List("p")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if e.Digest == digest {
			if !slices.Equal(e.PinnedBy, owners) {
				t.Fatalf("%s pinned by %q, want %q", digest[:12], e.PinnedBy, owners)
			}
			return
		}
	}
	t.Fatalf("cache lacks %s", digest[:12])
}
