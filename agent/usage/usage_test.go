package usage

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/qmp"
)

func TestParseStat(t *testing.T) {
	// A command name with spaces and parentheses; utime 250, stime 50.
	stat := "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 100 1000000 5000 18446744073709551615\n"
	got, err := parseStatCPU([]byte(stat))
	if err != nil || got != 3.0 {
		t.Errorf("parseStatCPU = %v, %v; want 3.0", got, err)
	}
	for _, bad := range []string{"", "4242 qemu S 1", "1 (q) S 1 2 3", "1 (q) S 1 2 3 4 5 6 7 8 9 10 x 0", "1 (q) S 1 2 3 4 5 6 7 8 9 10 5 -1"} {
		if _, err := parseStatCPU([]byte(bad)); err == nil {
			t.Errorf("parseStatCPU(%q) accepted", bad)
		}
	}
	if n, err := parseStatmResident([]byte("1000 250 10 1 0 100 0\n")); err != nil || n != 250 {
		t.Errorf("parseStatmResident = %d, %v", n, err)
	}
	if _, err := parseStatmResident([]byte("1000\n")); err == nil {
		t.Error("parseStatmResident accepted one field")
	}
}

// source is a Source over canned QMP answers (the real engine and QEMU
// are tested in agent's TestUsageKnownWork).
type source struct {
	vms     []VM
	replies map[string]string // command -> JSON return
	errs    map[string]error
	calls   map[string]int
}

func (s *source) Running() []VM { return s.vms }

func (s *source) QMP(ctx context.Context, name, cmd string, args, out any) error {
	s.calls[cmd]++
	if err := s.errs[cmd]; err != nil {
		return err
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal([]byte(s.replies[cmd]), out)
}

func writeTree(t *testing.T, root string, files map[string]string) {
	t.Helper()
	for p, body := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCollector checks the sums, the CPU rate between samples, the NIC
// directions (a tap transmits what the guest receives, a macvtap receives
// it), a VM without a balloon asked once, and forgetting VMs.
func TestCollector(t *testing.T) {
	proc, sys := t.TempDir(), t.TempDir()
	pid := 4242
	ticks := func(utime, stime int) string {
		return strconv.Itoa(pid) + " (qemu-system-x86) S 1 1 1 0 -1 0 0 0 0 0 " + strconv.Itoa(utime) + " " + strconv.Itoa(stime) + " 0 0 20 0 9 0 1 1 1\n"
	}
	writeTree(t, proc, map[string]string{"4242/stat": ticks(100, 50), "4242/statm": "9000 2048 0 0 0 0 0\n"})
	stats := func(dir string, rxB, txB, rxP, txP int) map[string]string {
		return map[string]string{
			"class/net/" + dir + "/statistics/rx_bytes": strconv.Itoa(rxB), "class/net/" + dir + "/statistics/tx_bytes": strconv.Itoa(txB),
			"class/net/" + dir + "/statistics/rx_packets": strconv.Itoa(rxP), "class/net/" + dir + "/statistics/tx_packets": strconv.Itoa(txP),
		}
	}
	writeTree(t, sys, stats("oxtaaaa", 100, 2000, 1, 20))
	writeTree(t, sys, stats("oxmbbbb", 3000, 400, 30, 4))
	src := &source{
		vms: []VM{{Name: "web-1", UUID: "u1", PID: pid, NICs: []NIC{{Index: 0, Link: "oxtaaaa"}, {Index: 1, Link: "oxmbbbb", Macvtap: true}, {Index: 2, Link: "gone"}}}},
		replies: map[string]string{"query-blockstats": `[
			{"device": "", "qdev": "/machine/peripheral/disk0-dev/virtio-backend", "node-name": "disk0", "stats": {"rd_bytes": 10, "wr_bytes": 20, "rd_operations": 1, "wr_operations": 2}},
			{"device": "", "qdev": "/machine/peripheral/cd0-dev", "node-name": "cd0", "stats": {"rd_bytes": 5, "wr_bytes": 0, "rd_operations": 1, "wr_operations": 0}}]`},
		errs:  map[string]error{"query-balloon": &qmp.Error{Class: "DeviceNotActive", Desc: "No balloon device has been activated"}},
		calls: map[string]int{},
	}
	now := time.Date(2026, 12, 7, 16, 0, 0, 0, time.UTC)
	c := New(src, Options{ProcRoot: proc, SysRoot: sys, Now: func() time.Time { return now }})
	ctx := context.Background()
	c.Collect(ctx)
	u, ok := c.Get("u1")
	if !ok {
		t.Fatal("no sample")
	}
	want := api.Usage{SampledAt: now, QEMUPID: pid, CPUSeconds: 1.5, MemoryRSSBytes: 2048 * int64(os.Getpagesize()),
		DiskReadBytes: 15, DiskWriteBytes: 20, DiskReadOps: 2, DiskWriteOps: 2,
		NetRxBytes: 2000 + 3000, NetTxBytes: 100 + 400, NetRxPackets: 20 + 30, NetTxPackets: 1 + 4}
	if u.SampledAt != want.SampledAt || u.QEMUPID != want.QEMUPID || u.CPUSeconds != want.CPUSeconds || u.CPUPercent != 0 ||
		u.MemoryRSSBytes != want.MemoryRSSBytes || u.DiskReadBytes != want.DiskReadBytes || u.DiskWriteBytes != want.DiskWriteBytes ||
		u.DiskReadOps != want.DiskReadOps || u.DiskWriteOps != want.DiskWriteOps || u.NetRxBytes != want.NetRxBytes ||
		u.NetTxBytes != want.NetTxBytes || u.NetRxPackets != want.NetRxPackets || u.NetTxPackets != want.NetTxPackets || u.GuestMemory != nil {
		t.Errorf("first sample:\n got %+v\nwant %+v", u, want)
	}
	if len(u.Disks) != 2 || u.Disks[0].Node != "cd0" || u.Disks[1].Node != "disk0" {
		t.Errorf("disks %+v", u.Disks)
	}
	if len(u.NICs) != 2 || u.NICs[0] != (api.NICUsage{Index: 0, Link: "oxtaaaa", RxBytes: 2000, TxBytes: 100, RxPackets: 20, TxPackets: 1}) ||
		u.NICs[1] != (api.NICUsage{Index: 1, Link: "oxmbbbb", RxBytes: 3000, TxBytes: 400, RxPackets: 30, TxPackets: 4}) {
		t.Errorf("nics %+v", u.NICs)
	}

	// 10 s later QEMU used 2.5 s more: 25%.
	now = now.Add(10 * time.Second)
	writeTree(t, proc, map[string]string{"4242/stat": ticks(300, 100)})
	c.Collect(ctx)
	u, _ = c.Get("u1")
	if u.CPUSeconds != 4 || u.CPUPercent != 25 {
		t.Errorf("second sample: cpu_seconds %v cpu_percent %v, want 4 and 25", u.CPUSeconds, u.CPUPercent)
	}
	if src.calls["query-balloon"] != 1 || src.calls["query-blockstats"] != 2 {
		t.Errorf("qmp calls %v: a VM without a balloon is asked once", src.calls)
	}

	// A new QEMU (another pid): no rate from the old one's counters.
	src.vms[0].PID = 4343
	writeTree(t, proc, map[string]string{"4343/stat": ticks(10, 0), "4343/statm": "1 1 0 0 0 0 0\n"})
	now = now.Add(10 * time.Second)
	c.Collect(ctx)
	u, _ = c.Get("u1")
	if u.QEMUPID != 4343 || u.CPUPercent != 0 || u.CPUSeconds != 0.1 {
		t.Errorf("after a restart: %+v", u)
	}
	if src.calls["query-balloon"] != 2 {
		t.Errorf("a new QEMU is asked for its balloon again: %v", src.calls)
	}

	// Gone from the listing: forgotten.
	src.vms = nil
	c.Collect(ctx)
	if _, ok := c.Get("u1"); ok || len(c.All()) != 0 {
		t.Errorf("a VM that no longer runs keeps its sample: %+v", c.All())
	}
}

// TestCollectorBalloon: with a balloon, the first sample turns the
// guest's statistics polling on (at the interval, in whole seconds) and
// later ones read them; values the guest does not report (-1) are left
// out.
func TestCollectorBalloon(t *testing.T) {
	proc := t.TempDir()
	writeTree(t, proc, map[string]string{"7/stat": "7 (q) S 1 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 9 0 1 1 1\n", "7/statm": "1 1 0 0 0 0 0\n"})
	src := &source{
		vms: []VM{{Name: "b", UUID: "u2", PID: 7}},
		replies: map[string]string{
			"query-blockstats": `[]`,
			"query-balloon":    `{"actual": 268435456}`,
			"qom-set":          `{}`,
			"qom-get":          `{"stats": {"stat-total-memory": 250000000, "stat-free-memory": 200000000, "stat-available-memory": -1}, "last-update": 1765000000}`,
		},
		calls: map[string]int{},
	}
	var set any
	c := New(recorder{src, &set}, Options{ProcRoot: proc, SysRoot: t.TempDir(), Interval: 2500 * time.Millisecond})
	c.Collect(context.Background())
	u, _ := c.Get("u2")
	if u.GuestMemory == nil || *u.GuestMemory != (api.GuestMemory{ActualBytes: 256 << 20}) || src.calls["qom-set"] != 1 || src.calls["qom-get"] != 0 {
		t.Fatalf("first sample: %+v, calls %v", u.GuestMemory, src.calls)
	}
	if b, _ := json.Marshal(set); string(b) != `{"path":"/machine/peripheral/balloon0","property":"guest-stats-polling-interval","value":2}` {
		t.Errorf("qom-set %s", b)
	}
	c.Collect(context.Background())
	u, _ = c.Get("u2")
	if *u.GuestMemory != (api.GuestMemory{ActualBytes: 256 << 20, TotalBytes: 250000000, FreeBytes: 200000000}) || src.calls["qom-set"] != 1 {
		t.Errorf("second sample: %+v, calls %v", u.GuestMemory, src.calls)
	}
}

// recorder records the arguments of qom-set.
type recorder struct {
	*source
	set *any
}

func (r recorder) QMP(ctx context.Context, name, cmd string, args, out any) error {
	if cmd == "qom-set" {
		*r.set = args
	}
	return r.source.QMP(ctx, name, cmd, args, out)
}
