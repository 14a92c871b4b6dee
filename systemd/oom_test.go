package systemd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseOOMKill(t *testing.T) {
	v2 := "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n"
	v1 := "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
	for in, want := range map[string]uint64{v2: 1, v1: 3} {
		if n, err := parseOOMKill([]byte(in)); err != nil || n != want {
			t.Errorf("parseOOMKill(%q) = %d, %v; want %d", in, n, err, want)
		}
	}
	if _, err := parseOOMKill([]byte("oom 1\n")); err == nil {
		t.Error("no oom_kill field accepted")
	}
}

func TestMemoryCgroupOf(t *testing.T) {
	proc, root := t.TempDir(), t.TempDir()
	write := func(p, s string) {
		t.Helper()
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Pure v2.
	write(filepath.Join(proc, "10/cgroup"), "0::/otherix.slice/otherix-vm-a.scope\n")
	write(filepath.Join(root, "otherix.slice/otherix-vm-a.scope/memory.events"), "oom_kill 0\n")
	// Hybrid: v2 without memory at root/unified, memory in v1.
	write(filepath.Join(proc, "11/cgroup"), "4:memory:/otherix.slice/otherix-vm-b.scope\n1:name=systemd:/otherix.slice/otherix-vm-b.scope\n0::/otherix.slice/otherix-vm-b.scope\n")
	write(filepath.Join(root, "memory/otherix.slice/otherix-vm-b.scope/memory.oom_control"), "oom_kill 0\n")
	write(filepath.Join(proc, "12/cgroup"), "0::/\n")
	for pid, want := range map[int]MemoryCgroup{
		10: {Dir: filepath.Join(root, "otherix.slice/otherix-vm-a.scope"), V2: true},
		11: {Dir: filepath.Join(root, "memory/otherix.slice/otherix-vm-b.scope")},
	} {
		if got, err := MemoryCgroupOf(proc, root, pid); err != nil || got != want {
			t.Errorf("pid %d: %+v, %v; want %+v", pid, got, err, want)
		}
	}
	if _, err := MemoryCgroupOf(proc, root, 12); err == nil {
		t.Error("a cgroup without memory counters accepted")
	}
}

// TestOOMWatchOutlivesCgroup: on cgroup v2 the watch follows
// memory.events through inotify (the kernel signals each change as a
// modification), so a kill counted before the cgroup is removed is known
// after. A file in a folder stands for the cgroup (this host has no
// cgroup v2 memory controller; the real v1 counter is TestOOMKillReal's).
func TestOOMWatchOutlivesCgroup(t *testing.T) {
	dir := t.TempDir()
	events := filepath.Join(dir, "memory.events")
	os.WriteFile(events, []byte("oom 0\noom_kill 0\n"), 0o644)
	w := WatchOOM(MemoryCgroup{Dir: dir, V2: true})
	if w.Kills() != 0 {
		t.Fatalf("kills %d before any", w.Kills())
	}
	f, err := os.OpenFile(events, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("oom 1\noom_kill 1\n")
	f.Close()
	select {
	case <-w.seen:
	case <-time.After(10 * time.Second):
		t.Fatal("the watch did not see the change")
	}
	os.Remove(events)
	select {
	case <-w.done: // IN_IGNORED: the watch ended with its file
	case <-time.After(10 * time.Second):
		t.Fatal("the watch did not end with its file")
	}
	if n := w.Kills(); n != 1 {
		t.Errorf("kills after the cgroup is gone: %d, want 1", n)
	}
	w.Close()

	// Close ends a watch whose file is still there.
	os.WriteFile(events, []byte("oom_kill 0\n"), 0o644)
	w = WatchOOM(MemoryCgroup{Dir: dir, V2: true})
	done := make(chan struct{})
	go func() { w.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hangs")
	}
}

// TestOOMKillReal has the kernel OOM-kill a process in a memory cgroup
// capped at 16 MiB (a child of this test's own), and reads the kill from
// the cgroup's counter.
func TestOOMKillReal(t *testing.T) {
	self, err := MemoryCgroupOf("/proc", "/sys/fs/cgroup", os.Getpid())
	if err != nil {
		t.Fatalf("this test needs a memory cgroup: %v", err)
	}
	cg := MemoryCgroup{Dir: filepath.Join(self.Dir, fmt.Sprintf("otherix-oom-%d", os.Getpid())), V2: self.V2}
	if err := os.Mkdir(cg.Dir, 0o755); err != nil {
		t.Fatalf("create a memory cgroup (needs root): %v", err)
	}
	t.Cleanup(func() { os.Remove(cg.Dir) })
	limit := "memory.limit_in_bytes"
	if cg.V2 {
		limit = "memory.max"
	}
	if err := os.WriteFile(filepath.Join(cg.Dir, limit), []byte("16777216"), 0o644); err != nil {
		t.Fatal(err)
	}
	w := WatchOOM(cg)
	defer w.Close()
	// tail keeps the last line of an endless one in memory: it grows
	// until the kernel kills it.
	cmd := exec.CommandContext(context.Background(), "/bin/sh", "-c", `echo $$ > "$1/cgroup.procs" && exec tail /dev/zero`, "sh", cg.Dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("tail ended with %v (%s), want killed by SIGKILL", err, strings.TrimSpace(stderr.String()))
	}
	if n := w.Kills(); n != 1 {
		t.Errorf("OOM kills %d, want 1", n)
	}
}
