package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/testguest"
)

// apiGet reads one JSON answer of the agent's API.
func (a *standaloneAgent) apiGet(path string, out any) error {
	req, _ := http.NewRequest(http.MethodGet, a.url+path, nil)
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// waitVM polls the API's view of a VM (every 20 ms: the API is the
// contract under test, it has no push) until ok holds, and returns it.
func (a *standaloneAgent) waitVM(name, what string, timeout time.Duration, ok func(api.VM) bool) api.VM {
	a.t.Helper()
	deadline := time.Now().Add(timeout)
	var v api.VM
	for {
		v = api.VM{}
		err := a.apiGet("/v1/vms/"+name, &v)
		if err == nil && ok(v) {
			return v
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("vm %s: waiting %v for %s; last view %+v (err %v)\nagent log tail: %s", name, timeout, what, v, err, tail(a.logText(), 3000))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// events returns a VM's event types, oldest first, through the CLI.
func (a *standaloneAgent) eventTypes(name string) []string {
	a.t.Helper()
	var l api.VMEventList
	if err := json.Unmarshal([]byte(a.ok("vm", "events", name, "-o", "json").stdout), &l); err != nil {
		a.t.Fatal(err)
	}
	var out []string
	for _, e := range l.Events {
		out = append(out, e.Type)
	}
	return out
}

func count(list []string, s string) int {
	n := 0
	for _, x := range list {
		if x == s {
			n++
		}
	}
	return n
}

// waitEvent polls a VM's history (GET /v1/vms/NAME/events) until it holds
// an event of type typ, and returns that event.
func (a *standaloneAgent) waitEvent(name, typ string, timeout time.Duration) api.VMEvent {
	a.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var l api.VMEventList
		err := a.apiGet("/v1/vms/"+name+"/events", &l)
		for _, e := range l.Events {
			if e.Type == typ {
				return e
			}
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("vm %s: no %s event in %v; events %+v (err %v)", name, typ, timeout, l.Events, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// A guest that powers itself off stays off: its desired phase turns
// stopped and neither the restart policy nor reconcile starts it again.
// A guest that reboots itself stays running in the same QEMU process, its
// desired phase running; the reboot is a guest_reboot event, in the API,
// acknowledged by the control plane in a heartbeat, and counted.
// A VM whose QEMU is killed crashes, is restarted by its policy (on-failure),
// and after restart.crash_loop_count crashes stays crashed with a crash-loop
// reason until it is started by request; with restart_policy never it
// stays crashed at once. Events and the API tell each step.
func TestGuestShutdownCrashesAndRestartPolicy(t *testing.T) {
	t.Parallel()
	a := startAgent(t, "restart:\n  backoff_base: 500ms\n  backoff_max: 1s\n  crash_loop_count: 3\n")
	ud := filepath.Join(t.TempDir(), "user-data.yaml")
	os.WriteFile(ud, []byte("#cloud-config\n#otherix-run: poweroff -f\n"), 0o600)
	a.ok("vm", "create", "self-off", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--user-data", ud, "--wait")
	a.ok("vm", "create", "crashy", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--wait")
	udReboot := filepath.Join(t.TempDir(), "reboot.yaml")
	os.WriteFile(udReboot, []byte("#cloud-config\n#otherix-run: "+testguest.RebootOnce+"\n"), 0o600)
	a.ok("vm", "create", "self-reboot", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--user-data", udReboot, "--wait")
	rb := a.getVM("self-reboot")
	rebootPID := rb.QEMUPID
	con := testguest.OpenConsole(filepath.Join(a.dir, "vms", rb.UUID, "console.log"))
	t.Cleanup(func() { con.Close() })

	// crashy: kill -9 of QEMU is a crash, restarted by on-failure.
	v := a.getVM("crashy")
	if v.RestartPolicy != api.RestartOnFailure {
		t.Errorf("default restart_policy = %q, want on-failure", v.RestartPolicy)
	}
	for i := 1; i <= 3; i++ {
		pid := v.QEMUPID
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if i == 3 {
			break
		}
		// The restart may come before a poll sees the crash (the first one
		// is immediate): the events tell the crash, checked below.
		v = a.waitVM("crashy", fmt.Sprintf("restart %d by its policy", i), 60*time.Second, func(v api.VM) bool {
			return v.Status == api.StatusRunning && v.QEMUPID != 0 && v.QEMUPID != pid && v.RestartCount == i
		})
	}
	// The third crash within the window is a crash loop: no restart.
	c := a.waitVM("crashy", "crash loop", 10*time.Second, func(v api.VM) bool { return v.CrashLoop })
	if c.Status != api.StatusCrashed || !strings.Contains(c.StatusReason, "crash loop") {
		t.Errorf("crash loop view: status %s reason %q", c.Status, c.StatusReason)
	}

	// self-off powered itself off right after booting.
	off := a.waitVM("self-off", "guest shutdown", 90*time.Second, func(v api.VM) bool {
		return v.Status == api.StatusStopped && v.DesiredPhase == api.PhaseStopped
	})
	if off.StatusReason != "guest powered off" {
		t.Errorf("after the guest's poweroff: desired_phase %q, status_reason %q\nevents %v\n%s", off.DesiredPhase, off.StatusReason, a.eventTypes("self-off"), grepLines(a.logText(), "self-off"))
	}

	// self-reboot rebooted itself once, in the same QEMU process, and is
	// up again. Then a reset by request: its echo is no guest reboot.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := con.WaitFor(ctx, "OTHERIX-GUEST rebooting itself"); err != nil {
		t.Fatal(err)
	}
	if _, err := con.WaitFor(ctx, "OTHERIX-GUEST run-exit 1 0"); err != nil {
		t.Fatal(err)
	}
	reboot := a.waitEvent("self-reboot", api.EventGuestReboot, 10*time.Second)
	a.ok("vm", "reset", "self-reboot")
	if _, err := con.WaitFor(ctx, "OTHERIX-GUEST run-exit 1 0"); err != nil {
		t.Fatal(err)
	}

	// Three heartbeats (5 s each) later neither VM was started again.
	time.Sleep(16 * time.Second)
	if v := a.getVM("self-off"); v.Status != api.StatusStopped || v.QEMUPID != 0 {
		t.Errorf("self-off after 16 s: status %s pid %d, want it still stopped", v.Status, v.QEMUPID)
	}
	if v := a.getVM("crashy"); v.Status != api.StatusCrashed || !v.CrashLoop {
		t.Errorf("crashy after 16 s: status %s crash_loop %v, want it still crashed", v.Status, v.CrashLoop)
	}
	ev := a.eventTypes("self-off")
	if count(ev, api.EventGuestShutdown) != 1 || count(ev, api.EventRestarted) != 0 || count(ev, api.EventCreated) != 1 {
		t.Errorf("self-off events %v: want created, one guest_shutdown, no restarted", ev)
	}
	ev = a.eventTypes("crashy")
	if count(ev, api.EventCrashed) != 3 || count(ev, api.EventRestarted) != 2 || count(ev, api.EventCrashLoop) != 1 {
		t.Errorf("crashy events %v: want 3 crashed, 2 restarted, 1 crash_loop", ev)
	}
	rb = a.getVM("self-reboot")
	if rb.Status != api.StatusRunning || rb.QEMUPID != rebootPID || rb.DesiredPhase != api.PhaseRunning || rb.RestartCount != 0 {
		t.Errorf("self-reboot after its reboot and 16 s: status %s pid %d (was %d) desired_phase %s restart_count %d, want running in the same QEMU",
			rb.Status, rb.QEMUPID, rebootPID, rb.DesiredPhase, rb.RestartCount)
	}
	if ev := a.eventTypes("self-reboot"); strings.Join(ev, " ") != "created guest_reboot reset" {
		t.Errorf("self-reboot events %v: want created, one guest_reboot, reset; nothing started\nagent log:\n%s", ev, grepLines(a.logText(), "self-reboot"))
	}
	// The heartbeats carried the event: the control plane acknowledged it.
	var acked struct {
		Acked int64 `json:"acked"`
	}
	if b, err := os.ReadFile(filepath.Join(a.dir, "events", "state.json")); err != nil || json.Unmarshal(b, &acked) != nil || acked.Acked < reboot.Seq {
		t.Errorf("events acknowledged up to %d (%v), want at least the guest_reboot's seq %d", acked.Acked, err, reboot.Seq)
	}

	var l api.VMEventList
	a.apiGet("/v1/vms/crashy/events", &l)
	for _, e := range l.Events {
		if e.Type == api.EventCrashed && !strings.Contains(e.Message, "SIGKILL") {
			t.Errorf("crashed event says %q, not SIGKILL", e.Message)
		}
	}

	// A start by request ends the crash loop; with restart_policy never a
	// crash is left as it is.
	a.ok("vm", "start", "crashy", "--wait")
	v = a.getVM("crashy")
	if v.Status != api.StatusRunning || v.CrashLoop || v.RestartCount != 0 {
		t.Errorf("after a start by request: status %s crash_loop %v restart_count %d", v.Status, v.CrashLoop, v.RestartCount)
	}
	r := a.ok("vm", "set", "crashy", "--restart-policy", "never")
	if !strings.Contains(r.stdout, "restart_policy=never") {
		t.Errorf("vm set: %q", r.stdout)
	}
	syscall.Kill(v.QEMUPID, syscall.SIGKILL)
	a.waitVM("crashy", "crashed", 10*time.Second, func(v api.VM) bool { return v.Status == api.StatusCrashed })
	time.Sleep(11 * time.Second) // two heartbeats
	if v := a.getVM("crashy"); v.Status != api.StatusCrashed {
		t.Errorf("restart_policy never: status %s, want crashed", v.Status)
	}

	// The metrics count the events.
	m := scrape(t, a.url)
	for typ, want := range map[string]float64{"crashed": 4, "guest_shutdown": 1, "guest_reboot": 1} {
		if got := m[`otherix_agent_vm_events_total{type="`+typ+`"}`]; got != want {
			t.Errorf("vm_events_total{type=%q} = %v, want %v", typ, got, want)
		}
	}
}

func grepLines(text, substr string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
