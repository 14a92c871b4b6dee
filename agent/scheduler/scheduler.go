// Package scheduler places a new VM on a node of a cluster (docs/cluster.md,
// "Placement"): a pure function of what the create asks and what the
// nodes' heartbeats report, so the same inputs always give the same node.
package scheduler

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// VCPUOvercommit is how many vCPUs a node takes per CPU it has.
const VCPUOvercommit = 4

// MinPoolFreeBytes is the free space a pool must have to take a new VM:
// its root disk is a thin copy-on-write overlay, so its size says little
// of what it will use, but a pool without room fails the create.
const MinPoolFreeBytes = 1 << 30

// Request is what a create asks of its node.
type Request struct {
	Arch     string
	VCPUs    int
	MemoryMB int
	// Pool is the storage pool; "" is the cluster's default pool: each
	// node's own default_pool.
	Pool    string
	Network string // "" for none
	// Node pins the VM to that node ("" lets the scheduler pick).
	Node string
}

// Node is a candidate: its state and registration as its heartbeats
// report them, and what its VMs (and creates under way) already take.
type Node struct {
	Name  string
	State string // api.NodeReady, api.NodeDraining, api.NodeLost
	Info  *protocol.NodeInfo
	// UsedMemoryMB and UsedVCPUs are the memory and vCPUs of the VMs
	// that hold them (not stopped) and of the creates queued for it.
	UsedMemoryMB int64
	UsedVCPUs    int
}

// Placement is the scheduler's answer: the node, the pool there, and
// why (shown on the VM as placement.reason).
type Placement struct {
	Node   string
	Pool   string
	Reason string
}

// fit is a node that can take the VM.
type fit struct {
	node    Node
	pool    string
	kvm     bool
	freeMB  int64
	freeCPU int
}

// Pick places req on one of nodes. Pinned (req.Node), the node must exist
// (not_found), hold the pool (pool_not_on_node) and fit (no_node_fits);
// else the scheduler keeps the nodes that fit and takes, in order, one
// that runs the arch with KVM, the most free memory, the most free vCPUs,
// the first name. No node fitting is no_node_fits, naming each node's
// reason.
func Pick(req Request, nodes []Node) (Placement, error) {
	if req.Node != "" {
		return pinned(req, nodes)
	}
	if err := known(req, nodes); err != nil {
		return Placement{}, err
	}
	var fits []fit
	var why []string
	for _, n := range nodes {
		f, err := check(req, n)
		if err != nil {
			why = append(why, n.Name+": "+errcode.MessageOf(err))
			continue
		}
		fits = append(fits, f)
	}
	if len(fits) == 0 {
		if len(nodes) == 0 {
			why = append(why, "the cluster has no node")
		}
		return Placement{}, errcode.New(errcode.NoNodeFits, "no node fits the vm: %s", strings.Join(why, "; "))
	}
	slices.SortFunc(fits, func(a, b fit) int {
		if a.kvm != b.kvm {
			if a.kvm {
				return -1
			}
			return 1
		}
		if c := cmp.Compare(b.freeMB, a.freeMB); c != 0 {
			return c
		}
		if c := cmp.Compare(b.freeCPU, a.freeCPU); c != 0 {
			return c
		}
		return cmp.Compare(a.node.Name, b.node.Name)
	})
	best := fits[0]
	return Placement{Node: best.node.Name, Pool: best.pool, Reason: fmt.Sprintf(
		"scheduler: best of %d fitting node(s) (%s, %d MiB and %d vCPUs free, pool %s)",
		len(fits), accel(best.kvm), best.freeMB, best.freeCPU, best.pool)}, nil
}

// pinned checks the node a create names.
func pinned(req Request, nodes []Node) (Placement, error) {
	i := slices.IndexFunc(nodes, func(n Node) bool { return n.Name == req.Node })
	if i < 0 {
		return Placement{}, errcode.New(errcode.NotFound, "no node %q", req.Node)
	}
	f, err := check(req, nodes[i])
	if err != nil {
		return Placement{}, err
	}
	return Placement{Node: f.node.Name, Pool: f.pool, Reason: "pinned: node given (--node)"}, nil
}

// known refuses a pool or a network no node has: that is a wrong name,
// not a full cluster.
func known(req Request, nodes []Node) error {
	poolSeen, netSeen, defSeen, reported := false, false, false, false
	for _, n := range nodes {
		if n.Info == nil {
			continue
		}
		reported = true
		defSeen = defSeen || n.Info.DefaultPool != ""
		for _, p := range n.Info.Pools {
			poolSeen = poolSeen || p.Name == req.Pool
		}
		for _, nw := range n.Info.Networks {
			netSeen = netSeen || nw.Name == req.Network
		}
	}
	switch {
	case !reported:
		return nil // nothing known yet: each node says so
	case req.Pool == "" && !defSeen:
		return errcode.New(errcode.DefaultPoolNotSet, "no pool given and no node has a default_pool")
	case req.Pool != "" && !poolSeen:
		return errcode.New(errcode.PoolNotFound, "pool %q is on no node", req.Pool)
	case req.Network != "" && !netSeen:
		return errcode.New(errcode.NetworkNotFound, "network %q is on no node", req.Network)
	}
	return nil
}

// check says whether n can take req, and with which pool.
func check(req Request, n Node) (fit, error) {
	f := fit{node: n}
	if n.State != api.NodeReady {
		return f, errcode.New(errcode.NoNodeFits, "node %q is %s", n.Name, n.State)
	}
	info := n.Info
	if info == nil {
		return f, errcode.New(errcode.NoNodeFits, "node %q has not reported its resources yet", n.Name)
	}
	f.pool = req.Pool
	if f.pool == "" {
		if f.pool = info.DefaultPool; f.pool == "" {
			return f, errcode.New(errcode.DefaultPoolNotSet, "no pool given and node %q has no default_pool", n.Name)
		}
	}
	pi := slices.IndexFunc(info.Pools, func(p protocol.PoolInfo) bool { return p.Name == f.pool })
	if pi < 0 {
		return f, errcode.New(errcode.PoolNotOnNode, "pool %q is not on node %q", f.pool, n.Name)
	}
	if free := info.Pools[pi].FreeBytes; free < MinPoolFreeBytes {
		return f, errcode.New(errcode.NoNodeFits, "pool %q of node %q has %d MiB free, under %d MiB", f.pool, n.Name, free>>20, MinPoolFreeBytes>>20)
	}
	if !slices.Contains(info.Arches, req.Arch) {
		return f, errcode.New(errcode.NoNodeFits, "node %q cannot run arch %s", n.Name, req.Arch)
	}
	if req.Network != "" && !slices.ContainsFunc(info.Networks, func(nw protocol.NetworkInfo) bool { return nw.Name == req.Network }) {
		return f, errcode.New(errcode.NetworkNotFound, "network %q is not on node %q", req.Network, n.Name)
	}
	f.freeMB = info.MemoryMB - n.UsedMemoryMB
	if f.freeMB < int64(req.MemoryMB) {
		return f, errcode.New(errcode.NoNodeFits, "node %q has %d MiB of memory free, the vm needs %d", n.Name, max(f.freeMB, 0), req.MemoryMB)
	}
	f.freeCPU = info.CPUs*VCPUOvercommit - n.UsedVCPUs
	if req.VCPUs > info.CPUs || f.freeCPU < req.VCPUs {
		return f, errcode.New(errcode.NoNodeFits, "node %q has %d CPUs and %d vCPUs free, the vm needs %d", n.Name, info.CPUs, max(f.freeCPU, 0), req.VCPUs)
	}
	f.kvm = info.KVM && info.Arch == req.Arch
	return f, nil
}

func accel(kvm bool) string {
	if kvm {
		return "kvm"
	}
	return "tcg"
}
