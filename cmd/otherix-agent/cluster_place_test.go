package main

import (
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// checkPlacement is TestClusterThreeAgents' placement part, on its
// cluster: a (node-a), b (node-b), c (node-c), with cl-1 running on node-b
// (created through node-a's API with --node node-b). It proves: a VM's
// view, events and console through any host; a create without --node
// placed by the scheduler, its reason in vm get; pool_not_on_node and
// no_node_fits; vm list --node through any host; a stop and a start sent
// through a third host's API for a VM on another.
func checkPlacement(t *testing.T, a, b, c *standaloneAgent, image string) {
	t.Helper()
	// cl-1's view through the hosts that do not run it: its placement
	// (pinned) and the same QEMU.
	local := b.getVM("cl-1")
	for _, ag := range []*standaloneAgent{a, c} {
		v := ag.getVM("cl-1")
		if v.Node != "node-b" || v.QEMUPID != local.QEMUPID || v.Status != api.StatusRunning ||
			v.Placement == nil || v.Placement.Node != "node-b" || !strings.HasPrefix(v.Placement.Reason, "pinned") {
			t.Fatalf("cl-1 through another host: %+v (placement %+v), on node-b: pid %d", v, v.Placement, local.QEMUPID)
		}
	}
	if r := c.ok("vm", "get", "cl-1"); !regexpLine(r.stdout, `^placement: node=node-b pool=default reason=pinned`) {
		t.Errorf("vm get through node-c:\n%s", r.stdout)
	}
	if r := c.ok("vm", "events", "cl-1"); !strings.Contains(r.stdout, api.EventCreated) {
		t.Errorf("vm events through node-c:\n%s", r.stdout)
	}
	if r := a.cli("", "vm", "console", "cl-1"); r.code != 0 {
		t.Errorf("vm console through node-a: exit %d: %s", r.code, r.stderr)
	}

	// Refusals: a pinned node without the pool; no node with the
	// memory; a name another node has.
	base := []string{"--image-url", image, "--arch", "amd64", "--vcpus", "1", "--no-cloud-init"}
	create := func(name string, more ...string) []string {
		return append(append([]string{"vm", "create", name}, base...), more...)
	}
	a.fails(1, "pool_not_on_node", create("pl-x", "--node", "node-c", "--pool", "nope")...)
	c.fails(1, "pool_not_found", create("pl-x", "--pool", "nope")...)
	b.fails(1, "no_node_fits", create("pl-x", "--memory-mb", "524288")...)
	c.fails(1, "not_found", create("pl-x", "--node", "node-z")...)
	c.fails(1, "conflict", create("cl-1", "--memory-mb", "256")...)

	// Without --node through node-c's API: the scheduler takes the node
	// with the most free memory, node-a or node-c (node-b runs cl-1).
	c.ok(create("pl-2", "--memory-mb", "256", "--wait")...)
	v := c.getVM("pl-2")
	if (v.Node != "node-a" && v.Node != "node-c") || v.Status != api.StatusRunning || v.Placement == nil ||
		v.Placement.Node != v.Node || !strings.HasPrefix(v.Placement.Reason, "scheduler: best of 3 fitting node(s) (tcg,") {
		t.Fatalf("pl-2 placed by the scheduler: %+v (placement %+v)", v, v.Placement)
	}
	owner := map[string]*standaloneAgent{"node-a": a, "node-c": c}[v.Node]
	if ov := owner.getVM("pl-2"); ov.QEMUPID != v.QEMUPID || ov.QEMUPID == 0 {
		t.Fatalf("pl-2 on %s: %+v, through node-c: pid %d", v.Node, ov, v.QEMUPID)
	}
	t.Logf("pl-2: %s", v.Placement.Reason)

	// vm list through any host has both (another node's VMs as its last
	// heartbeat reports them); --node by where the agents say the VMs
	// are.
	for _, ag := range []*standaloneAgent{a, b, c} {
		waitFor(t, 60*time.Second, "vm list has cl-1 and pl-2", func() bool {
			r := ag.ok("vm", "list")
			return regexpLine(r.stdout, `^cl-1\s+running\s+amd64\s+node-b\s`) && regexpLine(r.stdout, `^pl-2\s+running\s+amd64\s+`+v.Node+`\s`)
		})
		r := ag.ok("vm", "list", "--node", "node-b")
		if !strings.Contains(r.stdout, "cl-1") || strings.Contains(r.stdout, "pl-2") {
			t.Errorf("vm list --node node-b:\n%s", r.stdout)
		}
	}

	// A stop and a start through node-b's API, a third host for a VM of
	// node-a or node-c: its own agent runs them.
	b.ok("vm", "stop", "pl-2", "--force", "--wait")
	if ov := owner.getVM("pl-2"); ov.Status != api.StatusStopped {
		t.Fatalf("pl-2 after a stop through node-b: %+v", ov)
	}
	b.ok("vm", "start", "pl-2", "--wait")
	ov := owner.getVM("pl-2")
	if ov.Status != api.StatusRunning || ov.QEMUPID == v.QEMUPID {
		t.Fatalf("pl-2 after a start through node-b: %+v", ov)
	}
	b.ok("vm", "delete", "pl-2", "--force", "--wait")
	if r := owner.cli("", "vm", "get", "pl-2"); r.code == 0 || !strings.Contains(r.stderr, "not_found") {
		t.Errorf("pl-2 after its delete: exit %d, %s", r.code, r.stderr)
	}
	// The other hosts show it until its node's next heartbeat.
	for _, ag := range []*standaloneAgent{a, b, c} {
		waitFor(t, 60*time.Second, "pl-2 gone", func() bool {
			r := ag.cli("", "vm", "get", "pl-2")
			return r.code != 0 && strings.Contains(r.stderr, "not_found")
		})
	}
}
