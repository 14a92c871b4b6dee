package cpserver

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
)

// Enqueue queues a task for the next lease. ID is made when empty; the
// status, attempt and lease fields are the server's. With
// DesiredFollowsTasks it sets the VM's desired phase.
func (s *Server) Enqueue(ctx context.Context, t Task) (Task, error) {
	s.init()
	if t.ID == "" {
		t.ID = uuid.NewString()
	}
	now := time.Now().UTC()
	t.Status, t.CreatedAt, t.UpdatedAt = api.TaskPending, now, now
	t.Attempt, t.LeaseID, t.LeaseExpiry, t.Deliveries, t.Redeliver = 0, "", time.Time{}, 0, 0
	t.Progress, t.Error, t.Result, t.Output, t.Cancel = nil, nil, nil, nil, false
	s.enqueue.Lock()
	defer s.enqueue.Unlock()
	if err := s.admit(ctx, t.Type); err != nil {
		return Task{}, err
	}
	if s.DesiredFollowsTasks && t.Type == api.TaskCreate {
		if err := s.addCreate(ctx, t); err != nil {
			return Task{}, err
		}
		return t, nil
	}
	if err := s.Store.AddTask(ctx, t); err != nil {
		return Task{}, err
	}
	if s.DesiredFollowsTasks {
		phase := ""
		switch t.Type {
		case api.TaskCreate, api.TaskStart:
			phase = api.PhaseRunning
		case api.TaskStop, api.TaskPoweroff:
			phase = api.PhaseStopped
		}
		if phase != "" {
			vm, _ := s.VM(ctx, t.VMUUID) // the VM keeps its node and placement
			vm.UUID, vm.Name, vm.Phase = t.VMUUID, t.VMName, phase
			if t.Node != "" {
				vm.Node = t.Node
			}
			if t.Placement != nil {
				vm.Placement = t.Placement
			}
			if err := s.Store.PutVM(ctx, vm); err != nil {
				return Task{}, err
			}
		}
	}
	return t, nil
}

// addCreate stores a vm.create and its VM, running, at once: the VM's
// name is reserved with it (ErrNameTaken), and CheckCreate checks it
// against its node.
func (s *Server) addCreate(ctx context.Context, t Task) error {
	vm, _ := s.VM(ctx, t.VMUUID) // a create again keeps node and placement
	vm.UUID, vm.Name, vm.Phase = t.VMUUID, t.VMName, api.PhaseRunning
	if t.Node != "" {
		vm.Node = t.Node
	}
	if t.Placement != nil {
		vm.Placement = t.Placement
	}
	var check CreateCheck
	if s.CheckCreate != nil {
		check = func(n Node, open []Task) error { return s.CheckCreate(t, n, open) }
	}
	return s.Store.AddCreate(ctx, t, vm, check)
}

// NodeOf returns the node of a VM of the desired map ("" when unknown).
func (s *Server) NodeOf(ctx context.Context, uuid string) string {
	v, _ := s.VM(ctx, uuid)
	return v.Node
}

// VM returns a VM of the desired map by uuid.
func (s *Server) VM(ctx context.Context, uuid string) (VM, bool) {
	s.init()
	v, ok, err := s.Store.VM(ctx, uuid)
	if err != nil || !ok {
		return VM{}, false
	}
	return v, true
}

// admit refuses a task of type typ when the queue limits are reached.
func (s *Server) admit(ctx context.Context, typ string) error {
	if s.MaxPendingTasks <= 0 && s.MaxPendingCreates <= 0 {
		return nil
	}
	open, err := s.Store.Unfinished(ctx)
	if err != nil {
		return err
	}
	tasks, creates := len(open), 0
	for _, t := range open {
		if t.Type == api.TaskCreate {
			creates++
		}
	}
	if s.MaxPendingTasks > 0 && tasks >= s.MaxPendingTasks {
		return &TooManyTasksError{What: "tasks", Limit: s.MaxPendingTasks}
	}
	if typ == api.TaskCreate && s.MaxPendingCreates > 0 && creates >= s.MaxPendingCreates {
		return &TooManyTasksError{What: "creates", Limit: s.MaxPendingCreates}
	}
	return nil
}

// Task returns a task by id, or ErrNotFound.
func (s *Server) Task(ctx context.Context, id string) (Task, error) {
	s.init()
	return s.Store.Task(ctx, id)
}

// Tasks returns the kept tasks, oldest first.
func (s *Server) Tasks(ctx context.Context) ([]Task, error) {
	s.init()
	return s.Store.Tasks(ctx)
}

// Unfinished returns the tasks not yet terminal, oldest first.
func (s *Server) Unfinished(ctx context.Context) ([]Task, error) {
	s.init()
	return s.Store.Unfinished(ctx)
}

// Wait blocks until the task is terminal or ctx ends.
func (s *Server) Wait(ctx context.Context, id string) (Task, error) {
	s.init()
	for {
		ch := s.Store.Changed()
		t, err := s.Store.Task(ctx, id)
		if err != nil || t.Terminal() {
			return t, err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return Task{}, ctx.Err()
		}
	}
}

// errSkip aborts an update that no longer applies.
var errSkip = errors.New("skip")

// Lease answers a long poll: up to req.Max deliverable tasks, oldest
// first, as soon as there is one, else none after req.WaitSeconds
// (capped at MaxWait) or when ctx ends.
func (s *Server) Lease(ctx context.Context, req protocol.LeaseRequest) (protocol.LeaseResponse, error) {
	s.init()
	max := req.Max
	if max <= 0 {
		max = 1
	}
	wait := min(time.Duration(req.WaitSeconds)*time.Second, s.maxWait())
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		ch := s.Store.NodeChanged(req.Node)
		out, all, err := s.offer(ctx, req.Node, max)
		if err != nil {
			return protocol.LeaseResponse{Tasks: out}, err
		}
		cancel, err := s.cancels(ctx, req.Node, all)
		if err != nil || len(out) > 0 || len(cancel) > 0 || wait <= 0 {
			return protocol.LeaseResponse{Tasks: out, Cancel: cancel}, err
		}
		select {
		case <-ch:
		case <-deadline.C:
			wait = 0
		case <-ctx.Done():
			return protocol.LeaseResponse{Tasks: []protocol.Task{}}, nil
		}
	}
}

// offer leases to node up to max deliverable tasks in queue order:
// pending ones, ones whose lease expired (a new lease, attempt+1), and
// redeliveries of a current lease. A task of another node is not offered
// (nor read: the store's index of open tasks by node). It also returns
// the unfinished tasks it looked at.
func (s *Server) offer(ctx context.Context, node string, max int) ([]protocol.Task, []Task, error) {
	s.leaseMu.Lock()
	defer s.leaseMu.Unlock()
	all, err := s.Store.NodeUnfinished(ctx, node)
	if err != nil {
		return nil, nil, err
	}
	out := []protocol.Task{}
	ttl := s.leaseTTL()
	for _, t := range all {
		if len(out) == max {
			break
		}
		if t.Node != "" && t.Node != node || !deliverable(&t, time.Now()) {
			continue
		}
		got, err := s.Store.UpdateTask(ctx, t.ID, func(t *Task) error {
			now := time.Now()
			if !deliverable(t, now) {
				return errSkip
			}
			if t.Status == api.TaskRunning && t.Redeliver > 0 && now.Before(t.LeaseExpiry) {
				t.Redeliver-- // the same lease once more
			} else {
				if t.Status == api.TaskRunning {
					t.Redeliver = 0 // expired: redeliveries were of the old lease
				}
				t.CancelSent = false // a cancel goes to the new lease too
				t.Attempt++
				t.LeaseID = s.newLeaseID()
				t.LeaseExpiry = now.Add(ttl)
				t.Status = api.TaskRunning
				t.UpdatedAt = now.UTC()
			}
			t.Deliveries++
			return nil
		})
		if errors.Is(err, errSkip) || errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return out, all, err
		}
		out = append(out, protocol.Task{ID: got.ID, Type: got.Type, VMName: got.VMName, VMUUID: got.VMUUID, Spec: got.Spec,
			Attempt: got.Attempt, LeaseID: got.LeaseID, LeaseExpiresAt: got.LeaseExpiry.UTC(), LeaseTTLSeconds: int(ttl / time.Second)})
	}
	return out, all, nil
}

// cancels returns the tasks leased to node that were cancelled since
// their lease answer, each once per lease (LeaseResponse.Cancel): the
// agent learns of the cancel at once rather than at its next progress
// report.
// all is the store's unfinished tasks, as offer read them.
func (s *Server) cancels(ctx context.Context, node string, all []Task) ([]string, error) {
	var out []string
	sendable := func(t *Task) bool {
		return t.Status == api.TaskRunning && t.Cancel && !t.CancelSent && (t.Node == "" || t.Node == node)
	}
	for _, t := range all {
		if !sendable(&t) {
			continue
		}
		_, err := s.Store.UpdateTask(ctx, t.ID, func(t *Task) error {
			if !sendable(t) {
				return errSkip
			}
			t.CancelSent = true
			return nil
		})
		if errors.Is(err, errSkip) || errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return out, err
		}
		out = append(out, t.ID)
	}
	return out, nil
}

// deliverable: pending, or running with an expired lease or a
// redelivery due.
func deliverable(t *Task, now time.Time) bool {
	switch t.Status {
	case api.TaskPending:
		return true
	case api.TaskRunning:
		return t.Redeliver > 0 || !now.Before(t.LeaseExpiry)
	}
	return false
}

// Progress extends a task's lease and records its progress; the answer
// says whether the task is cancelled. ErrLeaseLost when the lease is not
// the task's current one or expired.
func (s *Server) Progress(ctx context.Context, id string, req protocol.ProgressRequest) (protocol.ProgressResponse, error) {
	s.init()
	ttl := s.leaseTTL()
	t, err := s.Store.UpdateTask(ctx, id, func(t *Task) error {
		now := time.Now()
		if t.Terminal() {
			return errSkip
		}
		if t.LeaseID == "" || req.LeaseID != t.LeaseID || !now.Before(t.LeaseExpiry) {
			return fmt.Errorf("lease %q of task %s: %w", req.LeaseID, id, ErrLeaseLost)
		}
		t.LeaseExpiry = now.Add(ttl)
		if req.Progress != nil && !staleQueued(t.Progress, req.Progress) {
			p := *req.Progress
			t.Progress = &p
		}
		t.UpdatedAt = now.UTC()
		return nil
	})
	if errors.Is(err, errSkip) {
		// Ended already (e.g. cancelled while pending): nothing to extend.
		t, err = s.Store.Task(ctx, id)
		return protocol.ProgressResponse{Cancelled: t.Cancel}, err
	}
	if err != nil {
		return protocol.ProgressResponse{}, err
	}
	return protocol.ProgressResponse{LeaseExpiresAt: t.LeaseExpiry.UTC(), LeaseTTLSeconds: int(ttl / time.Second), Cancelled: t.Cancel}, nil
}

// staleQueued reports whether a "queued" report arrived after a later
// phase (a slow request overtaken): the task is not queued any more, and
// taking it would make a started task look cancellable.
func staleQueued(cur, next *api.Progress) bool {
	return next.Phase == api.ProgressQueued && cur != nil && cur.Phase != api.ProgressQueued
}

// Complete records a task's outcome. A completion of a task already
// terminal is acknowledged and changes nothing (the first one counts);
// dup reports it. A late completion (expired or older lease) is the
// truth and is recorded.
func (s *Server) Complete(ctx context.Context, id string, req protocol.CompleteRequest) (dup bool, err error) {
	s.init()
	switch req.Status {
	case api.TaskSuccess, api.TaskFailed, api.TaskCancelled:
	default:
		return false, fmt.Errorf("%w: %q", ErrBadStatus, req.Status)
	}
	t, err := s.Store.UpdateTask(ctx, id, func(t *Task) error {
		if t.Terminal() {
			return errSkip
		}
		t.Status, t.Error, t.Result, t.Output = req.Status, req.Error, req.VM, req.Output
		t.UpdatedAt = time.Now().UTC()
		t.Spec = nil // may hold user-data: not kept once done
		return nil
	})
	if errors.Is(err, errSkip) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	if s.DesiredFollowsTasks && (t.Type == api.TaskDelete && t.Status == api.TaskSuccess ||
		t.Type == api.TaskCreate && t.Status != api.TaskSuccess) {
		if err := s.forget(ctx, t.VMUUID); err != nil {
			s.Log.Error("forget vm", zap.String("vm_uuid", t.VMUUID), zap.Error(err))
		}
	}
	return false, nil
}

// forget drops a VM from the desired map.
func (s *Server) forget(ctx context.Context, uuid string) error {
	return s.Store.DeleteVM(ctx, uuid)
}

func (s *Server) complete(ctx context.Context, id string, req protocol.CompleteRequest) (struct{}, error) {
	_, err := s.Complete(ctx, id, req)
	return struct{}{}, err
}

// Cancel cancels a task: a pending one ends cancelled at once and is never
// offered; a leased one is told so in its next progress answer. A
// terminal task is returned unchanged.
func (s *Server) Cancel(ctx context.Context, id string) (Task, error) {
	s.init()
	t, err := s.Store.UpdateTask(ctx, id, func(t *Task) error {
		if t.Terminal() {
			return errSkip
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
	if errors.Is(err, errSkip) {
		return s.Store.Task(ctx, id)
	}
	return t, err
}

// Expire ends a running task's lease now: the next lease offers it again
// under a new lease (attempt+1), and progress on the old lease gets
// ErrLeaseLost.
func (s *Server) Expire(ctx context.Context, id string) error {
	s.init()
	_, err := s.Store.UpdateTask(ctx, id, func(t *Task) error {
		if t.Status != api.TaskRunning {
			return errSkip
		}
		t.LeaseExpiry = time.Now().Add(-time.Nanosecond)
		t.Redeliver = 0
		return nil
	})
	if errors.Is(err, errSkip) {
		return nil
	}
	return err
}

// Redeliver makes the next lease answer carry the task's current lease
// once more, as a retransmitted answer would. On a task not yet leased it
// applies after its first lease.
func (s *Server) Redeliver(ctx context.Context, id string) error {
	s.init()
	_, err := s.Store.UpdateTask(ctx, id, func(t *Task) error {
		t.Redeliver++
		return nil
	})
	return err
}
