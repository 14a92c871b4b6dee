package cptest_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
)

// A control plane in a test: queue a task, let the agent side lease and
// complete it, look at what arrived.
func ExampleServer() {
	var cp cptest.Server
	cp.Token = "s3cret"
	ts := httptest.NewServer(&cp)
	defer ts.Close()

	dir, _ := os.MkdirTemp("", "cptest-example")
	defer os.RemoveAll(dir)
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("s3cret"), 0o600)
	c, err := protocol.NewClient(protocol.ClientConfig{BaseURL: ts.URL, Node: "hv-07", TokenFile: token})
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx := context.Background()

	cp.Enqueue(protocol.Task{ID: "t1", Type: api.TaskStart, VMName: "web-1", VMUUID: "u1"})
	lease, _ := c.Lease(ctx, 0, 8)
	t := lease.Tasks[0]
	fmt.Println(t.ID, t.Type, t.VMName, "attempt", t.Attempt, t.LeaseID)

	c.Complete(ctx, t.ID, protocol.CompleteRequest{LeaseID: t.LeaseID, Attempt: t.Attempt, Status: api.TaskSuccess,
		VM: &api.VM{Name: "web-1", UUID: "u1", Status: api.StatusRunning}})
	done, _ := cp.WaitCompletion(ctx, "t1")
	fmt.Println(done.Node, done.Status, done.VM.Status)
	// Output:
	// t1 vm.start web-1 attempt 1 lease-1
	// hv-07 success running
}
