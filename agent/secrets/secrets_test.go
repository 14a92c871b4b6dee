package secrets

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSealOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "secret.key")
	b, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	s, err := b.Seal("hunter22", "vm-a")
	if err != nil || strings.Contains(s, "hunter22") {
		t.Fatalf("sealed %q %v", s, err)
	}
	b2, err := Open(path) // the same key after a restart
	if err != nil {
		t.Fatal(err)
	}
	if got, err := b2.Open(s, "vm-a"); err != nil || got != "hunter22" {
		t.Fatalf("open: %q %v", got, err)
	}
	if _, err := b2.Open(s, "vm-b"); err == nil {
		t.Fatal("a value sealed for vm-a opened for vm-b")
	}
	if _, err := b2.Open("v1:AAAA", "vm-a"); err == nil {
		t.Fatal("garbage opened")
	}
	os.Chmod(path, 0o644)
	if _, err := Open(path); err == nil {
		t.Fatal("a world-readable key was accepted")
	}
}
