package standalone

import (
	"context"
	"fmt"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Cluster reports whether the control plane is a replica of cluster mode.
func (cp *ControlPlane) Cluster() bool { return cp.node != "" }

// RemoteVMs returns the VMs of the other nodes as their last heartbeats
// report them (cluster mode; nil in standalone mode). A VM of a lost node
// shows its last reported status, node_state lost and why.
func (cp *ControlPlane) RemoteVMs(ctx context.Context) ([]api.VM, error) {
	if !cp.Cluster() {
		return nil, nil
	}
	nodes, err := cp.srv.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	var out []api.VM
	for _, n := range nodes {
		if n.Name == cp.node {
			continue
		}
		for _, st := range n.VMs {
			out = append(out, remoteView(n, st))
		}
	}
	return out, nil
}

// remoteView is a VM of another node as its heartbeat reports it.
func remoteView(n cpserver.Node, st protocol.VMStatus) api.VM {
	v := api.VM{
		Name: st.Name, UUID: st.UUID, Status: st.Status, StatusReason: st.StatusReason, DesiredPhase: st.DesiredPhase,
		Arch: st.Arch, VCPUs: st.VCPUs, MemoryMB: st.MemoryMB,
		Pool: st.Pool, Node: n.Name, NodeState: nodeView(n).State, QEMUPID: st.QEMUPID, IPAddresses: st.IPAddresses,
		InstanceStatus: api.InstanceStatus(st.Status), RestartCount: st.RestartCount, CrashLoop: st.CrashLoop,
		LastTask: st.LastTask, Usage: st.Usage,
	}
	if v.Node == "" {
		v.Node = st.Node
	}
	if v.NodeState == api.NodeLost {
		// What its agent last said; the VM itself may run on or not.
		v.InstanceStatus = "UNKNOWN"
		// Not "since last_heartbeat": an idle node's record is rewritten
		// only every few minutes (etcdstore's NodeRefresh).
		v.StatusReason = fmt.Sprintf("node %s lost: no heartbeat within its node timeout", n.Name)
		v.Usage = nil
	}
	return v
}

// vmsView lists every VM the API shows: this host's from its engine, and
// in cluster mode the other nodes' from the store (an unreachable store
// fails the list: 503 cluster_unavailable, rather than a partial one).
func (a *API) vmsView(ctx context.Context) ([]api.VM, error) {
	local := a.host.VMs(ctx)
	if !a.cp.Cluster() {
		return local, nil
	}
	remote, err := a.cp.RemoteVMs(ctx)
	if err != nil {
		return nil, storeErr(err)
	}
	seen := make(map[string]bool, len(local))
	for i := range local {
		local[i].NodeState = api.NodeReady
		seen[local[i].Name] = true
	}
	for _, v := range remote {
		if !seen[v.Name] {
			local = append(local, v)
		}
	}
	return local, nil
}

// vmView is one VM by name: this host's, else (cluster mode) another
// node's as its last heartbeat reports it.
func (a *API) vmView(ctx context.Context, name string) (api.VM, error) {
	v, err := a.host.VM(name)
	if !a.cp.Cluster() {
		return v, err
	}
	if err == nil {
		v.NodeState = api.NodeReady
		return v, nil
	}
	if !errcode.Is(err, errcode.NotFound) {
		return v, err
	}
	remote, rerr := a.cp.RemoteVMs(ctx)
	if rerr != nil {
		return api.VM{}, storeErr(rerr)
	}
	for _, r := range remote {
		if r.Name == name {
			return r, nil
		}
	}
	return api.VM{}, err
}
