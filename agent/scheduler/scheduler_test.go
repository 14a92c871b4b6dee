package scheduler

import (
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// node is a ready amd64 TCG node with 2 CPUs, 4 GiB and the default pool
// (10 GiB free), changed by fn.
func node(name string, fn func(*Node)) Node {
	n := Node{Name: name, State: api.NodeReady, Info: &protocol.NodeInfo{
		Name: name, Arch: "amd64", CPUs: 2, MemoryMB: 4096, Arches: []string{"amd64"}, DefaultPool: "default",
		Pools: []protocol.PoolInfo{{Name: "default", TotalBytes: 20 << 30, FreeBytes: 10 << 30}},
	}}
	if fn != nil {
		fn(&n)
	}
	return n
}

func TestPick(t *testing.T) {
	vm := Request{Arch: "amd64", VCPUs: 1, MemoryMB: 512}
	with := func(fn func(*Request)) Request { r := vm; fn(&r); return r }
	fast := func(n *Node) { n.Info.Arches = append(n.Info.Arches, "arm64") }
	for _, tc := range []struct {
		name  string
		req   Request
		nodes []Node
		want  string // node, or the error code
		why   string // in the reason or the error's message
	}{
		{"most free memory", vm, []Node{node("a", func(n *Node) { n.UsedMemoryMB = 2048 }), node("b", nil), node("c", func(n *Node) { n.UsedMemoryMB = 1024 })},
			"b", "best of 3 fitting node(s) (tcg, 4096 MiB"},
		{"kvm first", vm, []Node{node("a", nil), node("b", func(n *Node) { n.Info.KVM = true; n.UsedMemoryMB = 3000 })}, "b", "(kvm,"},
		{"kvm of another arch is tcg", with(func(r *Request) { r.Arch = "arm64" }),
			[]Node{node("a", func(n *Node) { fast(n); n.Info.KVM = true; n.UsedMemoryMB = 100 }), node("b", fast)}, "b", "(tcg,"},
		{"free vcpus break a tie", vm, []Node{node("a", func(n *Node) { n.UsedVCPUs = 4 }), node("b", func(n *Node) { n.UsedVCPUs = 1 })}, "b", "7 vCPUs free"},
		{"name breaks a tie", vm, []Node{node("b", nil), node("a", nil)}, "a", "pool default"},
		{"lost and draining skipped", vm, []Node{node("a", func(n *Node) { n.State = api.NodeLost }),
			node("b", func(n *Node) { n.State = api.NodeDraining }), node("c", func(n *Node) { n.UsedMemoryMB = 3000 })}, "c", "best of 1"},
		{"arch", with(func(r *Request) { r.Arch = "arm64" }), []Node{node("a", nil), node("b", fast)}, "b", ""},
		{"memory", with(func(r *Request) { r.MemoryMB = 4000 }), []Node{node("a", func(n *Node) { n.UsedMemoryMB = 512 }), node("b", nil)}, "b", ""},
		{"vcpus over overcommit", vm, []Node{node("a", func(n *Node) { n.UsedVCPUs = 8 }), node("b", func(n *Node) { n.UsedMemoryMB = 3000 })}, "b", ""},
		{"pool given", with(func(r *Request) { r.Pool = "fast" }), []Node{node("a", nil),
			node("b", func(n *Node) {
				n.Info.Pools = append(n.Info.Pools, protocol.PoolInfo{Name: "fast", FreeBytes: 5 << 30})
				n.UsedMemoryMB = 2000
			})}, "b", "pool fast"},
		{"default pool per node", vm, []Node{node("a", func(n *Node) { n.Info.DefaultPool = "" }), node("b", func(n *Node) { n.UsedMemoryMB = 1 })}, "b", ""},
		{"full pool", vm, []Node{node("a", func(n *Node) { n.Info.Pools[0].FreeBytes = 100 << 20 }), node("b", func(n *Node) { n.UsedMemoryMB = 1 })}, "b", ""},
		{"network", with(func(r *Request) { r.Network = "lan" }), []Node{node("a", nil),
			node("b", func(n *Node) { n.Info.Networks = []protocol.NetworkInfo{{Name: "lan"}}; n.UsedMemoryMB = 1 })}, "b", ""},

		{"pinned", with(func(r *Request) { r.Node = "c" }), []Node{node("a", nil), node("c", func(n *Node) { n.UsedMemoryMB = 3000 })}, "c", "pinned"},
		{"pinned without the pool", with(func(r *Request) { r.Node = "a"; r.Pool = "fast" }), []Node{node("a", nil)}, string(errcode.PoolNotOnNode), `pool "fast" is not on node "a"`},
		{"pinned unknown", with(func(r *Request) { r.Node = "x" }), []Node{node("a", nil)}, string(errcode.NotFound), `no node "x"`},
		{"pinned lost", with(func(r *Request) { r.Node = "a" }), []Node{node("a", func(n *Node) { n.State = api.NodeLost })}, string(errcode.NoNodeFits), "is lost"},
		{"pinned full", with(func(r *Request) { r.Node = "a"; r.MemoryMB = 8192 }), []Node{node("a", nil)}, string(errcode.NoNodeFits), "needs 8192"},
		{"pinned without default pool", with(func(r *Request) { r.Node = "a" }), []Node{node("a", func(n *Node) { n.Info.DefaultPool = "" })},
			string(errcode.DefaultPoolNotSet), "no default_pool"},

		{"nothing fits", with(func(r *Request) { r.MemoryMB = 8192 }), []Node{node("a", nil), node("b", func(n *Node) { n.State = api.NodeLost })},
			string(errcode.NoNodeFits), `node "a" has 4096 MiB of memory free, the vm needs 8192; b: node "b" is lost`},
		{"no nodes", vm, nil, string(errcode.NoNodeFits), "no node"},
		{"unknown pool", with(func(r *Request) { r.Pool = "nope" }), []Node{node("a", nil)}, string(errcode.PoolNotFound), ""},
		{"unknown network", with(func(r *Request) { r.Network = "nope" }), []Node{node("a", nil)}, string(errcode.NetworkNotFound), ""},
		{"no default pool anywhere", vm, []Node{node("a", func(n *Node) { n.Info.DefaultPool = "" })}, string(errcode.DefaultPoolNotSet), ""},
		{"no resources yet", vm, []Node{{Name: "a", State: api.NodeReady}}, string(errcode.NoNodeFits), "not reported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Pick(tc.req, tc.nodes)
			got, msg := p.Node, p.Reason
			if err != nil {
				got, msg = string(errcode.Of(err)), errcode.MessageOf(err)
			}
			if got != tc.want || !strings.Contains(msg, tc.why) {
				t.Errorf("got %s (%q), want %s (%q)", got, msg, tc.want, tc.why)
			}
			if err == nil && p.Pool == "" {
				t.Errorf("no pool: %+v", p)
			}
		})
	}
}
