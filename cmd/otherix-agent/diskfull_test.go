package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/agent/api"
)

// TestDataDirFull: with its data dir's file system full, the agent refuses
// writes of its own state with disk_full naming the path, stays up and
// serves reads; once space is freed, writes work again.
func TestDataDirFull(t *testing.T) {
	t.Parallel()
	data := t.TempDir()
	if err := unix.Mount("tmpfs", data, "tmpfs", 0, "size=32m,mode=0700"); err != nil {
		t.Fatalf("mount a tmpfs data dir: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(data, unix.MNT_DETACH) })
	pool := t.TempDir() // the pool is elsewhere: only the agent's own state is full
	a := startAgentData(t, nil, data, fmt.Sprintf("pools:\n  default: {path: %s}\ndefault_pool: default\n", pool), false)
	a.ok("vm", "create", "full-1", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--wait")

	filler := fill(t, data)
	r := a.cli("", "vm", "create", "full-2", "--image-url", a.image, "--arch", "amd64", "--wait")
	if r.code == 0 || !strings.Contains(r.stderr, "disk_full") || !strings.Contains(r.stderr, data) {
		t.Fatalf("create on a full data dir: exit %d, stderr %q; want disk_full naming %s\nagent log: %s", r.code, r.stderr, data, tail(a.logText(), 3000))
	}
	r = a.cli("", "vm", "poweroff", "full-1")
	if r.code == 0 || !strings.Contains(r.stderr, "disk_full") {
		t.Fatalf("poweroff on a full data dir: exit %d, stderr %q; want disk_full", r.code, r.stderr)
	}
	// Reads are served, the VM runs on, the agent is up.
	if v := a.getVM("full-1"); v.Status != api.StatusRunning {
		t.Fatalf("full-1: %s (%s)", v.Status, v.StatusReason)
	}
	if r := a.ok("vm", "list"); !strings.Contains(r.stdout, "full-1") || strings.Contains(r.stdout, "full-2") {
		t.Fatalf("vm list:\n%s", r.stdout)
	}
	if err := a.cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("the agent is gone: %v\n%s", err, tail(a.logText(), 3000))
	}

	os.Remove(filler)
	a.ok("vm", "poweroff", "full-1", "--wait")
	if v := a.getVM("full-1"); v.Status != api.StatusStopped {
		t.Fatalf("full-1 after poweroff: %s (%s)", v.Status, v.StatusReason)
	}
}

// fill takes every free block of dir's file system with one file and
// returns its path.
func fill(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for len(buf) > 0 {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			buf = buf[:len(buf)/2]
		}
	}
	return path
}
