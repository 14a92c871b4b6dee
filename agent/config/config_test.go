package config

import (
	"strings"
	"testing"
	"time"
)

func TestParseDefaults(t *testing.T) {
	c, err := Parse([]byte(""), "empty.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.DefaultPool != "default" || c.Pools["default"].Path != "/var/lib/otherix/pools/default" || c.QEMU.StopTimeout != 60*time.Second {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestParseFile(t *testing.T) {
	c, err := Parse([]byte(`
data_dir: /srv/otherix
pools:
  fast: {path: /srv/fast}
  slow: {path: /srv/slow}
default_pool: fast
networks:
  lan: {type: bridge, bridge: br0}
qemu:
  stop_timeout: 90s
limits:
  concurrent_creates: 4
`), "agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Pools) != 2 || c.DefaultPool != "fast" || c.QEMU.StopTimeout != 90*time.Second || c.Limits.ConcurrentCreates != 4 || c.Networks["lan"].Bridge != "br0" {
		t.Fatalf("parsed: %+v", c)
	}
}

func TestParseCluster(t *testing.T) {
	c, err := Parse([]byte(`
cluster:
  etcd:
    endpoints: [https://etcd1.example:2379, https://etcd2.example:2379, http://127.0.0.1:2379]
    ca_file: /etc/otherix/etcd-ca.pem
    cert_file: /etc/otherix/etcd-client.pem
    key_file: /etc/otherix/etcd-client.key
`), "agent.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !c.ClusterMode() || len(c.Cluster.Etcd.Endpoints) != 3 || c.Cluster.Etcd.Prefix != "/otherix/" || c.Cluster.Etcd.KeyFile != "/etc/otherix/etcd-client.key" ||
		c.Cluster.HeartbeatInterval != 10*time.Second {
		t.Fatalf("parsed: %+v", c.Cluster)
	}
	if d, _ := Parse(nil, "empty.yaml"); d.ClusterMode() {
		t.Error("cluster mode by default")
	}
}

func TestParseErrorsNameKeyAndLine(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"node_name: a\nbogus: 1\n", "line 2: unknown key bogus"},
		{"qemu:\n  stop_timeout: soon\n", "line 2"},
		{"qemu:\n  accel: hvf\n", "line 2: qemu.accel: \"hvf\""},
		{"node_name: a\nnetworks:\n  lan: {type: bridge}\n", "line 3: networks.lan.bridge: required"},
		{"devices:\n  allowed_paths:\n    - /srv\n    - rel\n", "line 4: devices.allowed_paths[1]"},
		{"qemu:\n  uid_range: 1000-2000\n", "qemu.uid_range: \"1000-2000\": starts at or under 65535"},
		{"qemu:\n  uid_range: 3000000000-3000000010\n", "ends at or over 2^31"},
		{"qemu:\n  uid_range: 2000000010-2000000000\n", "LAST is below FIRST"},
		{"qemu:\n  uid_range: lots\n", "use FIRST-LAST"},
		{"standalone: true\ncontrol_plane:\n  url: https://cp.example\n  token_file: /etc/otherix/token\n", "standalone: a standalone agent is its own control plane"},
		{"pools:\n  a: {path: rel}\n", "pools.a.path"},
		{"default_pool: nope\n", "default_pool"},
		{"networks:\n  n: {type: vxlan}\n", "networks.n.type"},
		{"limits:\n  concurrent_creates: 0\n", "limits.concurrent_creates"},
		{"log:\n  level: loud\n", "log.level"},
		{"control_plane:\n  url: https://cp\n", "control_plane.token_file"},
		{"cluster:\n  etcd:\n    endpoints: [http://10.0.0.1:2379]\n", "cluster.etcd.endpoints[0]: \"http://10.0.0.1:2379\": plain http only on loopback"},
		{"cluster:\n  etcd:\n    endpoints: [etcd1:2379]\n", "cluster.etcd.endpoints[0]"},
		{"cluster:\n  etcd:\n    endpoints: [https://e1:2379]\n    cert_file: /etc/otherix/etcd.pem\n", "cert_file and key_file go together"},
		{"cluster:\n  etcd:\n    ca_file: /etc/otherix/ca.pem\n", "cluster.etcd.endpoints: required"},
		{"cluster:\n  etcd:\n    endpoints: [https://e1:2379]\n    prefix: otherix\n", "cluster.etcd.prefix"},
		{"cluster:\n  heartbeat_interval: 500ms\n", "cluster.heartbeat_interval: 500ms must be whole seconds, 5s..10m"},
		{"cluster:\n  heartbeat_interval: 5.5s\n", "cluster.heartbeat_interval"},
		{"cluster:\n  heartbeat_interval: 3s\n", "cluster.heartbeat_interval: 3s must be whole seconds, 5s..10m"},
		{"standalone: true\ncluster:\n  etcd:\n    endpoints: [https://e1:2379]\n", "standalone: cluster mode serves the API"},
	} {
		_, err := Parse([]byte(tc.in), "agent.yaml")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want it to mention %q", tc.in, err, tc.want)
		}
	}
}
