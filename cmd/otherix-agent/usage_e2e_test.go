package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// TestUsageSameFigures runs the real agent and CLI: a guest writes
// writeMiB MiB to its disk, and `otherix vm stats`, `otherix vm top`,
// `otherix vm get` and the agent's /metrics then show the same figures
// of the same sample (the heartbeat's are checked against the same
// sample in agent's TestUsageKnownWork).
func TestUsageSameFigures(t *testing.T) {
	t.Parallel()
	const writeMiB = 16
	a := startAgent(t, "usage:\n  interval: 2s\n")
	ud := filepath.Join(t.TempDir(), "user-data")
	os.WriteFile(ud, []byte("#cloud-config\n"+
		fmt.Sprintf("#otherix-run: dd if=/dev/zero of=/dev/vda bs=1M seek=64 count=%d oflag=direct; echo OTHERIX-TEST wrote\n", writeMiB)), 0o600)
	a.ok("vm", "create", "u-1", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--disk-gib", "1",
		"--user-data", ud, "--wait")
	con := a.console("u-1")
	defer con.Close()
	waitConsole(t, con, "OTHERIX-TEST wrote")

	// Read every view until they all show one sample taken after the
	// write (a new sample may land between two reads: read again).
	deadline := time.Now().Add(2 * time.Minute)
	for attempt := 1; ; attempt++ {
		var st api.VMStats
		if err := json.Unmarshal([]byte(a.ok("vm", "stats", "u-1", "-o", "json").stdout), &st); err != nil {
			t.Fatal(err)
		}
		var top []struct {
			Name  string            `json:"name"`
			Usage *api.UsageSummary `json:"usage"`
		}
		if err := json.Unmarshal([]byte(a.ok("vm", "top", "-o", "json").stdout), &top); err != nil || len(top) != 1 || top[0].Name != "u-1" {
			t.Fatalf("vm top -o json: %+v (%v)", top, err)
		}
		v := a.getVM("u-1")
		series := scrape(t, a.url)
		labels := fmt.Sprintf(`{uuid=%q,vm="u-1"}`, v.UUID)
		sampled := series["otherix_agent_vm_usage_timestamp_seconds"+labels]

		u := st.Usage
		same := u != nil && top[0].Usage != nil && v.Usage != nil &&
			u.SampledAt.Equal(top[0].Usage.SampledAt) && u.SampledAt.Equal(v.Usage.SampledAt) &&
			math.Abs(sampled-float64(u.SampledAt.UnixNano())/1e9) < 1e-3
		if !same || u.DiskWriteBytes < writeMiB<<20 {
			if time.Now().After(deadline) {
				t.Fatalf("no common sample after the write in %d attempts: stats %+v, top %+v, view %+v, metrics sampled at %v",
					attempt, u, top[0].Usage, v.Usage, sampled)
			}
			time.Sleep(300 * time.Millisecond)
			continue
		}
		want := u.Summary()
		if *top[0].Usage != *want || *v.Usage != *want {
			t.Errorf("one sample, different figures:\nstats %+v\ntop   %+v\nview  %+v", want, top[0].Usage, v.Usage)
		}
		for name, val := range map[string]float64{
			"otherix_agent_vm_cpu_seconds_total":        u.CPUSeconds,
			"otherix_agent_vm_memory_rss_bytes":         float64(u.MemoryRSSBytes),
			"otherix_agent_vm_disk_read_bytes_total":    float64(u.DiskReadBytes),
			"otherix_agent_vm_disk_written_bytes_total": float64(u.DiskWriteBytes),
			"otherix_agent_vm_disk_write_ops_total":     float64(u.DiskWriteOps),
		} {
			if got, ok := series[name+labels]; !ok || math.Abs(got-val) > 1e-6*math.Max(1, val) {
				t.Errorf("/metrics %s = %v (present %v), vm stats says %v", name, got, ok, val)
			}
		}
		// The text form (a later sample, maybe) of the same VM.
		if text := a.ok("vm", "stats", "u-1").stdout; !strings.Contains(text, fmt.Sprintf("qemu_pid: %d\n", v.QEMUPID)) ||
			!strings.Contains(text, "disk_write: ") || !strings.Contains(text, "disk disk0: ") {
			t.Errorf("vm stats text:\n%s", text)
		}
		t.Logf("the guest wrote %d MiB: disk_write_bytes %d in %d ops, cpu_seconds %.2f, rss %d MiB (attempt %d)",
			writeMiB, u.DiskWriteBytes, u.DiskWriteOps, u.CPUSeconds, u.MemoryRSSBytes>>20, attempt)
		break
	}
	a.ok("vm", "delete", "u-1", "--force", "--wait")
	if s := scrape(t, a.url); len(seriesOf(s, "u-1")) != 0 {
		t.Errorf("series left after delete: %v", seriesOf(s, "u-1"))
	}
}

// seriesOf lists the series labelled with the VM name.
func seriesOf(s map[string]float64, name string) []string {
	var out []string
	for k := range s {
		if strings.Contains(k, `vm="`+name+`"`) {
			out = append(out, k)
		}
	}
	return out
}
