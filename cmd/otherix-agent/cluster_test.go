package main

import (
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// TestClusterThreeAgents: three agents on one three-member etcd serve one
// cluster: every host's API lists the three nodes with their resources; a
// VM created through a host's API boots the real test guest on that node
// only, and shows through the other hosts' API. The failures (a host,
// an etcd member, etcd's quorum) are TestClusterFailures'.
func TestClusterThreeAgents(t *testing.T) {
	tc := startTestCluster(t)
	image := tc.image
	a, b, cc := tc.agents[0], tc.agents[1], tc.agents[2]
	r := a.ok("pool", "list")
	for _, n := range clusterNodes {
		if !regexpLine(r.stdout, `^`+n+`\s+default\s+`) {
			t.Errorf("pool list has no default pool of %s:\n%s", n, r.stdout)
		}
	}
	if r := b.ok("node", "get", "node-c"); !strings.Contains(r.stdout, "state:") || !strings.Contains(r.stdout, "pool default:") {
		t.Errorf("node get:\n%s", r.stdout)
	}

	// A VM created through node-a's API with --node node-b runs there
	// (its task is leased by node-b's agent only) and shows in every
	// host's node list.
	a.ok("vm", "create", "cl-1", "--node", "node-b", "--image-url", image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--no-cloud-init", "--wait")
	if v := b.getVM("cl-1"); v.Status != api.StatusRunning || v.Node != "node-b" {
		t.Fatalf("cl-1 on node-b: %+v", v)
	}
	waitNodes(t, a, 60*time.Second, "node-b runs one VM", func(n map[string]api.Node) bool {
		return n["node-b"].VMCount == 1 && n["node-a"].VMCount == 0 && n["node-c"].VMCount == 0
	})
	checkPlacement(t, a, b, cc, image)

	// Every host's API shows it, as node-b's heartbeat reports it.
	pid := b.getVM("cl-1").QEMUPID
	a.waitView("cl-1", "cl-1 through node-a", 60*time.Second, func(v api.VM) bool {
		return v.Node == "node-b" && v.Status == api.StatusRunning && v.QEMUPID == pid && v.NodeState != api.NodeLost
	})
}
