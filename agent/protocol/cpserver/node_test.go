package cpserver_test

import (
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// TestSameNode: a heartbeat's time, its VMs' usage samples and their
// order are no change; a status, a VM more or a different node_info is.
func TestSameNode(t *testing.T) {
	vm := func(uuid, status string, cpu float64) protocol.VMStatus {
		return protocol.VMStatus{Name: uuid, UUID: uuid, Status: status, Usage: &api.UsageSummary{CPUSeconds: cpu}}
	}
	base := cpserver.Node{Name: "n1", State: protocol.NodeReady, LastHeartbeat: time.Unix(100, 0),
		Info: &protocol.NodeInfo{Name: "n1", CPUs: 4}, VMs: []protocol.VMStatus{vm("a", api.StatusRunning, 1), vm("b", api.StatusStopped, 0)}}
	for _, tc := range []struct {
		name string
		edit func(n *cpserver.Node)
		same bool
	}{
		{"time and usage", func(n *cpserver.Node) {
			n.LastHeartbeat = time.Unix(200, 0)
			n.VMs = []protocol.VMStatus{vm("a", api.StatusRunning, 9), vm("b", api.StatusStopped, 0)}
		}, true},
		{"order", func(n *cpserver.Node) {
			n.VMs = []protocol.VMStatus{vm("b", api.StatusStopped, 0), vm("a", api.StatusRunning, 1)}
		}, true},
		{"status", func(n *cpserver.Node) {
			n.VMs = []protocol.VMStatus{vm("a", api.StatusStopped, 1), vm("b", api.StatusStopped, 0)}
		}, false},
		{"a VM more", func(n *cpserver.Node) { n.VMs = append(n.VMs, vm("c", api.StatusRunning, 0)) }, false},
		{"a VM replaced", func(n *cpserver.Node) {
			n.VMs = []protocol.VMStatus{vm("a", api.StatusRunning, 1), vm("c", api.StatusStopped, 0)}
		}, false},
		{"node_info", func(n *cpserver.Node) { n.Info = &protocol.NodeInfo{Name: "n1", CPUs: 8} }, false},
		{"state", func(n *cpserver.Node) { n.State = protocol.NodeDraining }, false},
	} {
		n := base
		n.VMs = append([]protocol.VMStatus(nil), base.VMs...)
		tc.edit(&n)
		if got := cpserver.SameNode(base, n); got != tc.same {
			t.Errorf("%s: SameNode = %v, want %v", tc.name, got, tc.same)
		}
	}
}
