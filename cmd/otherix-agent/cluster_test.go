package main

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// TestClusterThreeAgents: three agents on one three-member etcd serve one
// cluster: every host's API lists the three nodes with their resources; a
// VM created through a host's API boots the real test guest on that node
// only; a host that dies shows as lost, and the others work on.
func TestClusterThreeAgents(t *testing.T) {
	tc := startTestCluster(t)
	c, image := tc.etcd, tc.image
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

	// A VM created on node-b runs there (its task is leased by node-b's
	// agent only) and shows in every host's node list.
	b.ok("vm", "create", "cl-1", "--image-url", image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--no-cloud-init", "--wait")
	if v := b.getVM("cl-1"); v.Status != api.StatusRunning || v.Node != "node-b" {
		t.Fatalf("cl-1 on node-b: %+v", v)
	}
	waitNodes(t, a, 60*time.Second, "node-b runs one VM", func(n map[string]api.Node) bool {
		return n["node-b"].VMCount == 1 && n["node-a"].VMCount == 0 && n["node-c"].VMCount == 0
	})

	// A host down: its node is lost after the node timeout; the others
	// work on.
	cc.kill()
	start := time.Now()
	waitNodes(t, a, 90*time.Second, "node-c lost", func(n map[string]api.Node) bool {
		return n["node-c"].State == api.NodeLost && n["node-a"].State == api.NodeReady && n["node-b"].State == api.NodeReady
	})
	t.Logf("node-c lost %v after its agent died", time.Since(start).Round(time.Second))

	// Quorum lost: the VM runs on under the same QEMU, the API answers
	// 503 cluster_unavailable; back, the cluster serves again.
	pid := b.getVM("cl-1").QEMUPID
	killed := c.KillQuorum()
	waitNoLeader(t, c)
	if r := b.cli("", "vm", "stop", "cl-1"); r.code == 0 || !strings.Contains(r.stderr, "cluster_unavailable") {
		t.Errorf("vm stop without quorum: exit %d, stderr %q", r.code, r.stderr)
	}
	if r := a.cli("", "node", "list"); r.code == 0 || !strings.Contains(r.stderr, "cluster_unavailable") {
		t.Errorf("node list without quorum: exit %d, stderr %q", r.code, r.stderr)
	}
	if v := b.getVM("cl-1"); v.Status != api.StatusRunning || v.QEMUPID != pid {
		t.Errorf("cl-1 without quorum: %+v (pid was %d)", v, pid)
	}
	for _, mb := range killed {
		if err := mb.Restart(); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	r = b.ok("vm", "stop", "cl-1", "--force")
	m := regexp.MustCompile(`task=(\S+)`).FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("vm stop printed no task: %q", r.stdout)
	}
	// Its result reaches the store through any replica's view.
	if task := waitTask(t, a, m[1], 90*time.Second); task.Status != api.TaskSuccess {
		t.Fatalf("stop after quorum is back: %+v", task)
	}
	if v := b.getVM("cl-1"); v.Status != api.StatusStopped {
		t.Fatalf("cl-1 after the stop: %+v", v)
	}
	waitNodes(t, a, 60*time.Second, "node-a and node-b ready again", func(n map[string]api.Node) bool {
		return n["node-a"].State == api.NodeReady && n["node-b"].State == api.NodeReady
	})
}
