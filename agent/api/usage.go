package api

import "time"

// Usage is what one VM's QEMU uses, as the agent last sampled it
// (GET /v1/vms/{name}/stats). Counters count from the QEMU process's
// start: a restart (a new qemu_pid) begins them again at zero. Network
// directions are the guest's: rx is what the guest received.
type Usage struct {
	SampledAt time.Time `json:"sampled_at"`
	QEMUPID   int       `json:"qemu_pid"`
	// CPUSeconds is the CPU time of QEMU (every thread, user and
	// system); CPUPercent its rate over the last sampling interval (100
	// is one CPU busy; absent on a first sample).
	CPUSeconds float64 `json:"cpu_seconds"`
	CPUPercent float64 `json:"cpu_percent"`
	// MemoryRSSBytes is QEMU's resident memory: the guest RAM it touched
	// and QEMU's own.
	MemoryRSSBytes int64 `json:"memory_rss_bytes"`
	// GuestMemory is the guest's memory as its balloon driver reports it;
	// absent when the guest has no balloon driver.
	GuestMemory *GuestMemory `json:"guest_memory,omitempty"`
	// Totals over Disks and NICs.
	DiskReadBytes  int64 `json:"disk_read_bytes"`
	DiskWriteBytes int64 `json:"disk_write_bytes"`
	DiskReadOps    int64 `json:"disk_read_ops"`
	DiskWriteOps   int64 `json:"disk_write_ops"`
	NetRxBytes     int64 `json:"net_rx_bytes"`
	NetTxBytes     int64 `json:"net_tx_bytes"`
	NetRxPackets   int64 `json:"net_rx_packets"`
	NetTxPackets   int64 `json:"net_tx_packets"`
	// Disks from QMP query-blockstats (CD-ROMs included), by QEMU's node
	// name (disk0 is the root disk).
	Disks []DiskUsage `json:"disks,omitempty"`
	// NICs with a host link (tap, macvtap); SLIRP NICs have no counters.
	NICs []NICUsage `json:"nics,omitempty"`
}

// GuestMemory is balloon-reported guest memory.
type GuestMemory struct {
	// ActualBytes is the memory the guest has (its size minus what the
	// balloon holds).
	ActualBytes int64 `json:"actual_bytes"`
	// The guest's own view, from its balloon driver's statistics (absent
	// until the guest reported them): its total memory, the memory it
	// does not use at all, and what it could use without swapping
	// (free plus reclaimable caches).
	TotalBytes     int64 `json:"total_bytes,omitempty"`
	FreeBytes      int64 `json:"free_bytes,omitempty"`
	AvailableBytes int64 `json:"available_bytes,omitempty"`
}

// DiskUsage is one disk's IO.
type DiskUsage struct {
	Node       string `json:"node"`
	ReadBytes  int64  `json:"read_bytes"`
	WriteBytes int64  `json:"write_bytes"`
	ReadOps    int64  `json:"read_ops"`
	WriteOps   int64  `json:"write_ops"`
}

// NICUsage is one NIC's traffic, from the guest's side.
type NICUsage struct {
	Index     int    `json:"index"`
	Link      string `json:"link"` // the host's tap or macvtap
	RxBytes   int64  `json:"rx_bytes"`
	TxBytes   int64  `json:"tx_bytes"`
	RxPackets int64  `json:"rx_packets"`
	TxPackets int64  `json:"tx_packets"`
}

// UsageSummary is the compact usage in the VM view and the heartbeat:
// the figures a scheduler places by, the same as Usage's.
type UsageSummary struct {
	SampledAt      time.Time `json:"sampled_at"`
	CPUSeconds     float64   `json:"cpu_seconds"`
	CPUPercent     float64   `json:"cpu_percent"`
	MemoryRSSBytes int64     `json:"memory_rss_bytes"`
	DiskReadBytes  int64     `json:"disk_read_bytes"`
	DiskWriteBytes int64     `json:"disk_write_bytes"`
	NetRxBytes     int64     `json:"net_rx_bytes"`
	NetTxBytes     int64     `json:"net_tx_bytes"`
}

// Summary returns u's compact form.
func (u *Usage) Summary() *UsageSummary {
	if u == nil {
		return nil
	}
	return &UsageSummary{
		SampledAt: u.SampledAt, CPUSeconds: u.CPUSeconds, CPUPercent: u.CPUPercent, MemoryRSSBytes: u.MemoryRSSBytes,
		DiskReadBytes: u.DiskReadBytes, DiskWriteBytes: u.DiskWriteBytes, NetRxBytes: u.NetRxBytes, NetTxBytes: u.NetTxBytes,
	}
}

// VMStats is the answer of GET /v1/vms/{name}/stats: the VM and its
// usage (absent while QEMU does not run, or before its first sample).
type VMStats struct {
	Name   string `json:"name"`
	UUID   string `json:"uuid"`
	Status string `json:"status"`
	Usage  *Usage `json:"usage,omitempty"`
}
