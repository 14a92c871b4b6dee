package runner_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
	"github.com/otherix/otherix-agent/agent/runner"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// A task delivered twice (a duplicate of the same lease while it runs,
// then again after it finished) takes effect once; the stored outcome is
// re-sent.
func TestExactlyOnceUnderDuplicateDelivery(t *testing.T) {
	h := newHarness(t, runner.Config{}, vm("web-1", "u1", api.StatusStopped))
	h.ex.block("t1")
	h.enqueue("t1", api.TaskStart, "web-1", "u1")
	h.cp.Duplicate("t1")
	h.start()

	h.ex.waitStarted(t, h.ctx, "t1")
	h.waitCP("the duplicate delivery confirmed", func() bool { return h.cp.Deliveries("t1") == 2 && len(h.cp.ProgressOf("t1")) > 0 })
	h.ex.release("t1")
	first := h.waitCompletion("t1")
	if first.Status != api.TaskSuccess || first.VM == nil || first.VM.Status != api.StatusRunning {
		t.Fatalf("completion: %+v", first)
	}

	// The control plane lost the acknowledgement and offers it again.
	h.enqueue("t1", api.TaskStart, "web-1", "u1")
	h.waitCP("the re-sent outcome", func() bool { return len(h.cp.CompletionsOf("t1")) == 2 })
	cs := h.cp.CompletionsOf("t1")
	if cs[1].Status != api.TaskSuccess || cs[1].VM == nil || cs[1].VM.Status != api.StatusRunning || cs[1].LeaseID == cs[0].LeaseID {
		t.Errorf("re-sent outcome: %s", describe(cs))
	}
	if n := len(h.ex.callsOf("t1")); n != 1 {
		t.Errorf("executed %d times, want 1", n)
	}
}

// A lease that expires while the task runs is offered again; the agent
// attaches to the running execution and completes on the new lease.
func TestLeaseExpiryWhileWorking(t *testing.T) {
	h := newHarness(t, runner.Config{}, vm("web-1", "u1", api.StatusRunning))
	h.ex.block("t1")
	h.enqueue("t1", api.TaskStop, "web-1", "u1")
	h.start()
	h.ex.waitStarted(t, h.ctx, "t1")
	h.cp.Expire("t1")
	h.waitCP("the redelivery confirmed on its new lease", func() bool {
		for _, p := range h.cp.ProgressOf("t1") {
			if p.LeaseID == "lease-2" {
				return true
			}
		}
		return false
	})
	h.ex.release("t1")
	c := h.waitCompletion("t1")
	if c.LeaseID != "lease-2" || c.Attempt != 2 || c.Status != api.TaskSuccess {
		t.Errorf("completion on lease %s attempt %d status %s, want lease-2, 2, success", c.LeaseID, c.Attempt, c.Status)
	}
	if n := len(h.ex.callsOf("t1")); n != 1 {
		t.Errorf("executed %d times, want 1", n)
	}
}

// An outcome that was never acknowledged survives a restart: the new
// process re-sends it and does not execute the redelivered task again.
func TestRedeliveryAfterRestart(t *testing.T) {
	h := newHarness(t, runner.Config{RetryBase: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond, DrainTimeout: 50 * time.Millisecond}, vm("web-1", "u1", api.StatusStopped))
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Complete, Kind: cptest.FaultStatus, Status: 503})
	h.enqueue("t1", api.TaskStart, "web-1", "u1")
	h.start()
	h.waitCP("a refused completion", func() bool { return h.cp.Count(cptest.Complete) >= 2 })
	h.shutdown()
	if n := len(h.cp.Completions()); n != 0 {
		t.Fatalf("%d completions accepted while refusing", n)
	}

	// The lease expired meanwhile; the new process (journal reopened) gets
	// the task again while its completions are still refused.
	h.cp.Expire("t1")
	before := h.cp.Count(cptest.Complete)
	h.start()
	h.waitCP("the redelivery and a re-sent outcome", func() bool {
		return h.cp.Deliveries("t1") == 2 && h.cp.Count(cptest.Complete) > before
	})
	h.cp.ClearFaults()
	c := h.waitCompletion("t1")
	if c.Status != api.TaskSuccess || c.VM == nil || c.VM.Status != api.StatusRunning {
		t.Fatalf("completion after restart: %+v", c)
	}
	if n := len(h.ex.callsOf("t1")); n != 1 {
		t.Errorf("executed %d times across the restart, want 1", n)
	}
	for _, c := range h.cp.CompletionsOf("t1") {
		if c.Status != api.TaskSuccess {
			t.Errorf("a completion says %s", c.Status)
		}
	}
}

// The restart policy for tasks a previous process started and did not
// finish: they run again unless their effect already holds (a reboot: a
// QEMU started since the task began).
func TestStartedButUnfinishedAfterRestart(t *testing.T) {
	rebooted := vm("d", "ud", api.StatusRunning)
	rebooted.StartedAt = time.Now().Add(time.Minute)
	h := newHarness(t, runner.Config{},
		vm("a", "ua", api.StatusRunning), // reboot had not taken effect
		vm("b", "ub", api.StatusStopped), // start had not taken effect
		vm("c", "uc", api.StatusPaused),  // pause had taken effect
		rebooted,                         // reboot had taken effect
	)
	j, err := journal.Open(h.dir, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range []journal.Entry{
		{TaskID: "t-reboot", Type: api.TaskReboot, VMName: "a", VMUUID: "ua", Attempt: 1, LeaseID: "old"},
		{TaskID: "t-start", Type: api.TaskStart, VMName: "b", VMUUID: "ub", Attempt: 1, LeaseID: "old"},
		{TaskID: "t-pause", Type: api.TaskPause, VMName: "c", VMUUID: "uc", Attempt: 1, LeaseID: "old"},
		{TaskID: "t-rebooted", Type: api.TaskReboot, VMName: "d", VMUUID: "ud", Attempt: 1, LeaseID: "old"},
	} {
		e.StartedAt = time.Now()
		if err := j.Start(e); err != nil {
			t.Fatal(err)
		}
	}
	j.Close()
	h.enqueue("t-reboot", api.TaskReboot, "a", "ua")
	h.enqueue("t-start", api.TaskStart, "b", "ub")
	h.enqueue("t-pause", api.TaskPause, "c", "uc")
	h.enqueue("t-rebooted", api.TaskReboot, "d", "ud")
	h.start()

	for _, id := range []string{"t-reboot", "t-rebooted"} {
		if c := h.waitCompletion(id); c.Status != api.TaskSuccess {
			t.Errorf("%s: %+v %+v", id, c, c.Error)
		}
	}
	if c := h.waitCompletion("t-start"); c.Status != api.TaskSuccess || c.VM.Status != api.StatusRunning {
		t.Errorf("t-start: %+v", c)
	}
	if c := h.waitCompletion("t-pause"); c.Status != api.TaskSuccess || c.VM.Status != api.StatusPaused {
		t.Errorf("t-pause: %+v", c)
	}
	for id, want := range map[string]int{"t-reboot": 1, "t-rebooted": 0, "t-start": 1, "t-pause": 0} {
		if n := len(h.ex.callsOf(id)); n != want {
			t.Errorf("%s executed %d times, want %d", id, n, want)
		}
	}
}

// Tasks on one VM run one at a time in arrival order; another VM's task
// runs meanwhile.
func TestPerVMOrderAndConcurrencyAcrossVMs(t *testing.T) {
	h := newHarness(t, runner.Config{}, vm("a", "ua", api.StatusStopped), vm("b", "ub", api.StatusStopped))
	h.ex.block("a1")
	h.enqueue("a1", api.TaskStart, "a", "ua")
	h.enqueue("a2", api.TaskPause, "a", "ua")
	h.enqueue("b1", api.TaskStart, "b", "ub")
	h.enqueue("a3", api.TaskResume, "a", "ua")
	h.start()

	h.ex.waitStarted(t, h.ctx, "a1")
	h.waitCompletion("b1") // B ran while A's first task blocks
	if n := len(h.ex.callsOf("a2")); n != 0 {
		t.Fatal("a2 started while a1 was running")
	}
	h.ex.release("a1")
	h.waitCompletion("a3")
	var a1, a2, a3 call
	for _, c := range h.ex.allCalls() {
		switch c.task.ID {
		case "a1":
			a1 = c
		case "a2":
			a2 = c
		case "a3":
			a3 = c
		}
	}
	if !(a1.end < a2.start && a2.end < a3.start) {
		t.Errorf("VM a's tasks overlapped or ran out of order: a1 %d-%d, a2 %d-%d, a3 %d-%d", a1.start, a1.end, a2.start, a2.end, a3.start, a3.end)
	}
	for _, id := range []string{"a1", "a2", "a3", "b1"} {
		if c := h.waitCompletion(id); c.Status != api.TaskSuccess {
			t.Errorf("%s: %s %+v", id, c.Status, c.Error)
		}
	}
}

// At most CreateConcurrency creates run at once.
func TestCreateConcurrencyLimit(t *testing.T) {
	h := newHarness(t, runner.Config{CreateConcurrency: 2})
	ids := []string{"c1", "c2", "c3", "c4"}
	h.ex.block(ids...)
	for i, id := range ids {
		h.enqueue(id, api.TaskCreate, "vm-"+id, "u"+string(rune('1'+i)))
	}
	h.start()
	running := func() int {
		n := 0
		for _, c := range h.ex.allCalls() {
			if c.end == 0 {
				n++
			}
		}
		return n
	}
	h.ex.waitFor(t, h.ctx, "two creates", func() bool { return running() == 2 })
	h.waitCP("all four leased", func() bool {
		for _, id := range ids {
			if h.cp.Deliveries(id) == 0 {
				return false
			}
		}
		return true
	})
	var first []string
	for _, c := range h.ex.allCalls() {
		first = append(first, c.task.ID)
	}
	h.ex.release(first[0])
	h.ex.waitFor(t, h.ctx, "a third create", func() bool { return len(h.ex.allCalls()) == 3 })
	for _, id := range ids {
		if id != first[0] {
			h.ex.release(id)
		}
	}
	for _, id := range ids {
		if c := h.waitCompletion(id); c.Status != api.TaskSuccess {
			t.Errorf("%s: %s", id, c.Status)
		}
	}
	h.ex.mu.Lock()
	peak := h.ex.maxCreate
	h.ex.mu.Unlock()
	if peak != 2 {
		t.Errorf("peak concurrent creates %d, want 2", peak)
	}
}

// A cancelled task's executor ctx is cancelled (cause ErrCancelled) and
// the task completes as cancelled; a cancelled queued task never runs.
// Progress reports reach the control plane on the way.
func TestCancellationViaProgressAnswer(t *testing.T) {
	h := newHarness(t, runner.Config{ProgressInterval: time.Millisecond}, vm("a", "ua", api.StatusRunning))
	h.cp.LeaseTTL = 3 * time.Second // renewed every second
	h.ex.hook = func(ctx context.Context, tk protocol.Task, progress func(api.Progress)) (*api.VM, error, bool) {
		if tk.ID != "long" {
			return nil, nil, false
		}
		progress(api.Progress{Phase: "download", Done: 4096, Total: 1 << 20})
		<-ctx.Done()
		if !errors.Is(context.Cause(ctx), runner.ErrCancelled) {
			return nil, fmt.Errorf("unexpected cause %v", context.Cause(ctx)), true
		}
		return nil, errcode.Wrap(errcode.Cancelled, ctx.Err(), "download stopped"), true
	}
	h.enqueue("long", api.TaskCreate, "b", "ub")
	h.ex.block("a1")
	h.enqueue("a1", api.TaskStop, "a", "ua")
	h.enqueue("a2", api.TaskStart, "a", "ua") // queued behind a1
	h.start()
	h.ex.waitStarted(t, h.ctx, "long")
	h.ex.waitStarted(t, h.ctx, "a1")
	h.waitCP("a download progress report", func() bool {
		for _, p := range h.cp.ProgressOf("long") {
			if p.Progress != nil && p.Progress.Phase == "download" && p.Progress.Done == 4096 {
				return true
			}
		}
		return false
	})
	h.cp.Cancel("long")
	h.cp.Cancel("a2")
	c := h.waitCompletion("long")
	if c.Status != api.TaskCancelled || c.Error == nil || c.Error.Code != string(errcode.Cancelled) {
		t.Errorf("long: %+v", c)
	}
	c = h.waitCompletion("a2")
	if c.Status != api.TaskCancelled {
		t.Errorf("a2: %+v", c)
	}
	h.ex.release("a1")
	if c := h.waitCompletion("a1"); c.Status != api.TaskSuccess {
		t.Errorf("a1: %+v", c)
	}
	if n := len(h.ex.callsOf("a2")); n != 0 {
		t.Errorf("cancelled queued task executed %d times", n)
	}
}

// A reboot cut between its stop and its start (the VM is stopped) runs
// only its start half on redelivery: the whole reboot again would answer
// conflict, a stopped VM cannot be rebooted.
func TestRebootCutAfterItsStop(t *testing.T) {
	h := newHarness(t, runner.Config{}, vm("e", "ue", api.StatusStopped))
	j, err := journal.Open(h.dir, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := j.Start(journal.Entry{TaskID: "t-half", Type: api.TaskReboot, VMName: "e", VMUUID: "ue", Attempt: 1, LeaseID: "old", StartedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	j.Close()
	h.enqueue("t-half", api.TaskReboot, "e", "ue")
	h.start()
	if c := h.waitCompletion("t-half"); c.Status != api.TaskSuccess || c.VM == nil || c.VM.Status != api.StatusRunning {
		t.Fatalf("t-half: %+v", c)
	}
	calls := h.ex.callsOf("t-half")
	if len(calls) != 1 || calls[0].task.Type != api.TaskStart {
		t.Fatalf("ran %d times as %+v, want once as vm.start", len(calls), calls)
	}
}
