package cpserver_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// TestVMNames: a create reserves its VM's name (a second create of the
// name is ErrNameTaken, nothing stored), VMByName finds the VM from the
// index, a failed create and a deleted VM release the name, and a VM
// adopted from a heartbeat takes a free name but never another's.
func TestVMNames(t *testing.T) {
	for name, mk := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			srv := &cpserver.Server{Store: mk(), DesiredFollowsTasks: true, AdoptUnknownVMs: true, NodeScoped: true}
			create := func(uuid, node string) (cpserver.Task, error) {
				return srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskCreate, VMName: "web", VMUUID: uuid}, Node: node})
			}
			byName := func(want string) {
				t.Helper()
				v, ok, err := srv.VMByName(ctx, "web")
				if err != nil || ok != (want != "") || v.UUID != want {
					t.Fatalf("VMByName(web) = %+v %v %v, want uuid %q", v, ok, err, want)
				}
			}
			byName("")
			t1, err := create("u1", "n1")
			if err != nil {
				t.Fatal(err)
			}
			byName("u1")
			if v, _, _ := srv.VMByName(ctx, "web"); v.Node != "n1" || v.Phase != api.PhaseRunning {
				t.Errorf("VMByName(web) = %+v, want on n1, running", v)
			}
			if _, err := create("u2", "n2"); !errors.Is(err, cpserver.ErrNameTaken) {
				t.Fatalf("second create: %v, want ErrNameTaken", err)
			}
			if _, ok := srv.VM(ctx, "u2"); ok {
				t.Error("the refused create's VM is in the desired map")
			}
			if open, _ := srv.Unfinished(ctx); len(open) != 1 {
				t.Errorf("%d unfinished tasks, want the first create alone", len(open))
			}
			// A stop keeps the name with its VM.
			if _, err := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStop, VMName: "web", VMUUID: "u1"}}); err != nil {
				t.Fatal(err)
			}
			byName("u1")
			// A heartbeat reporting another VM of that name: adopted,
			// without the name.
			if _, err := srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n3", VMs: []protocol.VMStatus{{Name: "web", UUID: "u3", Status: api.StatusRunning}}}); err != nil {
				t.Fatal(err)
			}
			byName("u1")
			// The create fails: the name is free again.
			lease, err := srv.Lease(ctx, protocol.LeaseRequest{Node: "n1", Max: 1})
			if err != nil || len(lease.Tasks) != 1 || lease.Tasks[0].ID != t1.ID {
				t.Fatalf("lease: %+v %v", lease, err)
			}
			if _, err := srv.Complete(ctx, t1.ID, protocol.CompleteRequest{LeaseID: lease.Tasks[0].LeaseID, Status: api.TaskFailed}); err != nil {
				t.Fatal(err)
			}
			byName("")
			if _, err := create("u4", "n2"); err != nil {
				t.Fatalf("create after the failed one: %v", err)
			}
			byName("u4")
			if err := srv.SetDesired(ctx, cpserver.VM{UUID: "u4"}); err != nil {
				t.Fatal(err)
			}
			byName("")
		})
	}
}

// TestConcurrentCreatesOneName: creates of one name sent at once to
// several replicas of one store: exactly one is stored.
func TestConcurrentCreatesOneName(t *testing.T) {
	for name, mk := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			store := mk()
			if name == "etcd" {
				// Replicas: stores of their own on the same prefix.
				store = etcdStore(t, "/test/"+t.Name()+"/")
			}
			const n = 8
			var wg sync.WaitGroup
			errs := make([]error, n)
			for i := range n {
				s := store
				if name == "etcd" {
					s = etcdStore(t, "/test/"+t.Name()+"/")
				}
				srv := &cpserver.Server{Store: s, DesiredFollowsTasks: true, NodeScoped: true}
				wg.Go(func() {
					_, errs[i] = srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskCreate, VMName: "db", VMUUID: fmt.Sprint("u", i)}, Node: fmt.Sprint("n", i%3)})
				})
			}
			wg.Wait()
			won := 0
			for _, err := range errs {
				switch {
				case err == nil:
					won++
				case !errors.Is(err, cpserver.ErrNameTaken):
					t.Errorf("create: %v, want ErrNameTaken", err)
				}
			}
			if won != 1 {
				t.Errorf("%d creates of one name stored, want 1", won)
			}
			vms, _, _ := store.VMs(ctx)
			open, _ := store.Unfinished(ctx)
			if len(vms) != 1 || len(open) != 1 || open[0].VMUUID != vms[0].UUID {
				t.Errorf("desired map %+v, unfinished %+v: want the winner's VM and task alone", vms, open)
			}
		})
	}
}
