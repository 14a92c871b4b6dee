package vm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestDiskFullPausesGuest: a guest writing to a disk on a pool that fills
// up is paused by QEMU (werror=enospc), and the engine shows it: paused,
// with the reason and the disk; resume is refused by nothing, and once
// space is freed it continues the guest, whose write then completes.
func TestDiskFullPausesGuest(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	type runState struct{ event, reason string }
	events := make(chan runState, 16)
	h := newHarness(t, func(c *Config) {
		c.OnRunState = func(v View, event, reason string) {
			if v.Spec.Name == "full" {
				events <- runState{event, reason}
			}
		}
	})
	// The pool: a 64 MiB tmpfs, 40 MiB of it taken by a file the test
	// frees later. The guest writes 40 MiB to its data disk.
	pool := t.TempDir()
	if err := unix.Mount("tmpfs", pool, "tmpfs", 0, "size=64m,mode=0755"); err != nil {
		t.Fatalf("mount a tmpfs pool: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(pool, unix.MNT_DETACH) })
	filler := filepath.Join(pool, "filler")
	if err := os.WriteFile(filler, make([]byte, 40<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(pool, "data.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", data, "1G").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	v := h.define("full", "#cloud-config\n#otherix-run: dd if=/dev/zero of=/dev/vdb bs=1M count=40 conv=fsync\n")
	if _, err := h.e.Update(ctx, "full", func(s *Spec) {
		s.Disks = append(s.Disks, Disk{Path: data, Format: "qcow2"})
	}); err != nil {
		t.Fatal(err)
	}
	con := h.console(v)
	if _, err := h.e.Start(ctx, "full"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, con, "OTHERIX-GUEST ready", bootWait)

	p := h.waitStatus("full", "paused", 2*time.Minute)
	for _, want := range []string{"io_error: no space left on device", "disk1", data, "write"} {
		if !strings.Contains(p.Reason, want) {
			t.Errorf("reason %q lacks %q", p.Reason, want)
		}
	}
	select {
	case ev := <-events:
		if ev.event != RunStatePaused || ev.reason != p.Reason {
			t.Errorf("run state event %+v, want paused with %q", ev, p.Reason)
		}
	case <-time.After(10 * time.Second):
		t.Error("no run state event for the pause")
	}
	if strings.Contains(strings.Join(con.Lines(), "\n"), "OTHERIX-GUEST run-exit 1") {
		t.Fatalf("the guest's write ended although the pool is full:\n%s", strings.Join(con.Lines(), "\n"))
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	r, err := h.e.Resume(ctx, "full")
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != "running" || r.Reason != "" {
		t.Errorf("after resume: %s (%s)", r.Status, r.Reason)
	}
	if line := waitFor(t, con, "OTHERIX-GUEST run-exit 1 ", bootWait); !strings.HasSuffix(strings.TrimSpace(line), " 0") {
		t.Fatalf("the guest's write failed after resume: %s", line)
	}
	if v, _ := h.e.Get("full"); v.Status != "running" {
		t.Fatalf("after the write: %s (%s)", v.Status, v.Reason)
	}
}

// TestRebootFilter: the RESET events of one reboot count once, whether the
// guest or a QMP system_reset caused the first one; a guest reboot later
// counts again.
func TestRebootFilter(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 20, 0, 0, 0, time.UTC)
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	for _, tc := range []struct {
		name   string
		at     []time.Time
		guest  []bool
		counts []bool
	}{
		// Linux's reset, then SeaBIOS's two (as seen under TCG).
		{"guest reboot", []time.Time{ms(0), ms(70), ms(72)}, []bool{true, true, true}, []bool{true, false, false}},
		// system_reset, then SeaBIOS's echo 280 ms later.
		{"qmp reset", []time.Time{ms(0), ms(280)}, []bool{false, true}, []bool{false, false}},
		{"two reboots", []time.Time{ms(0), ms(150), ms(30000), ms(30100)}, []bool{true, true, true, true}, []bool{true, false, true, false}},
		{"reboot after a reset", []time.Time{ms(0), ms(300), ms(9000)}, []bool{false, true, true}, []bool{false, false, true}},
	} {
		var f rebootFilter
		for i := range tc.at {
			if got := f.reset(tc.at[i], tc.guest[i]); got != tc.counts[i] {
				t.Errorf("%s: reset %d (guest %v) counts %v, want %v", tc.name, i, tc.guest[i], got, tc.counts[i])
			}
		}
	}
}
