package standalone

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver/etcdstore"
	"github.com/otherix/otherix-agent/internal/etcdtest"
)

// raceCluster is three hosts' APIs over real HTTP, each with its own
// replica of the control plane on one real etcd (docs/cluster.md), and
// their node records: node-2 has memMB of memory, the others memOthers.
type raceCluster struct {
	urls  map[string]string
	store cpserver.Store // one more replica, to look
}

func newRaceCluster(t *testing.T, memMB, memOthers int64) *raceCluster {
	t.Helper()
	c := etcdtest.Start(t, 1)
	replica := func() cpserver.Store {
		cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		s := etcdstore.New(cli, etcdstore.Options{Prefix: "/race/"})
		t.Cleanup(func() {
			s.Close()
			cli.Close()
		})
		return s
	}
	rc := &raceCluster{urls: map[string]string{}, store: replica()}
	peer := func(context.Context) (string, error) { return "peer-0123456789abcdef0123456789", nil }
	for _, node := range []string{"node-1", "node-2", "node-3"} {
		a := NewAPI(newNamedTestHost(t, node), NewClusterControlPlane(replica(), node, testToken, zap.NewNop()), zap.NewNop())
		a.SetCluster(&Cluster{Node: node, PeerToken: peer})
		srv := httptest.NewServer(RequireTokens(a.Handler(), testToken, peer))
		t.Cleanup(srv.Close)
		rc.urls[node] = srv.URL
		mem := memOthers
		if node == "node-2" {
			mem = memMB
		}
		info := &protocol.NodeInfo{Name: node, APIURL: srv.URL, Arch: "amd64", Arches: []string{"amd64"}, CPUs: 2, MemoryMB: mem,
			DefaultPool: "default", Pools: []protocol.PoolInfo{{Name: "default", TotalBytes: 20 << 30, FreeBytes: 10 << 30}}}
		if err := rc.store.PutNode(context.Background(), cpserver.Node{Name: node, State: api.NodeReady, LastHeartbeat: time.Now(), Info: info}); err != nil {
			t.Fatal(err)
		}
	}
	return rc
}

// createAll sends one create to each host of via at the same instant and
// returns the answers (status and body) in via's order.
func (rc *raceCluster) createAll(t *testing.T, via []string, body func(i int) map[string]any) ([]int, []string) {
	t.Helper()
	codes, bodies := make([]int, len(via)), make([]string, len(via))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, node := range via {
		b, _ := json.Marshal(body(i))
		req, _ := http.NewRequest("POST", rc.urls[node]+"/v1/vms", bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer "+testToken)
		wg.Go(func() {
			<-start
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			var raw json.RawMessage
			json.NewDecoder(resp.Body).Decode(&raw)
			codes[i], bodies[i] = resp.StatusCode, string(raw)
		})
	}
	close(start)
	wg.Wait()
	return codes, bodies
}

// TestClusterCreatesOneName: creates of one name sent at the same
// instant to the three hosts (each placing on another node) are one
// accepted and the others conflict: the name is reserved in etcd with
// the create, whichever replica stores it. The VM is then found by name
// through any host.
func TestClusterCreatesOneName(t *testing.T) {
	rc := newRaceCluster(t, 4096, 4096)
	via := []string{"node-1", "node-2", "node-3", "node-1", "node-2", "node-3"}
	for round := range 3 {
		name := fmt.Sprint("same-", round)
		codes, bodies := rc.createAll(t, via, func(i int) map[string]any {
			return map[string]any{"name": name, "image_url": "http://127.0.0.1:1/guest.qcow2", "arch": "amd64", "vcpus": 1, "memory_mb": 256,
				"no_cloud_init": true, "node": via[(i+1)%len(via)]}
		})
		won := 0
		for i, code := range codes {
			switch {
			case code == http.StatusAccepted:
				won++
			case code != http.StatusConflict || !strings.Contains(bodies[i], `"conflict"`):
				t.Errorf("%s: create through %s: %d %s, want 202 or 409 conflict", name, via[i], code, bodies[i])
			}
		}
		if won != 1 {
			t.Errorf("%s: %d creates accepted, want 1: %v", name, won, codes)
		}
		open, _ := rc.store.Unfinished(context.Background())
		n := 0
		for _, tk := range open {
			if tk.VMName == name {
				n++
			}
		}
		v, ok, err := rc.store.VMByName(context.Background(), name)
		if n != 1 || !ok || err != nil {
			t.Errorf("%s: %d creates queued, VM by name %+v %v %v; want one", name, n, v, ok, err)
		}
	}
}

// TestClusterCreatesRaceCapacity: creates sent at the same instant to
// the three hosts, each of which the scheduler can place on node-2
// alone, which has room for one: one is accepted, the others are
// no_node_fits, as the capacity check runs in the transaction that
// stores the create.
func TestClusterCreatesRaceCapacity(t *testing.T) {
	rc := newRaceCluster(t, 1024, 256)
	via := []string{"node-1", "node-2", "node-3", "node-1"}
	for round := range 3 {
		codes, bodies := rc.createAll(t, via, func(i int) map[string]any {
			return map[string]any{"name": fmt.Sprintf("big-%d-%d", round, i), "image_url": "http://127.0.0.1:1/guest.qcow2", "arch": "amd64",
				"vcpus": 1, "memory_mb": 600, "no_cloud_init": true}
		})
		won := 0
		for i, code := range codes {
			switch {
			case code == http.StatusAccepted:
				won++
			case code != http.StatusConflict || !strings.Contains(bodies[i], `"no_node_fits"`):
				t.Errorf("round %d: create through %s: %d %s, want 202 or 409 no_node_fits", round, via[i], code, bodies[i])
			}
		}
		if want := 0; round > 0 && won != want || round == 0 && won != 1 {
			t.Errorf("round %d: %d creates accepted, want %d: %v", round, won, map[bool]int{true: 1, false: 0}[round == 0], codes)
		}
	}
	open, _ := rc.store.Unfinished(context.Background())
	mem := 0
	for _, tk := range open {
		var c api.CreateVM
		json.Unmarshal(tk.Spec, &c)
		if tk.Node == "node-2" {
			mem += c.MemoryMB
		}
	}
	if mem > 1024 {
		t.Errorf("node-2 holds creates of %d MiB, has 1024", mem)
	}
}

// TestClusterCreatesPlacedAgain: three creates sent at the same instant
// to the three hosts, where each node has room for one: the scheduler
// picks the same node for all three (the first name of equals), and a
// create that node found full is placed again on what is left, so all
// three land, one per node.
func TestClusterCreatesPlacedAgain(t *testing.T) {
	rc := newRaceCluster(t, 1024, 1024)
	via := []string{"node-1", "node-2", "node-3"}
	codes, bodies := rc.createAll(t, via, func(i int) map[string]any {
		return map[string]any{"name": fmt.Sprint("again-", i), "image_url": "http://127.0.0.1:1/guest.qcow2", "arch": "amd64",
			"vcpus": 1, "memory_mb": 600, "no_cloud_init": true}
	})
	for i, code := range codes {
		if code != http.StatusAccepted {
			t.Errorf("create through %s: %d %s, want 202", via[i], code, bodies[i])
		}
	}
	open, _ := rc.store.Unfinished(context.Background())
	on := map[string]int{}
	for _, tk := range open {
		on[tk.Node]++
	}
	if len(open) != 3 || on["node-1"] != 1 || on["node-2"] != 1 || on["node-3"] != 1 {
		t.Errorf("creates by node %v, want one on each", on)
	}
}
