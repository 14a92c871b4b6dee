package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/crashpoint"
)

// killStep is one row of the closing table: a step the agent was killed
// at and what its restart did with the task.
type killStep struct {
	step, task, outcome string
}

var (
	killMu    sync.Mutex
	killSteps []killStep
)

func recordKill(step, task, outcome string) {
	killMu.Lock()
	killSteps = append(killSteps, killStep{step, task, outcome})
	killMu.Unlock()
}

// crashAt restarts the agent armed to die (SIGKILL) at step, runs op (a
// CLI command that queues a task and returns its id), waits for the agent
// to die there, restarts it unarmed and waits for the task's outcome.
func (a *standaloneAgent) crashAt(step string, op func() string) api.Task {
	a.t.Helper()
	a.kill() // a plain restart: VMs run on
	a.env = []string{crashpoint.Env + "=" + step}
	a.start()
	id := op()
	done := make(chan error, 1)
	go func() { done <- a.cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "killed") {
			a.t.Fatalf("%s: the agent ended with %v, want killed at the step", step, err)
		}
	case <-time.After(3 * time.Minute):
		a.t.Fatalf("%s: the agent never reached the step\n%s", step, tail(a.logText(), 3000))
	}
	a.cmd = nil
	a.env = nil
	a.start()
	if vmName, ok := strings.CutPrefix(id, "newest-of:"); ok {
		var l struct {
			Tasks []api.Task `json:"tasks"`
		}
		if err := a.apiGet("/v1/tasks?vm="+vmName+"&limit=1", &l); err != nil || len(l.Tasks) == 0 {
			a.t.Fatalf("%s: the task: %v %+v", step, err, l.Tasks)
		}
		id = l.Tasks[0].ID
	}
	return a.waitTask(id, 3*time.Minute)
}

// waitTask polls a task until it is terminal.
func (a *standaloneAgent) waitTask(id string, timeout time.Duration) api.Task {
	a.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var t api.Task
		if err := a.apiGet("/v1/tasks/"+id, &t); err == nil && (t.Status == api.TaskSuccess || t.Status == api.TaskFailed || t.Status == api.TaskCancelled) {
			return t
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("task %s not finished after %v\n%s", id, timeout, tail(a.logText(), 3000))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

var taskIDRE = regexp.MustCompile(`task=([0-9a-f-]{36})`)

// queue runs a CLI command that queues a task (no --wait) and returns the
// task's id from its output.
func (a *standaloneAgent) queue(args ...string) string {
	a.t.Helper()
	r := a.ok(args...)
	m := taskIDRE.FindStringSubmatch(r.stdout + r.stderr)
	if m == nil {
		a.t.Fatalf("otherix %s printed no task id: %q", strings.Join(args, " "), r.stdout)
	}
	return m[1]
}

// qemus counts the live QEMU processes of the VMs with the given uuids
// (by the -uuid of their command lines).
func qemus(uuids map[string]bool) map[string]int {
	out := map[string]int{}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		stat, _ := os.ReadFile("/proc/" + p.Name() + "/stat")
		if i := strings.LastIndexByte(string(stat), ')'); i < 0 || i+2 >= len(stat) || stat[i+2] == 'Z' {
			continue
		}
		b, _ := os.ReadFile("/proc/" + p.Name() + "/cmdline")
		args := strings.Split(string(b), "\x00")
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "-uuid" && uuids[args[i+1]] {
				out[args[i+1]]++
			}
		}
	}
	return out
}

// checkHost checks the host's resources against the VMs the API shows:
// one pool folder per VM and no other, image pins only by VMs that exist
// (each VM pinning its image), one QEMU per running VM and none for the
// others.
func (a *standaloneAgent) checkHost(step string, gone ...string) {
	a.t.Helper()
	var list struct {
		VMs []api.VM `json:"vms"`
	}
	if err := a.apiGet("/v1/vms", &list); err != nil {
		a.t.Fatal(err)
	}
	ids := map[string]api.VM{}
	for _, v := range list.VMs {
		ids[v.UUID] = v
	}
	ents, _ := os.ReadDir(filepath.Join(a.dir, "pools", "default", "vms"))
	var dirs []string
	for _, e := range ents {
		dirs = append(dirs, e.Name())
		if _, ok := ids[e.Name()]; !ok {
			a.t.Errorf("%s: pool folder vms/%s outlives its VM", step, e.Name())
		}
	}
	var imgs api.ImageList
	if err := a.apiGet("/v1/images", &imgs); err != nil {
		a.t.Fatal(err)
	}
	pinned := map[string]bool{}
	for _, img := range imgs.Images {
		for _, owner := range img.PinnedBy {
			id, _, _ := strings.Cut(owner, ":")
			pinned[id] = true
			if _, ok := ids[id]; !ok {
				a.t.Errorf("%s: image %s pinned by %s, a VM that is gone", step, img.Digest[:12], owner)
			}
		}
	}
	all := map[string]bool{}
	for id := range ids {
		all[id] = true
	}
	for _, id := range gone {
		all[id] = true
	}
	q := qemus(all)
	for id, v := range ids {
		if !slices.Contains(dirs, id) || !pinned[id] {
			a.t.Errorf("%s: VM %s has pool folder %v, image pin %v", step, v.Name, slices.Contains(dirs, id), pinned[id])
		}
		want := 0
		if v.Status == api.StatusRunning || v.Status == api.StatusPaused {
			want = 1
		}
		if q[id] != want {
			a.t.Errorf("%s: VM %s (%s) has %d QEMU processes, want %d", step, v.Name, v.Status, q[id], want)
		}
	}
	for id, n := range q {
		if _, ok := ids[id]; !ok {
			a.t.Errorf("%s: %d QEMU processes of a VM that is gone (%s)", step, n, id)
		}
	}
}

// The create steps, each on an agent of its own (two at a time: the
// machine has two cores); a create needs no booted guest.
var createSteps = []string{"image", "disk", "firmware", "devices", "console", "seed", "define", "start", "done"}

// TestAgentKilledAtEveryStep kills the agent (SIGKILL) at every step of a
// create, a stop, a reboot, a disk attach and a delete, restarts it, and
// checks that the task completed exactly once (or was rolled back and run
// again to completion), that the VM is in the state the task leaves, and
// that no pool folder, image pin or QEMU outlives the VM it belonged to.
// It prints the table of steps and what the restart did.
func TestAgentKilledAtEveryStep(t *testing.T) {
	begin := time.Now()
	t.Cleanup(func() {
		killMu.Lock()
		defer killMu.Unlock()
		sort.Slice(killSteps, func(i, j int) bool { return killSteps[i].step < killSteps[j].step })
		var b strings.Builder
		fmt.Fprintf(&b, "\n| killed at | task | after the restart |\n| --- | --- | --- |\n")
		for _, s := range killSteps {
			fmt.Fprintf(&b, "| %s | %s | %s |\n", s.step, s.task, s.outcome)
		}
		t.Logf("%s\nwall time %v", b.String(), time.Since(begin).Round(time.Second))
	})
	t.Run("create", func(t *testing.T) {
		t.Parallel() // beside the lifecycle steps: two agents at a time
		for _, step := range createSteps {
			t.Run(step, func(t *testing.T) {
				t.Parallel()
				a := startAgent(t, "")
				task := a.crashAt("create."+step, func() string {
					return a.queue("vm", "create", "k", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--no-cloud-init")
				})
				if task.Status != api.TaskSuccess {
					t.Fatalf("create after a kill at %s: %s %+v", step, task.Status, task.Error)
				}
				v := a.getVM("k")
				if v.Status != api.StatusRunning {
					t.Errorf("after a kill at %s: status %s", step, v.Status)
				}
				outcome := "rolled back, run again: completed"
				if step == "done" {
					outcome = "completed (found done)"
				}
				if n := strings.Count(strings.Join(a.eventTypes("k"), " "), api.EventCreated); n != 1 {
					t.Errorf("after a kill at %s: %d created events", step, n)
				}
				a.checkHost("create." + step)
				recordKill("create."+step, "vm.create", outcome)
			})
		}
	})
	t.Run("lifecycle", func(t *testing.T) {
		t.Parallel()
		a := startAgent(t, "")
		a.ok("vm", "create", "life", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--wait")
		con := a.console("life")
		ctx := context.Background()
		ready := func() {
			t.Helper()
			c, cancel := context.WithTimeout(ctx, 3*time.Minute)
			defer cancel()
			if _, err := con.WaitFor(c, "OTHERIX-GUEST ready"); err != nil {
				t.Fatal(err)
			}
		}
		ready()
		for _, step := range []string{"stop.pressed", "vm.stop.done"} {
			task := a.crashAt(step, func() string { return a.queue("vm", "stop", "life") })
			v := a.getVM("life")
			if task.Status != api.TaskSuccess || v.Status != api.StatusStopped {
				t.Errorf("stop killed at %s: task %s %+v, vm %s", step, task.Status, task.Error, v.Status)
			}
			a.checkHost(step)
			recordKill(step, "vm.stop", "completed (stopped: converged)")
			a.ok("vm", "start", "life", "--wait")
			ready()
		}
		for _, step := range []string{"reboot.stopped", "vm.reboot.done"} {
			before := a.getVM("life")
			task := a.crashAt(step, func() string { return a.queue("vm", "reboot", "life") })
			v := a.getVM("life")
			if task.Status != api.TaskSuccess || v.Status != api.StatusRunning || v.QEMUPID == before.QEMUPID {
				t.Errorf("reboot killed at %s: task %s %+v, vm %s pid %d -> %d", step, task.Status, task.Error, v.Status, before.QEMUPID, v.QEMUPID)
			}
			outcome := "completed (stopped half: started)"
			if step == "vm.reboot.done" {
				outcome = "completed (new QEMU found: done)"
			}
			a.checkHost(step)
			recordKill(step, "vm.reboot", outcome)
			ready()
		}
		for i, step := range []string{"attach.plugged", "vm.disk.attach.done"} {
			vol := fmt.Sprintf("data%d", i)
			a.ok("volume", "create", vol, "--size-gib", "1")
			task := a.crashAt(step, func() string {
				// A sync change: the CLI waits for its task and sees the
				// agent die; the task is the VM's newest one.
				a.cli("", "vm", "attach-disk", "life", vol)
				return "newest-of:life"
			})
			v := a.getVM("life")
			n := 0
			for _, d := range v.Devices {
				if d.DevType == api.DevDisk && d.Source == vol {
					n++
				}
			}
			if task.Status != api.TaskSuccess || n != 1 {
				t.Errorf("attach killed at %s: task %s %+v, %d devices for %s", step, task.Status, task.Error, n, vol)
			}
			outcome := "completed (in the VM, not in its devices: finished)"
			if step == "vm.disk.attach.done" {
				outcome = "completed (disk found: done)"
			}
			a.checkHost(step)
			recordKill(step, "vm.disk.attach", outcome)
		}
		for _, step := range []string{"delete.killed", "delete.unpinning"} {
			if step == "delete.unpinning" {
				a.ok("vm", "create", "life", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--no-cloud-init", "--wait")
			}
			id := a.getVM("life").UUID
			task := a.crashAt(step, func() string { return a.queue("vm", "delete", "life", "--force") })
			if task.Status != api.TaskSuccess {
				t.Errorf("delete killed at %s: task %s %+v", step, task.Status, task.Error)
			}
			if r := a.cli("", "vm", "get", "life"); r.code == 0 {
				t.Errorf("delete killed at %s: the VM is still there", step)
			}
			a.checkHost(step, id)
			recordKill(step, "vm.delete", "completed (finished at restart; the rest swept)")
		}
	})
}
