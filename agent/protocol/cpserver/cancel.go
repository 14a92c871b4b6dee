package cpserver

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// ErrNotCancellable: the task is past its point of no return (409
// conflict): it ended, or it runs and its effect may have begun.
var ErrNotCancellable = errors.New("task is past its point of no return")

// Cancellable reports whether a task may still be cancelled and end
// cancelled with nothing left behind: it is pending (never delivered);
// or leased and reported queued on the agent behind another task (it
// has not started: the agent asks before it starts one it reported
// queued, and this answer wins); or it is a download (vm.create,
// image.pull) that has reported nothing beyond its download phase, which
// the agent stops and undoes. Any other running task may have begun its
// effect.
func Cancellable(t Task) bool {
	switch t.Status {
	case api.TaskPending:
		return true
	case api.TaskRunning:
		phase := ""
		if t.Progress != nil {
			phase = t.Progress.Phase
		}
		if phase == api.ProgressQueued {
			return true
		}
		if t.Type != api.TaskCreate && t.Type != api.TaskImagePull {
			return false
		}
		return phase == "" || phase == api.ProgressStarted || phase == "download"
	}
	return false
}

// CancelTask cancels a task that is not past its point of no return
// (Cancellable), else fails with ErrNotCancellable: a pending one ends
// cancelled at once, a running download is told to stop in its next
// progress answer (wait for the task to end to learn the outcome: a
// download that finished first succeeds).
func (s *Server) CancelTask(ctx context.Context, id string) (Task, error) {
	s.init()
	t, err := s.Store.UpdateTask(ctx, id, func(t *Task) error {
		if !Cancellable(*t) {
			what := t.Status
			if t.Status == api.TaskRunning && t.Progress != nil && t.Progress.Phase != "" {
				what += " (" + t.Progress.Phase + ")"
			}
			return fmt.Errorf("%s %s is %s: %w", t.Type, t.ID, what, ErrNotCancellable)
		}
		t.Cancel = true
		if t.Status == api.TaskPending {
			t.Status = api.TaskCancelled
			t.Error = &api.Error{Code: "cancelled", Message: "cancelled before it was delivered"}
			t.Spec = nil
		}
		t.UpdatedAt = time.Now().UTC()
		return nil
	})
	if err == nil && s.DesiredFollowsTasks && t.Type == api.TaskCreate && t.Status == api.TaskCancelled {
		if err := s.forget(ctx, t.VMUUID); err != nil {
			return t, err
		}
	}
	return t, err
}
