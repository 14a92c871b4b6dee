package cptest

import (
	"crypto/sha256"
	"fmt"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// SampleVMs returns n plausible VM views for sizing figures: uuids, names,
// an address each, a last task, mostly running.
func SampleVMs(n int) []api.VM {
	created := time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)
	vms := make([]api.VM, n)
	for i := range vms {
		status := api.StatusRunning
		if i%10 == 9 {
			status = api.StatusStopped
		}
		vm := api.VM{
			Name:         fmt.Sprintf("web-%03d", i),
			UUID:         randomUUID("vm", i),
			Status:       status,
			DesiredPhase: api.PhaseRunning,
			Arch:         "amd64",
			VCPUs:        2,
			MemoryMB:     2048,
			Pool:         "default",
			Node:         "hv-rack12-07",
			Network:      "lan",
			ImageURL:     "https://cloud-images.ubuntu.com/minimal/releases/noble/release/ubuntu-24.04-minimal-cloudimg-amd64.img",
			ImageSHA256:  fmt.Sprintf("%x", sha256.Sum256([]byte{byte(i % 3)})), // a few images
			DiskGiB:      20,
			CloudInit:    true,
			CreatedAt:    created.Add(time.Duration(i) * time.Minute),
			LastTask: &api.TaskRef{
				ID:     randomUUID("task", i),
				Type:   api.TaskStart,
				Status: api.TaskSuccess,
			},
		}
		if status == api.StatusRunning {
			vm.QEMUPID = 20000 + i*17
			vm.IPAddresses = []string{fmt.Sprintf("10.20.%d.%d", i/250, 10+i%250)}
			// Usage as sampled: figures of every magnitude, none alike.
			k := int64(i*7919 + 104729)
			vm.Usage = &api.UsageSummary{
				SampledAt:      created.Add(30*24*time.Hour + time.Duration(k%9973)*time.Millisecond),
				CPUSeconds:     float64(k*37%1000000) / 100,
				CPUPercent:     float64(k%20011) / 100,
				MemoryRSSBytes: 1<<30 + k*4096%(1<<30),
				DiskReadBytes:  k * 524287 % (1 << 40),
				DiskWriteBytes: k * 131071 % (1 << 38),
				NetRxBytes:     k * 65521 % (1 << 36),
				NetTxBytes:     k * 8191 % (1 << 34),
			}
		}
		vms[i] = vm
	}
	return vms
}

// randomUUID is a uuid-shaped string as random as a real one (random hex
// does not compress), stable across runs.
func randomUUID(kind string, i int) string {
	h := sha256.Sum256(fmt.Appendf(nil, "%s-%d", kind, i))
	return fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}
