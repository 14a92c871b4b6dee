package imagecache

import (
	"context"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// tmpfs mounts a small tmpfs on a temporary directory (we are root in CI)
// and unmounts it at cleanup.
func tmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size+",mode=0755"); err != nil {
		t.Skipf("cannot mount a tmpfs (need root): %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

func TestDiskFull(t *testing.T) {
	data := randomBytes(30<<20, 70)
	tests := []struct {
		name    string
		f       *served
		minFree int64
	}{
		// Content-Length says it cannot fit: refused before writing.
		{"checked up front", &served{data: data}, 1 << 20},
		// Unknown length: the floor is hit while writing.
		{"floor hit while writing", &served{data: data, chunked: true}, 4 << 20},
		// No floor: the write itself fails with ENOSPC.
		{"ENOSPC", &served{data: data, chunked: true}, -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := tmpfs(t, "20m")
			opts := testOptions(t)
			opts.MinFreeBytes = tt.minFree
			c := openCache(t, dir, opts)
			s := newImageServer(t)
			_, freeBefore, _ := fsSpace(dir)
			_, err := c.Ensure(context.Background(), "p", Request{URL: s.add("/big", tt.f)}, nil)
			wantCode(t, err, errcode.DiskFull)
			wantEmptyCache(t, c, dir)
			if _, free, _ := fsSpace(dir); free < freeBefore {
				t.Fatalf("free space %d after failure, %d before", free, freeBefore)
			}
			if tt.name == "checked up front" && s.served() >= int64(len(data)) {
				t.Errorf("the whole body was sent although it could not fit")
			}
			// The pool still works.
			small := randomBytes(2<<20, 71)
			if e := mustEnsure(t, c, Request{URL: s.add("/small", &served{data: small})}); e.Digest != sha(small) {
				t.Fatal(e)
			}
			c.Close()
		})
	}
}

// An image that does not fit unless the cache evicts: the pre-check
// makes room from unpinned entries.
func TestDiskFullEvictsToMakeRoom(t *testing.T) {
	dir := tmpfs(t, "20m")
	opts := testOptions(t)
	c := openCache(t, dir, opts)
	s := newImageServer(t)
	old := randomBytes(8<<20, 72)
	mustEnsure(t, c, Request{URL: s.add("/old", &served{data: old})})
	next := randomBytes(12<<20, 73)
	e := mustEnsure(t, c, Request{URL: s.add("/next", &served{data: next})})
	wantDigests(t, c, e.Digest)
	if _, err := os.Stat(e.Path); err != nil {
		t.Fatal(err)
	}
}

// An image larger than the pool could ever hold fails at once, with both
// sizes in the message, and the cache keeps its unused images.
func TestDiskFullNeverFits(t *testing.T) {
	dir := tmpfs(t, "20m")
	c := openCache(t, dir, testOptions(t))
	s := newImageServer(t)
	old := mustEnsure(t, c, Request{URL: s.add("/old", &served{data: randomBytes(6<<20, 74)})})
	huge := randomBytes(30<<20, 75)
	_, err := c.Ensure(context.Background(), "p", Request{URL: s.add("/huge", &served{data: huge})}, nil)
	wantCode(t, err, errcode.DiskFull)
	for _, want := range []string{"30.0 MiB", "20.0 MiB"} {
		if !strings.Contains(errcode.MessageOf(err), want) {
			t.Errorf("message %q does not give %s", errcode.MessageOf(err), want)
		}
	}
	wantDigests(t, c, old.Digest)
	if s.served() >= int64(len(huge)) {
		t.Errorf("the whole body was sent although it could never fit")
	}
}

// An image that fits the pool but not even after evicting every unused
// image fails without evicting any.
func TestDiskFullEvictsOnlyIfItFits(t *testing.T) {
	dir := tmpfs(t, "20m")
	c := openCache(t, dir, testOptions(t))
	s := newImageServer(t)
	pinned := mustEnsure(t, c, Request{URL: s.add("/pinned", &served{data: randomBytes(8<<20, 76)})})
	if err := c.Pin("p", pinned.Digest, "vm1:cdrom"); err != nil {
		t.Fatal(err)
	}
	unused := mustEnsure(t, c, Request{URL: s.add("/unused", &served{data: randomBytes(4<<20, 77)})})
	_, err := c.Ensure(context.Background(), "p", Request{URL: s.add("/next", &served{data: randomBytes(14<<20, 78)})}, nil)
	wantCode(t, err, errcode.DiskFull)
	wantDigests(t, c, pinned.Digest, unused.Digest)
}
