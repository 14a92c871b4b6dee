package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

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

// TestPoolFullPausesGuest: a guest writing to its disk on a pool that
// fills up is paused by QEMU; the agent shows paused with the reason
// through the API, and `vm resume` continues it once space is freed,
// whereupon the guest's write completes.
func TestPoolFullPausesGuest(t *testing.T) {
	t.Parallel()
	pool := t.TempDir()
	if err := unix.Mount("tmpfs", pool, "tmpfs", 0, "size=96m,mode=0700"); err != nil {
		t.Fatalf("mount a tmpfs pool: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(pool, unix.MNT_DETACH) })
	a := startAgent(t, fmt.Sprintf("pools:\n  default: {path: %s}\ndefault_pool: default\nlimits:\n  min_free_bytes: 1048576\n", pool))
	ud := filepath.Join(t.TempDir(), "user-data.yaml")
	// 48 MiB written 64 MiB into the root disk, past the image's blocks.
	os.WriteFile(ud, []byte("#cloud-config\n#otherix-run: dd if=/dev/zero of=/dev/vda bs=1M seek=64 count=48 conv=fsync\n"), 0o600)
	// The write starts after "ready"; the filler leaves it 24 MiB before.
	a.ok("vm", "create", "fills", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256",
		"--disk-gib", "1", "--user-data", ud, "--wait")
	var st unix.Statfs_t
	if err := unix.Statfs(pool, &st); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(pool, "filler")
	if err := os.WriteFile(filler, make([]byte, int64(st.Bavail)*st.Bsize-24<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	con := a.console("fills")

	deadline := time.Now().Add(3 * time.Minute)
	var v api.VM
	for v = a.getVM("fills"); v.Status != api.StatusPaused; v = a.getVM("fills") {
		if time.Now().After(deadline) {
			t.Fatalf("fills: %s (%s), want paused\n%s", v.Status, v.StatusReason, con.Text())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.HasPrefix(v.StatusReason, "io_error: no space left on device (disk disk0 ") {
		t.Errorf("status_reason %q", v.StatusReason)
	}
	if r := a.ok("vm", "get", "fills"); !strings.Contains(r.stdout, "no space left on device") {
		t.Errorf("vm get does not show the reason:\n%s", r.stdout)
	}
	if r := a.ok("vm", "events", "fills"); !regexpLine(r.stdout, `paused\s.*io_error: no space left on device`) {
		t.Errorf("vm events has no pause with the reason:\n%s", r.stdout)
	}
	os.Remove(filler)
	a.ok("vm", "resume", "fills")
	if line := waitConsole(t, con, "OTHERIX-GUEST run-exit 1 "); !strings.HasSuffix(strings.TrimSpace(line), " 0") {
		t.Fatalf("the guest's write failed after resume: %s", line)
	}
	if v := a.getVM("fills"); v.Status != api.StatusRunning || v.StatusReason != "" {
		t.Fatalf("after resume: %s (%s)", v.Status, v.StatusReason)
	}
	if r := a.ok("vm", "events", "fills"); !regexpLine(r.stdout, `resumed`) {
		t.Errorf("vm events has no resume:\n%s", r.stdout)
	}
}
