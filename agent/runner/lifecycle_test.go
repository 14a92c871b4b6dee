package runner_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
	"github.com/otherix/otherix-agent/agent/runner"
)

// Reconcile: a VM desired running but stopped is started; one that
// crashes at every boot is restarted with backoff, not at every
// heartbeat; a VM the control plane does not know is reported as an
// orphan and never touched; a VM desired stopped that runs is left alone.
func TestReconcile(t *testing.T) {
	clk := newFakeClock()
	h := newHarness(t, runner.Config{Clock: clk, RestartBase: 10 * time.Second, RestartMax: 160 * time.Second},
		vm("a", "ua", api.StatusStopped),
		vm("flappy", "uf", api.StatusCrashed),
		vm("orphan", "uo", api.StatusRunning),
		vm("drift", "us", api.StatusRunning),
	)
	h.cp.SetDesired("ua", api.PhaseRunning)
	h.cp.SetDesired("uf", api.PhaseRunning)
	h.cp.SetDesired("us", api.PhaseStopped)
	h.ex.hook = func(ctx context.Context, tk protocol.Task, _ func(api.Progress)) (*api.VM, error, bool) {
		if tk.VMUUID != "uf" || tk.Type != api.TaskStart {
			return nil, nil, false
		}
		vm, _ := h.inv.get("uf")
		vm.Status = api.StatusCrashed // QEMU died during boot
		h.inv.set(vm)
		return &vm, nil, true
	}
	h.start()
	h.ex.waitFor(t, h.ctx, "reconcile starts at start", func() bool { return len(h.ex.allCalls()) == 2 })

	// Ten minutes of heartbeats every 10s.
	var elapsed time.Duration
	for elapsed < 10*time.Minute {
		n := h.cp.Count(cptest.Heartbeat)
		clk.waitTimers(t, h.ctx, 1)
		elapsed += clk.advanceToNext()
		h.waitCP("a heartbeat", func() bool { return h.cp.Count(cptest.Heartbeat) > n })
	}
	beats := h.cp.Count(cptest.Heartbeat)
	starts := map[string]int{}
	for _, c := range h.ex.allCalls() {
		if c.task.Type != api.TaskStart || !strings.HasPrefix(c.task.ID, "reconcile-") {
			t.Errorf("reconcile ran %s (%s) on %s", c.task.Type, c.task.ID, c.task.VMName)
		}
		starts[c.task.VMUUID]++
	}
	t.Logf("%d heartbeats over %v; reconcile starts: %v", beats, elapsed, starts)
	if starts["ua"] != 1 {
		t.Errorf("VM a started %d times, want 1", starts["ua"])
	}
	// 10s backoff doubling to 160s: starts at 0, 10, 30, 70, 150, 310, 470.
	if n := starts["uf"]; n < 4 || n > 8 {
		t.Errorf("crash-at-boot VM started %d times in %d heartbeats, want 4..8", n, beats)
	}
	if starts["uo"] != 0 || starts["us"] != 0 {
		t.Errorf("orphan or drifting VM touched: %v", starts)
	}
	hbs := h.cp.Heartbeats()
	last := hbs[len(hbs)-1]
	if !slices.Equal(last.Orphans, []string{"uo"}) {
		t.Errorf("orphans reported %v, want [uo]", last.Orphans)
	}
	if len(last.VMs) != 4 || last.State != protocol.NodeReady || last.NodeInfo != nil {
		t.Errorf("heartbeat: %d VMs, state %s, node info resent %v", len(last.VMs), last.State, last.NodeInfo != nil)
	}
	if vm, ok := h.inv.get("uo"); !ok || vm.Status != api.StatusRunning {
		t.Errorf("orphan now %+v", vm)
	}

	// An answer without a desired map is "no opinion": no orphans.
	// Every heartbeat counted so far answered, then no opinion.
	h.waitCP("heartbeats answered", func() bool { return len(h.cp.Heartbeats()) == h.cp.Count(cptest.Heartbeat) })
	h.cp.NoOpinion()
	for range 2 { // one heartbeat answered without a map, one after it
		// Wait on the recorded heartbeats, not the count: a heartbeat
		// is counted when it arrives and recorded once answered.
		n := len(h.cp.Heartbeats())
		clk.waitTimers(t, h.ctx, 1)
		clk.advanceToNext()
		h.waitCP("a heartbeat", func() bool { return len(h.cp.Heartbeats()) > n })
	}
	hbs = h.cp.Heartbeats()
	if last := hbs[len(hbs)-1]; len(last.Orphans) != 0 {
		t.Errorf("orphans after a heartbeat answer without desired: %v", last.Orphans)
	}
	if vm, _ := h.inv.get("ua"); vm.Status != api.StatusRunning {
		t.Errorf("VM a is %s", vm.Status)
	}
}

// Shutdown stops pulling, hands a long task back after it checkpoints,
// lets a running short task finish and delivers its outcome, hands back a
// queued task unstarted, tells the control plane it drains, and leaves
// the VMs as they are.
func TestShutdownDrains(t *testing.T) {
	h := newHarness(t, runner.Config{}, vm("a", "ua", api.StatusRunning), vm("c", "uc", api.StatusRunning))
	h.ex.block("t-stop", "t-create")
	h.enqueue("t-stop", api.TaskStop, "a", "ua")
	h.enqueue("t-create", api.TaskCreate, "b", "ub")
	h.enqueue("t-queued", api.TaskStart, "a", "ua") // behind t-stop
	h.start()
	h.ex.waitStarted(t, h.ctx, "t-stop")
	h.ex.waitStarted(t, h.ctx, "t-create")
	h.waitCP("all leased", func() bool { return h.cp.Deliveries("t-queued") == 1 })
	leases := h.cp.Count(cptest.Lease)

	h.stop() // SIGTERM
	h.ex.waitFor(t, h.ctx, "the create to checkpoint", func() bool {
		c := h.ex.callsOf("t-create")
		return c[0].end != 0
	})
	if c := h.ex.callsOf("t-create")[0]; !errors.Is(c.cause, runner.ErrShutdown) {
		t.Errorf("create's ctx cause %v, want ErrShutdown", c.cause)
	}
	select {
	case <-h.done:
		t.Fatal("Run returned while a short task was running")
	default:
	}
	h.ex.release("t-stop")
	if c := h.waitCompletion("t-stop"); c.Status != api.TaskSuccess {
		t.Errorf("t-stop: %+v", c)
	}
	if err := <-h.done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	h.j.Close()
	h.stop = nil

	if c := h.ex.callsOf("t-stop")[0]; c.ctxErr != nil {
		t.Errorf("short task's ctx cancelled by the shutdown: %v", c.ctxErr)
	}
	if n := len(h.ex.callsOf("t-queued")); n != 0 {
		t.Error("queued task started during the drain")
	}
	for _, id := range []string{"t-create", "t-queued"} {
		if cs := h.cp.CompletionsOf(id); len(cs) != 0 {
			t.Errorf("%s completed during shutdown: %s", id, describe(cs))
		}
	}
	if n := h.cp.Count(cptest.Lease); n > leases+1 {
		t.Errorf("%d lease requests after the shutdown began", n-leases)
	}
	if _, err := h.cp.WaitHeartbeat(h.ctx, func(hb protocol.HeartbeatRequest) bool { return hb.State == protocol.NodeDraining }); err != nil {
		t.Error(err)
	}
	j, err := journal.Open(h.dir, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	for _, id := range []string{"t-create", "t-queued"} {
		if e, ok := j.Get(id); ok {
			t.Errorf("%s left in the journal as %s: it must run again after the restart", id, e.State)
		}
	}
	if e, _ := j.Get("t-stop"); !e.Acked() {
		t.Errorf("t-stop not acknowledged: %+v", e)
	}
	if vm, _ := h.inv.get("uc"); vm.Status != api.StatusRunning {
		t.Errorf("bystander VM is %s", vm.Status)
	}
	if _, ok := h.inv.get("ub"); ok {
		t.Error("checkpointed create left a VM")
	}
}

// A short task still running when the drain times out is left started in
// the journal; after the restart it meets the restart policy (vm.reboot
// converges: run again unless a new QEMU started since it began).
func TestDrainTimeoutThenRestartPolicy(t *testing.T) {
	h := newHarness(t, runner.Config{DrainTimeout: 20 * time.Millisecond}, vm("a", "ua", api.StatusRunning))
	h.ex.block("t1")
	h.enqueue("t1", api.TaskReboot, "a", "ua")
	h.start()
	h.ex.waitStarted(t, h.ctx, "t1")
	h.shutdown()
	if h.r.Healthy() {
		t.Error("Healthy() after Run returned")
	}
	j, err := journal.Open(h.dir, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if e, ok := j.Get("t1"); !ok || e.State != journal.Started {
		t.Fatalf("t1 in the journal: %+v", e)
	}
	j.Close()

	// A reboot converges: its VM shows no QEMU started since the task
	// began, so it runs again on its redelivery (and is done once).
	h.ex.release("t1")
	h.start()
	c := h.waitCompletion("t1")
	if c.Status != api.TaskSuccess {
		t.Errorf("t1 after restart: %+v %+v", c, c.Error)
	}
	if n := len(h.ex.callsOf("t1")); n != 2 {
		t.Errorf("t1 executed %d times, want 2 (cut, then run again)", n)
	}
}

// Shutdown before the control plane was ever reached returns at once
// (nothing to drain, no sender to wait for) and keeps the unacknowledged
// outcome in the journal.
func TestShutdownWhileUnreachable(t *testing.T) {
	clk := newFakeClock() // the drain timer never fires by itself
	h := newHarness(t, runner.Config{Clock: clk})
	j, err := journal.Open(h.dir, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := journal.Entry{TaskID: "t1", Type: api.TaskStart, VMUUID: "u1", StartedAt: time.Now(), Outcome: &journal.Outcome{Status: api.TaskSuccess}}
	if err := j.Finish(e); err != nil {
		t.Fatal(err)
	}
	j.Close()
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Register, Kind: cptest.FaultStatus, Status: 503})
	h.start()
	clk.waitTimers(t, h.ctx, 1) // registering, backing off
	h.shutdown()
	j, err = journal.Open(h.dir, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if e, _ := j.Get("t1"); e.Acked() || e.State != journal.Finished {
		t.Errorf("outcome after shutdown: %+v", e)
	}
	if n := h.cp.Count(cptest.Complete) + h.cp.Count(cptest.Heartbeat) + h.cp.Count(cptest.Lease); n != 0 {
		t.Errorf("%d requests besides registration", n)
	}
}
