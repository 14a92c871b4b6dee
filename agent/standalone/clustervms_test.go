package standalone

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// downStore is a store that lost its backend for nodes (quorum lost).
type downStore struct {
	*cpserver.MemStore
	down bool
}

var errNoLeader = fmt.Errorf("%w: no leader", cpserver.ErrUnavailable)

func (s *downStore) Nodes(ctx context.Context) ([]cpserver.Node, error) {
	if s.down {
		return nil, errNoLeader
	}
	return s.MemStore.Nodes(ctx)
}

func (s *downStore) Task(ctx context.Context, id string) (cpserver.Task, error) {
	if s.down {
		return cpserver.Task{}, errNoLeader
	}
	return s.MemStore.Task(ctx, id)
}

func (s *downStore) Tasks(ctx context.Context) ([]cpserver.Task, error) {
	if s.down {
		return nil, errNoLeader
	}
	return s.MemStore.Tasks(ctx)
}

// TestClusterVMViews: in cluster mode a host's API lists its own VMs
// (node_state ready) and the other nodes' as their heartbeats report
// them; a VM of a lost node shows node_state lost, instance_status
// UNKNOWN and why. Without the store the list, the tasks and a task are
// 503 cluster_unavailable (not an empty list, not not_found); a VM of
// this host still answers.
func TestClusterVMViews(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	store := &downStore{MemStore: &cpserver.MemStore{}}
	last := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, n := range []cpserver.Node{
		{Name: "node-2", State: api.NodeReady, LastHeartbeat: time.Now(), VMs: []protocol.VMStatus{
			{Name: "far-1", UUID: "a1b2c3d4-0000-4000-8000-000000000001", Status: api.StatusRunning, QEMUPID: 4242, Pool: "default", DesiredPhase: api.PhaseRunning}}},
		{Name: "node-3", State: api.NodeLost, LastHeartbeat: last, VMs: []protocol.VMStatus{
			{Name: "far-2", UUID: "a1b2c3d4-0000-4000-8000-000000000002", Status: api.StatusRunning, QEMUPID: 4343, Pool: "default",
				Usage: &api.UsageSummary{}}}},
	} {
		if err := store.PutNode(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	cp := NewClusterControlPlane(store, "node-1", testToken, zap.NewNop())
	h := NewAPI(newTestHost(t), cp, zap.NewNop()).Handler()

	var page listPage
	if rec := call(t, h, "GET", "/v1/vms", nil, &page); rec.Code != http.StatusOK {
		t.Fatalf("list: %d %s", rec.Code, rec.Body)
	}
	got := map[string]api.VM{}
	for _, v := range page.VMs {
		got[v.Name] = v
	}
	if v := got[targetVM]; v.NodeState != api.NodeReady || v.Node != "node-1" {
		t.Errorf("this host's VM: %+v", v)
	}
	if v := got["far-1"]; v.Node != "node-2" || v.NodeState != api.NodeReady || v.Status != api.StatusRunning || v.QEMUPID != 4242 || v.InstanceStatus != "RUNNING" {
		t.Errorf("a ready node's VM: %+v", v)
	}
	var lost api.VM
	if rec := call(t, h, "GET", "/v1/vms/far-2", nil, &lost); rec.Code != http.StatusOK {
		t.Fatalf("get far-2: %d %s", rec.Code, rec.Body)
	}
	if lost.Node != "node-3" || lost.NodeState != api.NodeLost || lost.InstanceStatus != "UNKNOWN" || lost.QEMUPID != 4343 ||
		!strings.Contains(lost.StatusReason, "node node-3 lost: no heartbeat within its node timeout") || lost.Usage != nil {
		t.Errorf("a lost node's VM: %+v", lost)
	}
	if rec := call(t, h, "GET", "/v1/vms?node=node-3", nil, &page); rec.Code != http.StatusOK || len(page.VMs) != 1 || page.VMs[0].Name != "far-2" {
		t.Errorf("list --node node-3: %d %+v", rec.Code, page.VMs)
	}
	if rec := call(t, h, "GET", "/v1/vms/nowhere", nil, nil); rec.Code != http.StatusNotFound {
		t.Errorf("an unknown VM: %d %s", rec.Code, rec.Body)
	}

	if rec := call(t, h, "GET", "/v1/tasks/0f8fad5b-d9cb-469f-a165-70867728950e", nil, nil); rec.Code != http.StatusNotFound {
		t.Errorf("an unknown task: %d %s", rec.Code, rec.Body)
	}

	store.down = true
	for _, path := range []string{"/v1/vms", "/v1/tasks", "/v1/tasks/0f8fad5b-d9cb-469f-a165-70867728950e"} {
		if rec := call(t, h, "GET", path, nil, nil); rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), "cluster_unavailable") {
			t.Errorf("GET %s without the store: %d %s", path, rec.Code, rec.Body)
		}
	}
	if rec := call(t, h, "GET", "/v1/vms/far-1", nil, nil); rec.Code != http.StatusServiceUnavailable {
		t.Errorf("another node's VM without the store: %d %s", rec.Code, rec.Body)
	}
	var local api.VM
	if rec := call(t, h, "GET", "/v1/vms/"+targetVM, nil, &local); rec.Code != http.StatusOK || local.NodeState != api.NodeReady {
		t.Errorf("this host's VM without the store: %d %s", rec.Code, rec.Body)
	}
}
