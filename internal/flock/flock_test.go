package flock

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A lock released while Exclusive waits is taken; one kept past Grace
// is reported as taken.
func TestExclusive(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	open := func() *os.File {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	holder := open()
	if err := Exclusive(holder); err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(100 * time.Millisecond)
		holder.Close() // drops the lock, as a child's exec would
	}()
	if err := Exclusive(open()); err != nil {
		t.Fatalf("lock released after 100ms not taken: %v", err)
	}

	// The second file now holds it for good: a third waits Grace, then
	// is told.
	if err := Exclusive(open()); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("lock held by another description: %v, want EWOULDBLOCK", err)
	}
}
