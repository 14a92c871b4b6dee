package cpserver_test

import (
	"context"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// TestHeartbeatRecordsGuestShutdown: a VM the agent reports desired
// stopped (its guest powered itself off) becomes desired stopped, unless
// a task for it is unfinished (a vm.start queued after the fact wins).
func TestHeartbeatRecordsGuestShutdown(t *testing.T) {
	for name, mk := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			srv := &cpserver.Server{Store: mk(), Token: "tok"}
			for _, id := range []string{"off", "starting", "up"} {
				if err := srv.SetDesired(ctx, cpserver.VM{UUID: id, Name: id, Phase: api.PhaseRunning}); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStart, VMName: "starting", VMUUID: "starting"}}); err != nil {
				t.Fatal(err)
			}
			resp, err := srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n1", VMs: []protocol.VMStatus{
				{UUID: "off", Status: api.StatusStopped, StatusReason: "guest powered off", DesiredPhase: api.PhaseStopped},
				{UUID: "starting", Status: api.StatusStopped, DesiredPhase: api.PhaseStopped},
				{UUID: "up", Status: api.StatusRunning, DesiredPhase: api.PhaseRunning},
			}})
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]string{"off": api.PhaseStopped, "starting": api.PhaseRunning, "up": api.PhaseRunning}
			for id, phase := range want {
				if resp.Desired[id] != phase {
					t.Errorf("desired[%s] = %q, want %q", id, resp.Desired[id], phase)
				}
			}
		})
	}
}
