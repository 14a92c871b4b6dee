package runner

import (
	"slices"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

func names(vms []api.VM) []string {
	var out []string
	for _, vm := range vms {
		out = append(out, vm.UUID)
	}
	return out
}

func TestDiffVMs(t *testing.T) {
	desired := map[string]string{
		"stopped": api.PhaseRunning, "crashed": api.PhaseRunning, "running": api.PhaseRunning,
		"paused": api.PhaseRunning, "busy": api.PhaseRunning, "drift": api.PhaseStopped,
		"off": api.PhaseStopped, "gone": api.PhaseRunning,
	}
	vms := []api.VM{
		{UUID: "stopped", Status: api.StatusStopped},
		{UUID: "crashed", Status: api.StatusCrashed},
		{UUID: "running", Status: api.StatusRunning},
		{UUID: "paused", Status: api.StatusPaused},
		{UUID: "busy", Status: api.StatusStopped},
		{UUID: "drift", Status: api.StatusRunning},
		{UUID: "off", Status: api.StatusStopped},
		{UUID: "orphan", Status: api.StatusRunning},
	}
	d := diffVMs(desired, vms, func(vm api.VM) bool { return vm.UUID == "busy" })
	for _, tc := range []struct {
		name      string
		got, want []string
	}{
		{"start", names(d.start), []string{"stopped", "crashed"}},
		{"orphans", names(d.orphans), []string{"orphan"}},
		{"drift", names(d.drift), []string{"drift"}},
		{"busy", names(d.busy), []string{"busy"}},
		{"in sync", names(d.inSync), []string{"running", "paused", "off"}},
		{"missing", d.missing, []string{"gone"}},
	} {
		if !slices.Equal(tc.got, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, tc.got, tc.want)
		}
	}
	none := func(string) bool { return false }
	if got := orphanUUIDs(desired, vms, none); !slices.Equal(got, []string{"orphan"}) {
		t.Errorf("orphans %v", got)
	}
	if got := orphanUUIDs(desired, vms, func(uuid string) bool { return uuid == "orphan" }); got != nil {
		t.Errorf("a VM known by its task reported as an orphan: %v", got)
	}
	if got := orphanUUIDs(nil, vms, none); got != nil {
		t.Errorf("no desired map, yet orphans %v", got)
	}
}

// A VM that crashes right after every start is started at doubling
// intervals up to the maximum; staying up for RestartStable resets it.
func TestRestartBackoff(t *testing.T) {
	rc := &reconciler{base: 10 * time.Second, max: 160 * time.Second, stable: 5 * time.Minute, state: map[string]*restartState{}}
	desired := map[string]string{"f": api.PhaseRunning}
	crashed := diff{start: []api.VM{{UUID: "f", Status: api.StatusCrashed}}}
	t0 := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	var starts []time.Duration
	for s := time.Duration(0); s <= 20*time.Minute; s += time.Second {
		if got, _ := rc.plan(t0.Add(s), desired, crashed); len(got) == 1 {
			starts = append(starts, s)
		}
	}
	var gaps []time.Duration
	for i := 1; i < len(starts); i++ {
		gaps = append(gaps, starts[i]-starts[i-1])
	}
	want := []time.Duration{10, 20, 40, 80, 160, 160, 160, 160}
	for i := range want {
		want[i] *= time.Second
	}
	if !slices.Equal(gaps[:len(want)], want) {
		t.Errorf("gaps between starts %v, want %v...", gaps, want)
	}

	// It then runs long enough: the backoff resets, a crash restarts at once.
	now := t0.Add(time.Hour)
	up := diff{inSync: []api.VM{{UUID: "f", Status: api.StatusRunning}}}
	rc.plan(now, desired, up)
	if got, _ := rc.plan(now.Add(time.Second), desired, crashed); len(got) != 1 {
		t.Error("no immediate start after a stable run")
	}
	// No longer desired running: forgotten.
	rc.plan(now.Add(2*time.Second), map[string]string{"f": api.PhaseStopped}, diff{})
	if len(rc.state) != 0 {
		t.Errorf("state kept for a VM desired stopped: %v", rc.state)
	}
}

// The restart policy and the agent's own desired phase decide which VMs
// the control plane wants running are started.
func TestDiffVMsRestartPolicy(t *testing.T) {
	for _, tc := range []struct {
		name  string
		vm    api.VM
		start bool
	}{
		{"crashed, on-failure", api.VM{Status: api.StatusCrashed, RestartPolicy: api.RestartOnFailure}, true},
		{"crashed, always", api.VM{Status: api.StatusCrashed, RestartPolicy: api.RestartAlways}, true},
		{"crashed, no policy recorded (on-failure)", api.VM{Status: api.StatusCrashed}, true},
		{"crashed, never", api.VM{Status: api.StatusCrashed, RestartPolicy: api.RestartNever}, false},
		{"crashed, crash loop", api.VM{Status: api.StatusCrashed, RestartPolicy: api.RestartOnFailure, CrashLoop: true}, false},
		{"guest shut down, on-failure (agent's desired phase stopped)", api.VM{Status: api.StatusStopped, RestartPolicy: api.RestartOnFailure, DesiredPhase: api.PhaseStopped}, false},
		{"guest shut down, always (desired phase still running)", api.VM{Status: api.StatusStopped, RestartPolicy: api.RestartAlways, DesiredPhase: api.PhaseRunning}, true},
		{"host booted without autostart", api.VM{Status: api.StatusStopped, RestartPolicy: api.RestartAlways, DesiredPhase: api.PhaseStopped}, false},
		{"stopped, never", api.VM{Status: api.StatusStopped, RestartPolicy: api.RestartNever, DesiredPhase: api.PhaseRunning}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.vm.UUID = "u"
			d := diffVMs(map[string]string{"u": api.PhaseRunning}, []api.VM{tc.vm}, func(api.VM) bool { return false })
			if got := len(d.start) == 1; got != tc.start {
				t.Errorf("started = %v, want %v (held: %q)", got, tc.start, policyHolds(tc.vm))
			}
			if !tc.start && len(d.held) != 1 {
				t.Errorf("held = %v, want the vm", names(d.held))
			}
		})
	}
}
