package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/internal/etcdtest"
)

// clusterNodes are the node names of testCluster's agents, in order.
var clusterNodes = []string{"node-a", "node-b", "node-c"}

// testCluster is the cluster tests' setup: one three-member etcd, the
// test guest served over HTTP, and three cluster-mode agents (node-a,
// node-b, node-c) with their own data dirs, pools and API ports.
type testCluster struct {
	etcd   *etcdtest.Cluster
	image  string             // URL of the test guest's image
	agents []*standaloneAgent // in clusterNodes' order
}

// startTestCluster starts a testCluster and waits until every agent's API
// lists the three nodes ready, with their resources. Everything ends with
// the test.
func startTestCluster(t *testing.T) *testCluster {
	t.Helper()
	c := &testCluster{etcd: etcdtest.Start(t, 3)}
	srv := httptest.NewServer(http.FileServer(http.Dir(testguest.Dir(t))))
	t.Cleanup(srv.Close)
	c.image = srv.URL + "/guest.qcow2"
	for _, n := range clusterNodes {
		c.agents = append(c.agents, startClusterAgent(t, c.etcd, n, c.image))
	}
	for _, ag := range c.agents {
		waitNodes(t, ag, 60*time.Second, "three ready nodes", allReady)
	}
	return c
}

// allReady accepts a node list with the three nodes ready and reporting
// their CPUs and pools.
func allReady(nodes map[string]api.Node) bool {
	for _, n := range clusterNodes {
		if nodes[n].State != api.NodeReady || nodes[n].CPUs == 0 || len(nodes[n].Pools) == 0 {
			return false
		}
	}
	return true
}

// testHeartbeat is the cluster tests' heartbeat interval: a node reads
// lost 10 to 15 s after its agent dies, and other hosts see a VM's change
// within 5 s. It is the shortest the config allows: a heartbeat answered
// cluster_unavailable (an etcd member's election) waits its Retry-After
// of 5 s.
const testHeartbeat = "5s"

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
	// stop_timeout: TestClusterFailures' stop outlasts eight ignored
	// power-button presses, two seconds apart; it takes 17-21 s on a
	// quiet host and must end within the outage, so a host slowed by
	// the other tests' guests must not turn it into stop_timeout.
	cfg := fmt.Sprintf("node_name: %s\ndata_dir: %s\nrun_dir: %s\nlisten:\n  api: 127.0.0.1:0\n  socket: \"\"\n  metrics: \"\"\n  forwards: 127.0.0.1\nqemu:\n  stop_timeout: 90s\ncluster:\n  heartbeat_interval: %s\n  etcd:\n    endpoints: %s\n    prefix: /%s/\n",
		node, a.dir, run, testHeartbeat, eps, strings.ReplaceAll(t.Name(), "/", "-"))
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

// waitHealthy waits until every running etcd member serves with a leader.
func waitHealthy(t *testing.T, tc *testCluster) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := tc.etcd.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
}

// waitView polls GET /v1/vms/{name} through a until ok accepts the view.
func (a *standaloneAgent) waitView(name, what string, d time.Duration, ok func(api.VM) bool) api.VM {
	a.t.Helper()
	var v api.VM
	var err error
	deadline := time.Now().Add(d)
	for {
		v = api.VM{}
		if err = a.apiGet("/v1/vms/"+name, &v); err == nil && ok(v) {
			return v
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("%s: last view %+v (err %v)", what, v, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// waitFor polls cond every 100 ms until it holds.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	if !waitUntil(d, cond) {
		t.Fatalf("waiting %v for %s", d, what)
	}
}

// waitUntil polls cond every 100 ms for up to d and reports whether it
// held.
func waitUntil(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
	return true
}
