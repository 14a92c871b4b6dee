package agent

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/metrics"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/runner"
	"github.com/otherix/otherix-agent/agent/usage"
)

// TestUsageKnownWork boots the real guest, has it write writeMiB MiB to
// its root disk (O_DIRECT, so every byte reaches QEMU) and keep its vCPU
// busy for a few seconds, and checks that the usage sampled before and
// after shows that work, and that the stats API, the VM view, the
// heartbeat the control plane receives and /metrics carry the same
// figures of the same sample.
func TestUsageKnownWork(t *testing.T) {
	t.Parallel()
	const writeMiB = 24
	hh := newHost(t)
	col := hh.h.Usage()
	if col == nil {
		t.Fatal("usage collection is off by default")
	}
	m := metrics.New(metrics.Options{NoRuntime: true})
	m.SetVMUsage(hh.h.AllStats)
	msrv := httptest.NewServer(m.Handler())
	t.Cleanup(msrv.Close)

	// The runner heartbeats the real Host's inventory every second.
	cp := startRunner(t, hh, runner.Config{}).cp

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// The first sample is taken while the guest idles (4 s), the second
	// once it wrote and burned.
	ud := "#cloud-config\n" +
		"#otherix-run: echo OTHERIX-TEST idle; sleep 4\n" +
		fmt.Sprintf("#otherix-run: dd if=/dev/zero of=/dev/vda bs=1M seek=64 count=%d oflag=direct; echo OTHERIX-TEST wrote\n", writeMiB) +
		"#otherix-run: timeout 4 sh -c 'while :; do :; done'; echo OTHERIX-TEST burned\n"
	id := uuid.NewString()
	if _, err := hh.h.Create(ctx, id, api.CreateVM{Name: "busy", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, DiskGiB: 1, UserData: ud}, nil, nil); err != nil {
		t.Fatal(err)
	}
	con := hh.console("busy")
	defer con.Close()
	wait(t, con, "OTHERIX-TEST idle")
	col.Collect(ctx)
	before, ok := col.Get(id)
	if !ok {
		t.Fatal("no sample of a running VM")
	}
	wait(t, con, "OTHERIX-TEST wrote")
	wait(t, con, "OTHERIX-TEST burned")
	col.Collect(ctx)
	after, _ := col.Get(id)

	if after.QEMUPID != before.QEMUPID || !after.SampledAt.After(before.SampledAt) {
		t.Fatalf("samples: before %+v, after %+v", before, after)
	}
	if d := after.DiskWriteBytes - before.DiskWriteBytes; d < writeMiB<<20 {
		t.Errorf("disk_write_bytes grew by %d, the guest wrote %d", d, writeMiB<<20)
	}
	if d := after.DiskWriteOps - before.DiskWriteOps; d < writeMiB {
		t.Errorf("disk_write_ops grew by %d, the guest wrote %d blocks of 1 MiB", d, writeMiB)
	}
	var root *api.DiskUsage
	for i, d := range after.Disks {
		if d.Node == "disk0" {
			root = &after.Disks[i]
		}
	}
	if root == nil || root.WriteBytes < writeMiB<<20 {
		t.Errorf("root disk usage %+v in %+v", root, after.Disks)
	}
	// The busy loop ran 4 s of the guest's time on its one vCPU: QEMU's
	// TCG thread was busy all along, as much as the shared host let it.
	burn := after.CPUSeconds - before.CPUSeconds
	if burn < 0.5 {
		t.Errorf("cpu_seconds grew by %.2f over the busy loop", burn)
	}
	if after.CPUPercent <= 0 || after.MemoryRSSBytes < 64<<20 {
		t.Errorf("cpu_percent %.1f, rss %d", after.CPUPercent, after.MemoryRSSBytes)
	}
	// The balloon: the guest's memory, and its own statistics once its
	// driver answered the polling the first sample turned on.
	if gm := after.GuestMemory; gm == nil || gm.ActualBytes != 256<<20 {
		t.Errorf("guest memory %+v, want actual_bytes %d", gm, 256<<20)
	}
	if err := waitGuestStats(ctx, col, id); err != nil {
		t.Error(err)
	}
	after, _ = col.Get(id)
	t.Logf("known work: wrote %d MiB, busy 4 s: disk_write_bytes +%d, cpu_seconds +%.2f (cpu_percent %.1f over the last interval), rss %d MiB, guest memory %+v",
		writeMiB, after.DiskWriteBytes-before.DiskWriteBytes, burn, after.CPUPercent, after.MemoryRSSBytes>>20, *after.GuestMemory)

	// The same sample everywhere.
	want := after.Summary()
	st, err := hh.h.Stats("busy")
	if err != nil || st.Usage == nil || st.UUID != id || st.Status != api.StatusRunning {
		t.Fatalf("stats: %+v %v", st, err)
	}
	if got := st.Usage.Summary(); *got != *want {
		t.Errorf("stats API: %+v, want %+v", got, want)
	}
	v, err := hh.h.VM("busy")
	if err != nil || v.Usage == nil || *v.Usage != *want {
		t.Errorf("VM view usage: %+v (%v), want %+v", v.Usage, err, want)
	}
	hb, err := cp.WaitHeartbeat(ctx, func(h protocol.HeartbeatRequest) bool {
		for _, s := range h.VMs {
			if s.UUID == id && s.Usage != nil && s.Usage.SampledAt.Equal(want.SampledAt) {
				return true
			}
		}
		return false
	})
	if err != nil {
		t.Fatalf("no heartbeat with the last sample: %v", err)
	}
	for _, s := range hb.VMs {
		if s.UUID == id && (s.Usage.CPUSeconds != want.CPUSeconds || s.Usage.CPUPercent != want.CPUPercent ||
			s.Usage.MemoryRSSBytes != want.MemoryRSSBytes || s.Usage.DiskReadBytes != want.DiskReadBytes ||
			s.Usage.DiskWriteBytes != want.DiskWriteBytes || s.Usage.NetRxBytes != want.NetRxBytes || s.Usage.NetTxBytes != want.NetTxBytes) {
			t.Errorf("heartbeat usage %+v, want %+v", s.Usage, want)
		}
	}
	series := scrapeVM(t, msrv.URL, "busy", id)
	for name, val := range map[string]float64{
		"otherix_agent_vm_cpu_seconds_total":        want.CPUSeconds,
		"otherix_agent_vm_cpu_usage_ratio":          want.CPUPercent / 100,
		"otherix_agent_vm_memory_rss_bytes":         float64(want.MemoryRSSBytes),
		"otherix_agent_vm_disk_read_bytes_total":    float64(want.DiskReadBytes),
		"otherix_agent_vm_disk_written_bytes_total": float64(want.DiskWriteBytes),
		"otherix_agent_vm_disk_write_ops_total":     float64(after.DiskWriteOps),
		"otherix_agent_vm_usage_timestamp_seconds":  float64(want.SampledAt.UnixNano()) / 1e9,
		"otherix_agent_vm_guest_memory_bytes":       float64(after.GuestMemory.ActualBytes),
	} {
		got, ok := series[name]
		if !ok || !near(got, val) {
			t.Errorf("/metrics %s = %v (present %v), want %v", name, got, ok, val)
		}
	}

	// Stopped: no usage anywhere, no series left behind.
	if _, err := hh.h.engine.Poweroff(ctx, "busy"); err != nil {
		t.Fatal(err)
	}
	col.Collect(ctx)
	if st, _ := hh.h.Stats("busy"); st.Usage != nil {
		t.Errorf("stats of a stopped VM: %+v", st.Usage)
	}
	if v, _ := hh.h.VM("busy"); v.Usage != nil {
		t.Errorf("view of a stopped VM has usage %+v", v.Usage)
	}
	if s := scrapeVM(t, msrv.URL, "busy", id); len(s) != 0 {
		t.Errorf("series of a stopped VM: %v", s)
	}
}

// waitGuestStats samples until the guest's balloon driver reported its
// memory: a total within its 256 MiB and some of it free.
func waitGuestStats(ctx context.Context, col *usage.Collector, id string) error {
	for {
		u, ok := col.Get(id)
		if gm := u.GuestMemory; ok && gm != nil && gm.TotalBytes > 0 {
			if gm.TotalBytes > 256<<20 || gm.FreeBytes <= 0 || gm.FreeBytes > gm.TotalBytes {
				return fmt.Errorf("guest statistics %+v", *gm)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the guest never reported its memory: %+v", u.GuestMemory)
		case <-time.After(500 * time.Millisecond):
		}
		col.Collect(ctx)
	}
}

// near reports whether a and b agree to the precision of the text format.
func near(a, b float64) bool {
	d := a - b
	if d < 0 {
		d = -d
	}
	return d <= 1e-9*max(1, a, b, -a, -b)
}

// scrapeVM reads /metrics and returns the otherix_agent_vm_ series of the
// VM (labels vm and uuid), by name.
func scrapeVM(t *testing.T, url, name, id string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	labels := fmt.Sprintf(`{uuid=%q,vm=%q}`, id, name)
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		series, val, ok := strings.Cut(line, " ")
		if !ok || !strings.HasPrefix(series, "otherix_agent_vm_") || !strings.HasSuffix(series, labels) {
			continue
		}
		f, err := strconv.ParseFloat(val, 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[strings.TrimSuffix(series, labels)] = f
	}
	return out
}
