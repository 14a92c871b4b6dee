package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/internal/etcdtest"
)

// startClusterAgent starts a cluster-mode agent named node on the etcd
// cluster c, with its own data dir, pool and API port.
func startClusterAgent(t *testing.T, c *etcdtest.Cluster, node, image string) *standaloneAgent {
	t.Helper()
	run, err := os.MkdirTemp("/tmp", "oxc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	a := &standaloneAgent{t: t, dir: t.TempDir(), cluster: true, image: image}
	a.cfgPath = filepath.Join(t.TempDir(), "agent.yaml")
	eps, _ := json.Marshal(c.Endpoints())
	cfg := fmt.Sprintf("node_name: %s\ndata_dir: %s\nrun_dir: %s\nlisten:\n  api: 127.0.0.1:0\n  socket: \"\"\n  metrics: \"\"\n  forwards: 127.0.0.1\nqemu:\n  stop_timeout: 30s\ncluster:\n  etcd:\n    endpoints: %s\n    prefix: /%s/\n",
		node, a.dir, run, eps, strings.ReplaceAll(t.Name(), "/", "-"))
	if err := os.WriteFile(a.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	a.start()
	t.Cleanup(func() {
		a.kill()
		a.killVMs()
	})
	return a
}

// nodeStates is "otherix node list -o json" through a: name -> node.
func nodeStates(a *standaloneAgent) map[string]api.Node {
	a.t.Helper()
	var list api.NodeList
	if err := json.Unmarshal([]byte(a.ok("node", "list", "-o", "json").stdout), &list); err != nil {
		a.t.Fatal(err)
	}
	out := map[string]api.Node{}
	for _, n := range list.Nodes {
		out[n.Name] = n
	}
	return out
}

// waitNodes polls node list through a until ok accepts it.
func waitNodes(t *testing.T, a *standaloneAgent, d time.Duration, what string, ok func(map[string]api.Node) bool) map[string]api.Node {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		n := nodeStates(a)
		if ok(n) {
			return n
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: nodes %+v", what, n)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// TestClusterThreeAgents: three agents on one three-member etcd serve one
// cluster: every host's API lists the three nodes with their resources; a
// VM created through a host's API boots the real test guest on that node
// only; a host that dies shows as lost, and the others work on.
func TestClusterThreeAgents(t *testing.T) {
	c := etcdtest.Start(t, 3)
	srv := httptest.NewServer(http.FileServer(http.Dir(testguest.Dir(t))))
	defer srv.Close()
	image := srv.URL + "/guest.qcow2"
	var agents []*standaloneAgent
	for _, n := range []string{"node-a", "node-b", "node-c"} {
		agents = append(agents, startClusterAgent(t, c, n, image))
	}
	a, b, cc := agents[0], agents[1], agents[2]
	all := func(nodes map[string]api.Node) bool {
		for _, n := range []string{"node-a", "node-b", "node-c"} {
			if nodes[n].State != api.NodeReady || nodes[n].CPUs == 0 || len(nodes[n].Pools) == 0 {
				return false
			}
		}
		return true
	}
	for _, ag := range agents {
		waitNodes(t, ag, 60*time.Second, "three ready nodes", all)
	}
	r := a.ok("pool", "list")
	for _, n := range []string{"node-a", "node-b", "node-c"} {
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

// waitNoLeader waits until every running member knows it has no leader.
func waitNoLeader(t *testing.T, c *etcdtest.Cluster) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, m := range c.Members {
		for m.Running() {
			if has, err := m.HasLeader(ctx); err != nil || !has {
				break
			}
			if ctx.Err() != nil {
				t.Fatal("a member cut from quorum still has a leader")
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// waitTask polls GET /v1/tasks/{id} through a until the task ends.
func waitTask(t *testing.T, a *standaloneAgent, id string, d time.Duration) api.Task {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		req, _ := http.NewRequest("GET", a.url+"/v1/tasks/"+id, nil)
		req.Header.Set("Authorization", "Bearer "+a.token)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			var tk api.Task
			ok := resp.StatusCode == 200 && json.NewDecoder(resp.Body).Decode(&tk) == nil
			resp.Body.Close()
			if ok && (tk.Status == api.TaskSuccess || tk.Status == api.TaskFailed || tk.Status == api.TaskCancelled) {
				return tk
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("task %s did not end:\n%s", id, tail(a.logText(), 3000))
		}
		time.Sleep(300 * time.Millisecond)
	}
}
