package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// TestClusterFailures proves docs/cluster.md's failure semantics with the
// real thing: three agents on a three-member etcd and two booted test
// guests, fc-1 on node-c and fb-1 on node-b.
//
//   - One etcd member down: both VMs are created, and fc-1 stopped and
//     started, through the API.
//   - A host down (node-c's agent killed): node-c reads lost after the
//     node timeout, and fc-1, through the other hosts' API, shows node
//     lost with its last pid; nothing moves it. The agent back adopts the
//     same QEMU and node-c is ready again.
//   - Quorum lost while fb-1's stop runs (its guest ignores the first
//     power-button presses, so the stop, leased before, ends during the
//     outage): the API answers 503 cluster_unavailable, fc-1 runs on
//     under the same pid, node-b holds the stop's result in its journal
//     and delivers it once quorum is back: the store records it once
//     (attempt 1, one delivery), and the VM stopped once.
func TestClusterFailures(t *testing.T) {
	tc := startTestCluster(t)
	b, c := tc.agents[1], tc.agents[2]

	// One member down: the others keep quorum and the cluster works on.
	down := tc.etcd.Members[0]
	down.Kill()
	waitHealthy(t, tc)
	ud := filepath.Join(t.TempDir(), "user-data")
	if err := os.WriteFile(ud, []byte("#cloud-config\n#otherix-guest: ignore-acpi-presses 8\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	create := []string{"--image-url", tc.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "192"}
	// Pinned: without --node the scheduler would pick (cluster_place_test).
	cTask := c.queue(append([]string{"vm", "create", "fc-1", "--node", "node-c", "--no-cloud-init"}, create...)...)
	bTask := b.queue(append([]string{"vm", "create", "fb-1", "--node", "node-b", "--user-data", ud}, create...)...)
	for _, x := range []struct {
		ag *standaloneAgent
		id string
	}{{c, cTask}, {b, bTask}} {
		if tk := x.ag.waitTask(x.id, 3*time.Minute); tk.Status != api.TaskSuccess {
			t.Fatalf("create with one etcd member down: %+v", tk)
		}
	}
	c.ok("vm", "stop", "fc-1", "--force", "--wait")
	c.ok("vm", "start", "fc-1", "--wait")
	if err := down.Restart(); err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, tc)

	hostDown(t, tc)
	quorumLost(t, tc)
}

// hostDown kills node-c's agent (its VM fc-1 runs on), waits for node-c
// lost through the other hosts, and starts the agent again.
func hostDown(t *testing.T, tc *testCluster) {
	a, b, c := tc.agents[0], tc.agents[1], tc.agents[2]
	pid := c.getVM("fc-1").QEMUPID
	a.waitView("fc-1", "fc-1 on node-c through node-a", 60*time.Second, func(v api.VM) bool {
		return v.Node == "node-c" && v.NodeState != api.NodeLost && v.QEMUPID == pid
	})
	// That view came from node-c's API; the view of a lost node is its
	// last heartbeat's: wait until one reported fc-1 with this pid (vm
	// list shows other nodes' VMs from their heartbeats).
	waitFor(t, 60*time.Second, "node-c's heartbeat reports fc-1", func() bool {
		var page struct{ VMs []api.VM }
		if a.apiGet("/v1/vms?node=node-c", &page) != nil {
			return false
		}
		return len(page.VMs) == 1 && page.VMs[0].Name == "fc-1" && page.VMs[0].QEMUPID == pid
	})

	before := c.eventTypes("fc-1")
	c.kill()
	start := time.Now()
	waitNodes(t, a, 90*time.Second, "node-c lost", func(n map[string]api.Node) bool {
		return n["node-c"].State == api.NodeLost && n["node-a"].State == api.NodeReady && n["node-b"].State == api.NodeReady
	})
	t.Logf("node-c lost %v after its agent died", time.Since(start).Round(100*time.Millisecond))
	v := b.getVM("fc-1")
	if v.Node != "node-c" || v.NodeState != api.NodeLost || v.InstanceStatus != "UNKNOWN" || v.QEMUPID != pid ||
		!strings.Contains(v.StatusReason, "node node-c lost") {
		t.Errorf("fc-1 through node-b while node-c is lost: %+v", v)
	}
	if r := a.ok("vm", "list"); !regexpLine(r.stdout, `^fc-1\s+\S+\s+\S+\s+node-c \(lost\)\s`) {
		t.Errorf("vm list through node-a shows no lost node-c:\n%s", r.stdout)
	}
	if r := a.ok("vm", "list", "--node", "node-c"); strings.Count(r.stdout, "\n") != 2 {
		t.Errorf("vm list --node node-c: want fc-1 alone:\n%s", r.stdout)
	}
	if !alive(pid) {
		t.Fatalf("fc-1's QEMU %d died with its agent", pid)
	}

	start = time.Now()
	c.start()
	waitNodes(t, a, 60*time.Second, "node-c ready again", func(n map[string]api.Node) bool {
		return n["node-c"].State == api.NodeReady
	})
	back := a.waitView("fc-1", "fc-1 back on node-c", 60*time.Second, func(v api.VM) bool {
		return v.NodeState != api.NodeLost && v.Status == api.StatusRunning
	})
	t.Logf("node-c ready and fc-1 seen running %v after its agent started again", time.Since(start).Round(100*time.Millisecond))
	if back.QEMUPID != pid || c.getVM("fc-1").QEMUPID != pid {
		t.Fatalf("fc-1 came back with QEMU %d (through node-c: %d), want the same %d", back.QEMUPID, c.getVM("fc-1").QEMUPID, pid)
	}
	if after := c.eventTypes("fc-1"); len(after) != len(before) {
		t.Errorf("fc-1's history changed across its agent's restart: %v, then %v", before, after)
	}
}

// quorumLost stops fb-1 (node-b) and cuts etcd's quorum while the stop
// runs; the stop ends during the outage and its result is delivered once
// quorum is back.
func quorumLost(t *testing.T, tc *testCluster) {
	a, b, c := tc.agents[0], tc.agents[1], tc.agents[2]
	waitConsole(t, b.console("fb-1"), "ready") // acpid listens
	fb := b.getVM("fb-1")
	fbPID := fb.QEMUPID
	fcPID := c.getVM("fc-1").QEMUPID
	id := b.queue("vm", "stop", "fb-1")
	waitTaskStatus(t, b, id, api.TaskRunning)

	killed := tc.etcd.KillQuorum()
	outage := time.Now()
	waitNoLeader(t, tc.etcd)
	for _, x := range []struct {
		ag   *standaloneAgent
		args []string
	}{{c, []string{"vm", "stop", "fc-1"}}, {a, []string{"node", "list"}}, {a, []string{"task", "list"}}, {a, []string{"task", "get", id}}} {
		if r := x.ag.cli("", x.args...); r.code == 0 || !strings.Contains(r.stderr, "cluster_unavailable") {
			t.Errorf("otherix %s without quorum: exit %d, stderr %q", strings.Join(x.args, " "), r.code, r.stderr)
		}
	}
	if v := c.getVM("fc-1"); v.Status != api.StatusRunning || v.QEMUPID != fcPID {
		t.Errorf("fc-1 without quorum: %+v (pid was %d)", v, fcPID)
	}
	// The stop ends while quorum is lost: its guest powers off and the
	// agent fails to deliver the result, which its journal keeps.
	if !waitUntil(2*time.Minute, func() bool { return !alive(fbPID) }) {
		t.Fatalf("waiting 2m0s for fb-1's QEMU exits during the outage; node-b's log:\n%s\nconsole:\n%s", tail(b.logText(), 6000), tail(consoleOf(b, fb.UUID), 2000))
	}
	waitFor(t, time.Minute, "node-b fails to deliver the stop's result", func() bool {
		for line := range strings.Lines(b.logText()) {
			if strings.Contains(line, "will retry") && strings.Contains(line, `"op":"complete"`) {
				return true
			}
		}
		return false
	})
	if tk := taskInStore(t, tc, id); tk.Status != api.TaskRunning {
		t.Fatalf("the stop's result reached the store during the outage: %+v", tk)
	}
	if !alive(fcPID) {
		t.Errorf("fc-1's QEMU %d died during the outage", fcPID)
	}

	for _, m := range killed {
		if err := m.Restart(); err != nil {
			t.Fatal(err)
		}
	}
	waitHealthy(t, tc)
	t.Logf("quorum lost for %v", time.Since(outage).Round(100*time.Millisecond))
	back := time.Now()
	if tk := waitTask(t, a, id, 2*time.Minute); tk.Status != api.TaskSuccess {
		t.Fatalf("the stop after quorum is back: %+v", tk)
	}
	t.Logf("the held result reached the store %v after quorum came back", time.Since(back).Round(100*time.Millisecond))
	if tk := taskInStore(t, tc, id); tk.Attempt != 1 || tk.Deliveries != 1 || tk.Status != api.TaskSuccess {
		t.Errorf("the stop in the store: attempt %d, deliveries %d, status %s; want one attempt, one delivery, success", tk.Attempt, tk.Deliveries, tk.Status)
	}
	var l api.VMEventList
	if err := b.apiGet("/v1/vms/fb-1/events", &l); err != nil {
		t.Fatal(err)
	}
	stops := 0
	for _, e := range l.Events {
		if e.Type == api.EventStopped {
			stops++
			if e.TaskID != id {
				t.Errorf("fb-1 stopped by task %s, want %s", e.TaskID, id)
			}
		}
	}
	if stops != 1 {
		t.Errorf("fb-1 stopped %d times: %+v", stops, l.Events)
	}
	a.waitView("fb-1", "fb-1 stopped through node-a", time.Minute, func(v api.VM) bool {
		return v.Status == api.StatusStopped && v.NodeState != api.NodeLost
	})
	if v := c.getVM("fc-1"); v.Status != api.StatusRunning || v.QEMUPID != fcPID {
		t.Errorf("fc-1 after the outage: %+v (pid was %d)", v, fcPID)
	}
	waitNodes(t, a, 60*time.Second, "three nodes ready after the outage", allReady)
}

// waitTaskStatus polls a task through a until it has status.
func waitTaskStatus(t *testing.T, a *standaloneAgent, id, status string) {
	t.Helper()
	var tk api.Task
	waitFor(t, time.Minute, "task "+id+" "+status, func() bool {
		return a.apiGet("/v1/tasks/"+id, &tk) == nil && tk.Status == status
	})
}

// alive reports whether a process runs (a zombie does not).
func alive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(stat), ')')
	return i > 0 && i+2 < len(stat) && stat[i+2] != 'Z'
}

// taskInStore reads a task's record from etcd itself, under the prefix
// startClusterAgent gives the test's agents.
func taskInStore(t *testing.T, tc *testCluster, id string) cpserver.Task {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: tc.etcd.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Serializable: a member's own copy answers without quorum.
	resp, err := cli.Get(ctx, "/"+strings.ReplaceAll(t.Name(), "/", "-")+"/tasks/"+id, clientv3.WithSerializable())
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("task %s in etcd: %v %v", id, err, resp)
	}
	var tk cpserver.Task
	if err := json.Unmarshal(resp.Kvs[0].Value, &tk); err != nil {
		t.Fatal(err)
	}
	return tk
}

// consoleOf is a VM's console log as its agent keeps it.
func consoleOf(a *standaloneAgent, uuid string) string {
	b, _ := os.ReadFile(filepath.Join(a.dir, "vms", uuid, "console.log"))
	return string(b)
}
