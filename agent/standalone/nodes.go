package standalone

import (
	"context"
	"errors"
	"net/http"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Nodes returns the nodes the control plane knows, as the API shows them.
func (cp *ControlPlane) Nodes(ctx context.Context) ([]api.Node, error) {
	nodes, err := cp.srv.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Node, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, nodeView(n))
	}
	return out, nil
}

// nodeView is a node as GET /v1/nodes shows it.
func nodeView(n cpserver.Node) api.Node {
	v := api.Node{Name: n.Name, State: n.State, LastHeartbeat: n.LastHeartbeat, VMCount: len(n.VMs)}
	if v.State == "" {
		v.State = api.NodeReady // registered, no heartbeat yet
	}
	if i := n.Info; i != nil {
		v.AgentVersion, v.Arch, v.KVM, v.CPUs, v.MemoryMB, v.Arches = i.AgentVersion, i.Arch, i.KVM, i.CPUs, i.MemoryMB, i.Arches
		for _, p := range i.Pools {
			v.Pools = append(v.Pools, api.NodePool{Name: p.Name, Node: n.Name, TotalBytes: p.TotalBytes, FreeBytes: p.FreeBytes})
		}
		for _, nw := range i.Networks {
			v.Networks = append(v.Networks, nw.Name)
		}
	}
	return v
}

// nodes serves GET /v1/nodes.
func (a *API) nodes(w http.ResponseWriter, r *http.Request) {
	nodes, err := a.cp.Nodes(r.Context())
	if err != nil {
		writeErr(w, storeErr(err))
		return
	}
	writeJSON(w, http.StatusOK, api.NodeList{Nodes: nodes})
}

// node serves GET /v1/nodes/{name}.
func (a *API) node(w http.ResponseWriter, r *http.Request) {
	nodes, err := a.cp.Nodes(r.Context())
	if err != nil {
		writeErr(w, storeErr(err))
		return
	}
	name := r.PathValue("name")
	for _, n := range nodes {
		if n.Name == name {
			writeJSON(w, http.StatusOK, n)
			return
		}
	}
	writeErr(w, errcode.New(errcode.NotFound, "no node %q", name))
}

// storeErr gives a control-plane store error its code: an unreachable
// cluster store (etcd without quorum) is cluster_unavailable (503).
func storeErr(err error) error {
	if isUnavailable(err) {
		return errcode.Wrap(errcode.ClusterUnavailable, err, "cluster store")
	}
	return errcode.Wrap(errcode.Internal, err, "control plane store")
}

func isUnavailable(err error) bool { return errors.Is(err, cpserver.ErrUnavailable) }
