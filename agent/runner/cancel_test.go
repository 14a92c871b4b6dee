package runner_test

import (
	"context"
	"errors"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/agent/runner"
)

// phaseAt is a task's last progress phase at the control plane.
func phaseAt(h *harness, id string) string {
	t, ok := h.cp.Task(id)
	if !ok || t.Progress == nil {
		return ""
	}
	return t.Progress.Phase
}

// TestCancelQueuedTask: a task leased to the agent but queued behind
// another task of its VM is reported "queued"; a cancel by the control
// plane's rule (cpserver.CancelTask) is accepted and the task ends
// cancelled at once, while the task ahead still runs, and never runs.
// A running task (never queued, or queued and then started) is past its
// point of no return: ErrNotCancellable, and it ends success.
func TestCancelQueuedTask(t *testing.T) {
	h := newHarness(t, runner.Config{}, vm("a", "ua", api.StatusRunning))
	cp := h.cp.Protocol()
	h.ex.block("a1", "a3")
	h.enqueue("a1", api.TaskStop, "a", "ua")
	h.enqueue("a2", api.TaskStart, "a", "ua") // queued behind a1
	h.enqueue("a3", api.TaskStart, "a", "ua") // queued behind a1 and a2
	h.start()
	h.ex.waitStarted(t, h.ctx, "a1")
	h.waitCP("a2 and a3 reported queued", func() bool {
		return phaseAt(h, "a2") == api.ProgressQueued && phaseAt(h, "a3") == api.ProgressQueued
	})
	if got := phaseAt(h, "a1"); got != "" {
		t.Errorf("a1 started at once but reported phase %q", got)
	}
	if _, err := cp.CancelTask(h.ctx, "a1"); !errors.Is(err, cpserver.ErrNotCancellable) {
		t.Errorf("cancel of running a1: %v, want ErrNotCancellable", err)
	}
	if _, err := cp.CancelTask(h.ctx, "a2"); err != nil {
		t.Fatalf("cancel of queued a2: %v", err)
	}
	// The lease answer carries the cancel: a2 ends while a1 still runs.
	if c := h.waitCompletion("a2"); c.Status != api.TaskCancelled {
		t.Fatalf("a2: %+v", c)
	}
	if calls := h.ex.callsOf("a1"); len(calls) != 1 || calls[0].end != 0 {
		t.Fatalf("a1 ended before a2's cancel was answered: %+v", calls)
	}

	// a3, reported queued, starts once a1 is done: "started" at the
	// control plane, and no cancel from then on.
	h.ex.release("a1")
	if c := h.waitCompletion("a1"); c.Status != api.TaskSuccess {
		t.Errorf("a1: %+v", c)
	}
	h.ex.waitStarted(t, h.ctx, "a3")
	if got := phaseAt(h, "a3"); got != api.ProgressStarted {
		t.Errorf("a3 runs with phase %q at the control plane, want %q", got, api.ProgressStarted)
	}
	if _, err := cp.CancelTask(h.ctx, "a3"); !errors.Is(err, cpserver.ErrNotCancellable) {
		t.Errorf("cancel of started a3: %v, want ErrNotCancellable", err)
	}
	h.ex.release("a3")
	if c := h.waitCompletion("a3"); c.Status != api.TaskSuccess {
		t.Errorf("a3: %+v", c)
	}
	if n := len(h.ex.callsOf("a2")); n != 0 {
		t.Errorf("cancelled queued task executed %d times", n)
	}
}

// TestCancelQueuedTaskRace: a cancel accepted while the task ahead ends
// and the queued one reaches the head of its queue. Whichever comes
// first at the control plane, the cancel or the start report, the
// outcome is one of the two consistent ones: cancelled and never run,
// or the cancel refused and the task run.
func TestCancelQueuedTaskRace(t *testing.T) {
	h := newHarness(t, runner.Config{}, vm("a", "ua", api.StatusRunning))
	cp := h.cp.Protocol()
	h.start()
	for i := range 20 {
		ahead, queued := "ahead-"+string(rune('a'+i)), "queued-"+string(rune('a'+i))
		h.ex.block(ahead)
		h.enqueue(ahead, api.TaskResume, "a", "ua")
		h.enqueue(queued, api.TaskResume, "a", "ua")
		h.ex.waitStarted(t, h.ctx, ahead)
		h.waitCP(queued+" reported queued", func() bool { return phaseAt(h, queued) == api.ProgressQueued })
		done := make(chan error, 1)
		go func() {
			_, err := cp.CancelTask(context.Background(), queued)
			done <- err
		}()
		h.ex.release(ahead)
		err := <-done
		c := h.waitCompletion(queued)
		ran := len(h.ex.callsOf(queued))
		switch {
		case err == nil && (c.Status != api.TaskCancelled || ran != 0):
			t.Fatalf("round %d: cancel accepted, but %s ended %s and ran %d times", i, queued, c.Status, ran)
		case errors.Is(err, cpserver.ErrNotCancellable) && (c.Status != api.TaskSuccess || ran != 1):
			t.Fatalf("round %d: cancel refused, but %s ended %s and ran %d times", i, queued, c.Status, ran)
		case err != nil && !errors.Is(err, cpserver.ErrNotCancellable):
			t.Fatalf("round %d: cancel: %v", i, err)
		}
		h.waitCompletion(ahead)
	}
}
