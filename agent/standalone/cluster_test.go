package standalone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// TestClusterForward: two hosts' APIs over one store, over real HTTP
// (node-2's over TLS). A request about a VM of node-2 sent to node-1 is
// answered by node-2, which trusts only the peer token; node-1 trusts only
// the certificate node-2 registered. A create through node-1 is placed
// (pinned, or by the scheduler) and queued by node-2 for itself, with its
// placement. A VM of a lost node shows its last heartbeat; a change to it
// is node_unavailable.
func TestClusterForward(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	store := &cpserver.MemStore{}
	peer := func(context.Context) (string, error) { return "peer-0123456789abcdef0123456789", nil }
	serve := func(node, token string, tlsOn bool) *httptest.Server {
		a := NewAPI(newNamedTestHost(t, node), NewClusterControlPlane(store, node, testToken, zap.NewNop()), zap.NewNop())
		a.SetCluster(&Cluster{Node: node, PeerToken: peer})
		h := RequireTokens(a.Handler(), token, peer)
		if tlsOn {
			return httptest.NewTLSServer(h)
		}
		return httptest.NewServer(h)
	}
	one := serve("node-1", "user-one-0123456789abcdef", false)
	defer one.Close()
	two := serve("node-2", "user-two-0123456789abcdef", true)
	defer two.Close()
	sum := sha256.Sum256(two.Certificate().Raw)
	info := &protocol.NodeInfo{Name: "node-2", APIURL: two.URL, APICertSHA256: hex.EncodeToString(sum[:]), Arch: "amd64", Arches: []string{"amd64"},
		CPUs: 2, MemoryMB: 4096, DefaultPool: "default", Pools: []protocol.PoolInfo{{Name: "default", TotalBytes: 20 << 30, FreeBytes: 10 << 30}}}
	putNode := func(state string, i *protocol.NodeInfo, vms ...protocol.VMStatus) {
		t.Helper()
		if err := store.PutNode(ctx, cpserver.Node{Name: "node-2", State: state, LastHeartbeat: time.Now(), Info: i, VMs: vms}); err != nil {
			t.Fatal(err)
		}
	}
	putNode(api.NodeReady, info)
	// vm-1 is node-2's (both test hosts define one).
	pinned := &api.Placement{Node: "node-2", Pool: "default", Reason: "pinned: node given (--node)"}
	if err := store.PutVM(ctx, cpserver.VM{UUID: targetVMUUID, Name: targetVM, Phase: api.PhaseStopped, Node: "node-2", Placement: pinned}); err != nil {
		t.Fatal(err)
	}
	do := func(method, path, token string, body any, out any) (int, string) {
		t.Helper()
		var b []byte
		if body != nil {
			b, _ = json.Marshal(body)
		}
		req, _ := http.NewRequest(method, one.URL+path, bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var raw json.RawMessage
		json.NewDecoder(resp.Body).Decode(&raw)
		if out != nil && resp.StatusCode < 300 {
			json.Unmarshal(raw, out)
		}
		return resp.StatusCode, string(raw)
	}
	const user = "user-one-0123456789abcdef"

	var v api.VM
	if code, body := do("GET", "/v1/vms/"+targetVM, user, nil, &v); code != 200 || v.Node != "node-2" || v.NodeState != api.NodeReady ||
		v.Placement == nil || *v.Placement != *pinned {
		t.Errorf("vm-1 through node-1: %d %s", code, body)
	}
	// A peer's request is served where it lands, never forwarded again.
	if code, body := do("GET", "/v1/vms/"+targetVM, "peer-0123456789abcdef0123456789", nil, &v); code != 200 || v.Node != "node-1" {
		t.Errorf("vm-1 asked by a peer: %d %s", code, body)
	}
	if code, _ := do("GET", "/v1/vms/"+targetVM, "user-two-0123456789abcdef", nil, nil); code != http.StatusUnauthorized {
		t.Errorf("node-2's user token at node-1: %d", code)
	}

	// Creates through node-1: queued by node-2, with their placement.
	create := func(name, node string) api.Task {
		t.Helper()
		var tk api.Task
		c := map[string]any{"name": name, "image_url": "http://127.0.0.1:1/guest.qcow2", "arch": "amd64", "vcpus": 1, "memory_mb": 256, "no_cloud_init": true}
		if node != "" {
			c["node"] = node
		}
		if code, body := do("POST", "/v1/vms", user, c, &tk); code != http.StatusAccepted {
			t.Fatalf("create %s: %d %s", name, code, body)
		}
		return tk
	}
	for _, tc := range []struct{ name, node, reason string }{{"new-1", "node-2", "pinned"}, {"new-2", "", "scheduler: best of 1"}} {
		tk := create(tc.name, tc.node)
		st, err := store.Task(ctx, tk.ID)
		d, ok, _ := store.VM(ctx, tk.VMUUID)
		if err != nil || st.Node != "node-2" || !ok || d.Node != "node-2" || d.Placement == nil || !strings.HasPrefix(d.Placement.Reason, tc.reason) {
			t.Errorf("create %s: task %+v (%v), vm %+v", tc.name, st, err, d)
		}
	}
	for _, tc := range []struct {
		body map[string]any
		code string
	}{
		{map[string]any{"node": "node-2", "pool": "nope"}, "pool_not_on_node"},
		{map[string]any{"node": "node-9"}, "not_found"},
		{map[string]any{"memory_mb": 8192}, "no_node_fits"},
		{map[string]any{"name": "new-1"}, "conflict"},
	} {
		c := map[string]any{"name": "new-x", "image_url": "http://127.0.0.1:1/guest.qcow2", "arch": "amd64", "no_cloud_init": true}
		for k, x := range tc.body {
			c[k] = x
		}
		if code, body := do("POST", "/v1/vms", user, c, nil); code < 400 || !strings.Contains(body, `"`+tc.code+`"`) {
			t.Errorf("create %v: %d %s, want %s", tc.body, code, body, tc.code)
		}
	}

	// node-2 registered another certificate: node-1 does not trust it,
	// and answers from node-2's last heartbeat.
	bad := *info
	bad.APICertSHA256 = strings.Repeat("0", 64)
	putNode(api.NodeReady, &bad, protocol.VMStatus{Name: targetVM, UUID: targetVMUUID, Status: api.StatusRunning, QEMUPID: 77, Node: "node-2"})
	if code, body := do("GET", "/v1/vms/"+targetVM, user, nil, &v); code != 200 || v.QEMUPID != 77 {
		t.Errorf("vm-1 with node-2 unreachable: %d %s", code, body)
	}
	if code, body := do("POST", "/v1/vms/"+targetVM+"/start", user, nil, nil); code != http.StatusServiceUnavailable || !strings.Contains(body, "node_unavailable") {
		t.Errorf("start with node-2 unreachable: %d %s", code, body)
	}

	// node-2 lost: its VM's view is its last heartbeat's; changes wait.
	putNode(api.NodeLost, info, protocol.VMStatus{Name: targetVM, UUID: targetVMUUID, Status: api.StatusRunning, QEMUPID: 78, Node: "node-2"})
	if code, body := do("GET", "/v1/vms/"+targetVM, user, nil, &v); code != 200 || v.NodeState != api.NodeLost || v.QEMUPID != 78 ||
		v.InstanceStatus != "UNKNOWN" || v.Placement == nil {
		t.Errorf("vm-1 of a lost node: %d %s", code, body)
	}
	for _, p := range []string{"/v1/vms/" + targetVM + "/stop", "/v1/vms/" + targetVM + "/pause"} {
		if code, body := do("POST", p, user, nil, nil); code != http.StatusServiceUnavailable || !strings.Contains(body, "node_unavailable") {
			t.Errorf("POST %s on a lost node: %d %s", p, code, body)
		}
	}
	if code, body := do("GET", "/v1/vms/"+targetVM+"/console", user, nil, nil); code != http.StatusServiceUnavailable {
		t.Errorf("console on a lost node: %d %s", code, body)
	}
}
