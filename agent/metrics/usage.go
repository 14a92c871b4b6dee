package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/otherix/otherix-agent/agent/api"
)

// vmUsage is the collector of the per-VM usage series, computed at
// scrape time from the usage collector's last samples: a VM that stops
// or is deleted leaves no series behind, so their number stays the
// number of running VMs however many come and go.
type vmUsage struct {
	mu    sync.Mutex
	stats func() []api.VMStats

	sampled, cpu, cpuRatio, rss, guestMem            *prometheus.Desc
	diskRead, diskWritten, diskReadOps, diskWriteOps *prometheus.Desc
	netRx, netTx, netRxPackets, netTxPackets         *prometheus.Desc
}

func newVMUsage() *vmUsage {
	labels := []string{"vm", "uuid"}
	d := func(n, help string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", n), help, labels, nil)
	}
	return &vmUsage{
		sampled:      d("vm_usage_timestamp_seconds", "When the VM's usage series were sampled (Unix time)."),
		cpu:          d("vm_cpu_seconds_total", "CPU time of the VM's QEMU process (every thread), from its start."),
		cpuRatio:     d("vm_cpu_usage_ratio", "CPU used by the VM's QEMU over the last sampling interval; 1 is one CPU."),
		rss:          d("vm_memory_rss_bytes", "Resident memory of the VM's QEMU process (guest RAM touched and QEMU's own)."),
		guestMem:     d("vm_guest_memory_bytes", "Guest memory as the guest's balloon driver reports it (VMs with one)."),
		diskRead:     d("vm_disk_read_bytes_total", "Bytes the guest read from its disks (QMP query-blockstats)."),
		diskWritten:  d("vm_disk_written_bytes_total", "Bytes the guest wrote to its disks."),
		diskReadOps:  d("vm_disk_read_ops_total", "Read operations of the guest's disks."),
		diskWriteOps: d("vm_disk_write_ops_total", "Write operations of the guest's disks."),
		netRx:        d("vm_network_receive_bytes_total", "Bytes the guest received on its tap and macvtap NICs."),
		netTx:        d("vm_network_transmit_bytes_total", "Bytes the guest sent on its tap and macvtap NICs."),
		netRxPackets: d("vm_network_receive_packets_total", "Packets the guest received on its tap and macvtap NICs."),
		netTxPackets: d("vm_network_transmit_packets_total", "Packets the guest sent on its tap and macvtap NICs."),
	}
}

func (u *vmUsage) descs() []*prometheus.Desc {
	return []*prometheus.Desc{u.sampled, u.cpu, u.cpuRatio, u.rss, u.guestMem, u.diskRead, u.diskWritten, u.diskReadOps, u.diskWriteOps,
		u.netRx, u.netTx, u.netRxPackets, u.netTxPackets}
}

func (u *vmUsage) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range u.descs() {
		ch <- d
	}
}

func (u *vmUsage) Collect(ch chan<- prometheus.Metric) {
	u.mu.Lock()
	stats := u.stats
	u.mu.Unlock()
	if stats == nil {
		return
	}
	for _, s := range stats() {
		x := s.Usage
		if x == nil {
			continue
		}
		emit := func(d *prometheus.Desc, t prometheus.ValueType, v float64) {
			ch <- prometheus.MustNewConstMetric(d, t, v, s.Name, s.UUID)
		}
		emit(u.sampled, prometheus.GaugeValue, float64(x.SampledAt.UnixNano())/1e9)
		emit(u.cpu, prometheus.CounterValue, x.CPUSeconds)
		emit(u.cpuRatio, prometheus.GaugeValue, x.CPUPercent/100)
		emit(u.rss, prometheus.GaugeValue, float64(x.MemoryRSSBytes))
		if x.GuestMemory != nil {
			emit(u.guestMem, prometheus.GaugeValue, float64(x.GuestMemory.ActualBytes))
		}
		emit(u.diskRead, prometheus.CounterValue, float64(x.DiskReadBytes))
		emit(u.diskWritten, prometheus.CounterValue, float64(x.DiskWriteBytes))
		emit(u.diskReadOps, prometheus.CounterValue, float64(x.DiskReadOps))
		emit(u.diskWriteOps, prometheus.CounterValue, float64(x.DiskWriteOps))
		emit(u.netRx, prometheus.CounterValue, float64(x.NetRxBytes))
		emit(u.netTx, prometheus.CounterValue, float64(x.NetTxBytes))
		emit(u.netRxPackets, prometheus.CounterValue, float64(x.NetRxPackets))
		emit(u.netTxPackets, prometheus.CounterValue, float64(x.NetTxPackets))
	}
}

// SetVMUsage sets the function read at each scrape for the per-VM usage
// series, typically agent.Host.AllStats. It must be quick and safe for
// concurrent use.
func (m *Metrics) SetVMUsage(f func() []api.VMStats) {
	if m == nil {
		return
	}
	m.usage.mu.Lock()
	m.usage.stats = f
	m.usage.mu.Unlock()
}
