package agent

import (
	"context"
	"encoding/json"
	"os"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/protocol"
)

// TestNodeInfoSteady: the node_info the agent reports changes only on a
// real change: pools' free_bytes in whole FreeBytesGranularity units,
// networks in name order (the config holds them in a map), so two
// reports in a row are the same JSON.
func TestNodeInfoSteady(t *testing.T) {
	data, err := os.MkdirTemp("", "oxn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(data) })
	run, err := os.MkdirTemp("/tmp", "oxn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	cfg := config.Default(data)
	cfg.NodeName = "node-1"
	cfg.RunDir = run
	cfg.QEMU.User = "nobody"
	cfg.Limits.MinFreeBytes = 1 << 20
	for _, name := range []string{"lan", "dmz", "storage", "backup", "mgmt"} {
		cfg.Networks[name] = config.Network{Type: "bridge", Bridge: "br-" + name}
	}
	h, err := NewHost(context.Background(), cfg, Options{Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ctx := context.Background()
	n := h.Node(ctx)
	if len(n.Pools) == 0 {
		t.Fatal("no pool reported")
	}
	for _, p := range n.Pools {
		if p.FreeBytes <= 0 || p.FreeBytes%protocol.FreeBytesGranularity != 0 || p.FreeBytes > p.TotalBytes {
			t.Errorf("pool %s: free_bytes %d of %d, want a positive multiple of %d", p.Name, p.FreeBytes, p.TotalBytes, protocol.FreeBytesGranularity)
		}
	}
	if !slices.IsSortedFunc(n.Networks, func(a, b protocol.NetworkInfo) int { return strings.Compare(a.Name, b.Name) }) || len(n.Networks) != 5 {
		t.Errorf("networks %+v, want 5 in name order", n.Networks)
	}
	first, _ := json.Marshal(n)
	for range 20 {
		if b, _ := json.Marshal(h.Node(ctx)); string(b) != string(first) {
			t.Fatalf("node_info changed with nothing changed:\n%s\n%s", first, b)
		}
	}
}
