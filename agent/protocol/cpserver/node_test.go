package cpserver_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

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

// TestNodeChangedScoped: a task change wakes the long polls of its node,
// not another node's; a task of no node wakes every node's.
func TestNodeChangedScoped(t *testing.T) {
	for name, mk := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			st := mk()
			// Unique ids: -count reuses the etcd prefix.
			t1, t2 := uuid.NewString(), uuid.NewString()
			ch1, ch2 := st.NodeChanged("n1"), st.NodeChanged("n2")
			all := st.Changed()
			if err := st.AddTask(ctx, cpserver.Task{Task: api.Task{ID: t1, Type: api.TaskReset, Status: api.TaskPending}, Node: "n1"}); err != nil {
				t.Fatal(err)
			}
			for _, ch := range []<-chan struct{}{ch1, all} {
				select {
				case <-ch:
				case <-ctx.Done():
					t.Fatal("n1's task did not wake n1's waiters")
				}
			}
			select {
			case <-ch2:
				t.Fatal("n1's task woke n2's long polls")
			default:
			}
			// Leased, then ended: its lease key goes with the task's
			// change, which is no expiry.
			for _, fn := range []func(*cpserver.Task) error{
				func(x *cpserver.Task) error {
					x.Status, x.LeaseID, x.LeaseExpiry = api.TaskRunning, "l1", time.Now().Add(time.Minute)
					return nil
				},
				func(x *cpserver.Task) error { x.Status = api.TaskSuccess; return nil },
			} {
				ch1 = st.NodeChanged("n1")
				if _, err := st.UpdateTask(ctx, t1, fn); err != nil {
					t.Fatal(err)
				}
				select {
				case <-ch1:
				case <-ctx.Done():
					t.Fatal("n1's task did not wake n1's long polls")
				}
				select {
				case <-ch2:
					t.Fatal("n1's task woke n2's long polls")
				default:
				}
			}
			if err := st.AddTask(ctx, cpserver.Task{Task: api.Task{ID: t2, Type: api.TaskReset, Status: api.TaskPending}}); err != nil {
				t.Fatal(err)
			}
			select {
			case <-ch2:
			case <-ctx.Done():
				t.Fatal("a task of no node did not wake n2's long polls")
			}
		})
	}
}
