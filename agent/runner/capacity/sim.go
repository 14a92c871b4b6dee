package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
)

// simHost is what one simulated agent reports, as the real agent
// (agent.Host's inventory, runner's heartbeat) would: its VMs' statuses
// with a usage sample that changes at every heartbeat, and node_info
// only when its JSON changed since the last acknowledged heartbeat
// (nil at start: the first heartbeat carries it). The pool's exact free
// space shrinks by a random amount averaging writeRate per second (guests
// writing to their disks) and is reported rounded as the agent does
// (protocol.RoundFreeBytes).
type simHost struct {
	node      string
	free      int64 // exact free bytes of the pool
	writeRate int64 // bytes/s, mean
	vms       []protocol.VMStatus
	lastNode  []byte // node_info JSON last acknowledged
	lastFree  int64  // exact free bytes last acknowledged
}

func newSimHost(node string, vms int, writeRate int64) *simHost {
	h := &simHost{node: node, free: 3<<40 - rand.Int64N(1<<40), writeRate: writeRate}
	for j := range vms {
		h.vms = append(h.vms, protocol.VMStatus{Name: fmt.Sprintf("%s-vm%d", node, j), UUID: uuid.NewString(), Status: api.StatusRunning,
			Pool: "default", Node: node, QEMUPID: 1000 + j, Usage: &api.UsageSummary{MemoryRSSBytes: 1 << 30}})
	}
	return h
}

func (h *simHost) info() protocol.NodeInfo {
	return protocol.NodeInfo{Name: h.node, AgentVersion: "capacity", QEMUVersion: "7.2.0", Arch: "amd64", KVM: true, CPUs: 64, MemoryMB: 512 << 10,
		Pools:    []protocol.PoolInfo{{Name: "default", TotalBytes: 4 << 40, FreeBytes: protocol.RoundFreeBytes(h.free)}},
		Networks: []protocol.NetworkInfo{{Name: "lan", Bridge: "br0", Type: "bridge"}}, Arches: []string{"amd64"}, Firmwares: []string{"bios/amd64", "uefi/amd64"}}
}

// heartbeat returns the next heartbeat after elapsed, and node_info's
// JSON to pass to acked once it is answered. exact says whether it would
// carry node_info if free_bytes were exact to the byte (the baseline).
func (h *simHost) heartbeat(seq uint64, elapsed time.Duration) (req protocol.HeartbeatRequest, nodeJSON []byte, exact bool) {
	if mean := h.writeRate * int64(elapsed/time.Millisecond) / 1000; mean > 0 {
		h.free -= rand.Int64N(2 * mean)
	}
	now := time.Now().UTC()
	vms := make([]protocol.VMStatus, len(h.vms))
	for i, v := range h.vms {
		u := *v.Usage
		u.SampledAt = now
		u.CPUPercent = rand.Float64() * 100
		u.CPUSeconds += u.CPUPercent / 100 * elapsed.Seconds()
		u.DiskWriteBytes += h.writeRate / int64(len(h.vms)) * int64(elapsed/time.Second)
		v.Usage = &u
		h.vms[i].Usage, vms[i] = &u, v
	}
	req = protocol.HeartbeatRequest{ProtocolVersion: protocol.Version, Node: h.node, Seq: seq, State: protocol.NodeReady, VMs: vms}
	info := h.info()
	b, _ := json.Marshal(info)
	if string(b) != string(h.lastNode) {
		req.NodeInfo = &info
	}
	return req, b, req.NodeInfo != nil || h.free != h.lastFree
}

// acked records node_info as acknowledged.
func (h *simHost) acked(nodeJSON []byte) { h.lastNode, h.lastFree = nodeJSON, h.free }
