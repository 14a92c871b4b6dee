package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

func testUsage() *api.Usage {
	return &api.Usage{
		SampledAt: time.Date(2026, 12, 7, 16, 20, 0, 0, time.UTC), QEMUPID: 4242,
		CPUSeconds: 812.43, CPUPercent: 37.5, MemoryRSSBytes: 1183842304,
		GuestMemory:   &api.GuestMemory{ActualBytes: 1 << 30},
		DiskReadBytes: 524288000, DiskWriteBytes: 104857600, DiskReadOps: 12800, DiskWriteOps: 2560,
		NetRxBytes: 73400320, NetTxBytes: 5242880, NetRxPackets: 50210, NetTxPackets: 31877,
		Disks: []api.DiskUsage{{Node: "disk0", ReadBytes: 524288000, WriteBytes: 104857600, ReadOps: 12800, WriteOps: 2560}},
		NICs:  []api.NICUsage{{Index: 0, Link: "oxt1111111111", RxBytes: 73400320, TxBytes: 5242880, RxPackets: 50210, TxPackets: 31877}},
	}
}

func TestVMStats(t *testing.T) {
	h := newHarness(t)
	h.api.AddVM(testVM())
	h.api.SetUsage("web-1", testUsage())
	r := h.must("vm", "stats", "web-1")
	want := `name: web-1
uuid: 11111111-1111-4111-8111-111111111111
status: running
sampled_at: 2026-12-07T16:20:00Z
qemu_pid: 4242
cpu_seconds: 812.43
cpu_percent: 37.5
memory_rss: 1.1GiB
guest_memory: 1.0GiB
disk_read: 500.0MiB in 12800 ops
disk_write: 100.0MiB in 2560 ops
net_rx: 70.0MiB in 50210 packets
net_tx: 5.0MiB in 31877 packets
disk disk0: read 500.0MiB in 12800 ops, write 100.0MiB in 2560 ops
nic 0 (oxt1111111111): rx 70.0MiB in 50210 packets, tx 5.0MiB in 31877 packets
`
	if r.stdout != want {
		t.Errorf("stdout:\n%s\nwant:\n%s", r.stdout, want)
	}
	var st api.VMStats
	r = h.must("vm", "stats", "web-1", "-o", "json")
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || st.Usage == nil || st.Usage.CPUSeconds != 812.43 || len(st.Usage.Disks) != 1 {
		t.Errorf("json: %s (%v)", r.stdout, err)
	}

	h.api.AddVM(api.VM{Name: "off", UUID: "22222222-2222-4222-8222-222222222222", Status: "stopped"})
	r = h.must("vm", "stats", "off")
	if !strings.HasSuffix(r.stdout, "usage: - (QEMU does not run, or it was not sampled yet)\n") {
		t.Errorf("stopped VM: %q", r.stdout)
	}
	r = h.run("", "vm", "stats", "nope")
	if r.code != 1 || r.stderr != "error: not_found: vm \"nope\" not found\n" {
		t.Errorf("unknown VM: exit %d stderr %q", r.code, r.stderr)
	}
}

// TestVMTop: the host's VMs by CPU, busiest first, VMs without usage
// last; one snapshot when stdout is not a terminal, -o json with the
// views' own figures; redrawn in place on a terminal until interrupted.
func TestVMTop(t *testing.T) {
	h := newHarness(t)
	busy := testVM()
	h.api.AddVM(busy)
	h.api.SetUsage("web-1", testUsage())
	idle := testVM()
	idle.Name, idle.UUID = "db-1", "33333333-3333-4333-8333-333333333333"
	h.api.AddVM(idle)
	u := testUsage()
	u.CPUPercent, u.CPUSeconds, u.MemoryRSSBytes = 2.5, 10, 300<<20
	h.api.SetUsage("db-1", u)
	h.api.AddVM(api.VM{Name: "a-stopped", UUID: "22222222-2222-4222-8222-222222222222", Status: "stopped"})

	r := h.must("vm", "top")
	want := `NAME       STATUS   CPU%  CPU-TIME       RSS  DISK-READ  DISK-WRITE   NET-RX  NET-TX
web-1      running  37.5   812.43s    1.1GiB   500.0MiB    100.0MiB  70.0MiB  5.0MiB
db-1       running   2.5    10.00s  300.0MiB   500.0MiB    100.0MiB  70.0MiB  5.0MiB
a-stopped  stopped     -         -         -          -           -        -       -
`
	if r.stdout != want {
		t.Errorf("snapshot:\n%q\nwant:\n%q", r.stdout, want)
	}
	if strings.Contains(r.stdout, "\x1b") {
		t.Errorf("a piped snapshot has terminal escapes: %q", r.stdout)
	}

	var rows []topRow
	r = h.must("vm", "top", "-o", "json")
	if err := json.Unmarshal([]byte(r.stdout), &rows); err != nil || len(rows) != 3 || rows[0].Name != "web-1" || rows[1].Name != "db-1" ||
		rows[2].Usage != nil || *rows[0].Usage != *testUsage().Summary() {
		t.Errorf("json: %s (%v)", r.stdout, err)
	}

	// On a terminal: cleared and redrawn every interval until cancelled.
	h.outTerminal = true
	var out strings.Builder
	c := h.cli(&out)
	ctx, cancel := context.WithTimeout(t.Context(), 350*time.Millisecond)
	defer cancel()
	if code := c.main(ctx, []string{"vm", "top", "--interval", "100ms"}); code != 0 {
		t.Fatalf("vm top on a terminal: exit %d", code)
	}
	if n := strings.Count(out.String(), "\x1b[H\x1b[2J"); n < 2 {
		t.Errorf("redrawn %d times in 350 ms at 100 ms:\n%q", n, out.String())
	}
	if r := h.run("", "vm", "top", "--interval", "1ms"); r.code != 1 || !strings.Contains(r.stderr, "--interval must be at least 100ms") {
		t.Errorf("tiny interval: exit %d stderr %q", r.code, r.stderr)
	}
}
