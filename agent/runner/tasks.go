package runner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// execution is one accepted task, queued or running.
type execution struct {
	key      string // VM key (queue)
	long     bool   // checkpointed, not awaited, on shutdown
	internal bool   // a reconcile start: no journal, no completion
	rerun    bool   // started by a previous agent process; converge first
	log      *zap.Logger

	ctx    context.Context
	cancel context.CancelCauseFunc
	stop   context.CancelFunc // ends the lease keeper

	// Guarded by Runner.mu.
	task     protocol.Task // latest delivery: lease id and attempt follow redeliveries
	attached bool          // delivered again: confirm the lease at once
	started  bool
	skipped  bool // finished before it started (cancelled while queued)
	// queued: accepted behind another task of its queue; queuedSent: the
	// keeper reported it queued (the control plane may then cancel it
	// until run confirms the start, confirmStart).
	queued, queuedSent bool

	sendMu sync.Mutex // one progress request of the task at a time, in order

	pmu      sync.Mutex
	progress *api.Progress // latest, not yet reported
	kick     chan struct{} // new progress
}

type vmQueue struct {
	items []*execution
}

// vmKey names a VM's queue: its uuid, or its name when the control plane
// sent no uuid.
func vmKey(uuid, name string) string {
	if uuid != "" {
		return uuid
	}
	return "name:" + name
}

// queueKey names the queue a task runs in. A VM's tasks share its queue
// (vmKey). A volume's tasks queue by pool and volume name, an image's by
// pool and digest (a pull by its URL, as its digest may be unknown): two
// tasks on one volume or image run in order, others concurrently. Their
// specs hold no secret.
func queueKey(t protocol.Task) string {
	var ref struct {
		Name   string `json:"name"`
		Pool   string `json:"pool"`
		Digest string `json:"digest"`
		URL    string `json:"url"`
	}
	switch t.Type {
	case api.TaskCreateVolume, api.TaskDeleteVolume:
		json.Unmarshal(t.Spec, &ref)
		return "volume:" + ref.Pool + "/" + ref.Name
	case api.TaskImagePull:
		json.Unmarshal(t.Spec, &ref)
		return "image:" + ref.Pool + "/" + ref.URL
	case api.TaskDeleteImage:
		json.Unmarshal(t.Spec, &ref)
		return "image:" + ref.Pool + "/" + strings.ToLower(ref.Digest)
	}
	return vmKey(t.VMUUID, t.VMName)
}

// longTask reports whether a task is long: it takes a create slot
// (Config.CreateConcurrency) and is checkpointed, not awaited, on
// shutdown. Downloads are.
func longTask(typ string) bool { return typ == api.TaskCreate || typ == api.TaskImagePull }

// rerunTarget is the restart policy, the one place that classifies every
// task type (docs/protocol.md, "Restart policy"). A task that a previous
// agent process started and did not finish is run again only when running
// it again cannot do more than running it once. ok reports whether it is
// re-run; status is the VM status that means "already done" for the ops
// that converge to a state, "" for those simply run again (they set
// absolute values, or read). The others are reported failed: vm.create,
// vm.reboot and vm.reset (a second disk, a second reboot), and the changes
// whose second run would fail on their own first effect or double it
// (a disk attached or detached, a forward added or removed, a volume
// created or deleted, an image deleted): the control plane reads the VM
// or pool to see where it stands.
func rerunTarget(taskType string) (status string, ok bool) {
	switch taskType {
	case api.TaskStart, api.TaskResume:
		return api.StatusRunning, true
	case api.TaskStop, api.TaskPoweroff:
		return api.StatusStopped, true
	case api.TaskPause:
		return api.StatusPaused, true
	case api.TaskDelete:
		return api.StatusDeleted, true
	case api.TaskUpdate, api.TaskChangeMedium, api.TaskEjectMedium, api.TaskImagePull,
		api.TaskScreenshot, api.TaskConsoleTail:
		return "", true
	case api.TaskCreate, api.TaskReboot, api.TaskAttachDisk, api.TaskDetachDisk:
		// Converge by what they leave (converged); a create cut half-way
		// was rolled back at start (RollBacker).
		return "", true
	case api.TaskReset:
		// No trace tells whether the reset button was pressed: pressed
		// again, the guest restarts once more from its firmware, the state
		// a reset leaves either way.
		return "", true
	}
	return "", false
}

// RollBacker is what an Executor may also be: at start, before any task
// runs, RollBack undoes what a task the journal shows started and not
// finished left half-done (a create's half-made VM), so that its rerun
// on redelivery has the effect of one run; Created reports the VM a
// create made when it reached its commit point.
type RollBacker interface {
	RollBack(ctx context.Context, t protocol.Task) error
	Created(uuid, taskID string) (api.VM, bool)
}

// errInterrupted is the outcome of a task interrupted by an agent restart
// that is not safe to run again.
func errInterrupted() error {
	return errcode.New(errcode.Internal, "interrupted by agent restart")
}

// recover reads the journal at start: unacknowledged outcomes are queued
// for delivery, started tasks that are not safe to re-run are finished as
// interrupted; safe ones wait for their redelivery.
func (r *Runner) recover() {
	for _, e := range r.j.List() {
		switch {
		case e.State == journal.Finished && !e.Acked():
			r.outbox.add(e, e.LeaseID, e.Attempt)
		case e.State == journal.Started:
			if _, ok := rerunTarget(e.Type); ok {
				if rb, ok := r.ex.(RollBacker); ok {
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
					err := rb.RollBack(ctx, protocol.Task{ID: e.TaskID, Type: e.Type, VMName: e.VMName, VMUUID: e.VMUUID})
					cancel()
					if err != nil {
						r.log.Error("roll back a task interrupted by restart", zap.String("task", e.TaskID), zap.String("op", e.Type), zap.Error(err))
					}
				}
				r.log.Info("task interrupted by restart; will re-run on redelivery", zap.String("task", e.TaskID), zap.String("op", e.Type), zap.String("vm_uuid", e.VMUUID))
				continue
			}
			r.finishEntry(e, outcomeOf(protocol.Result{}, errInterrupted(), false))
		}
	}
}

// accept takes one leased task.
func (r *Runner) accept(t protocol.Task) {
	log := r.log.With(zap.String("task", t.ID), zap.String("op", t.Type), zap.String("vm", t.VMName), zap.String("vm_uuid", t.VMUUID))
	if t.ID == "" {
		log.Error("leased task has no id; ignored")
		return
	}
	r.mu.Lock()
	if t.VMUUID != "" {
		r.taskSeen[t.VMUUID] = r.hbSeq // the control plane knows this VM now
	}
	if e, ok := r.tasks[t.ID]; ok {
		// Delivered again while queued or running here (a duplicate or an
		// expired lease): attach to the execution, follow the new lease.
		e.task.LeaseID, e.task.Attempt = t.LeaseID, t.Attempt
		e.task.LeaseExpiresAt, e.task.LeaseTTLSeconds = t.LeaseExpiresAt, t.LeaseTTLSeconds
		e.attached = true
		r.mu.Unlock()
		e.wake()
		log.Info("task delivered again while in flight; attached", zap.String("lease", t.LeaseID), zap.Int("attempt", t.Attempt))
		return
	}
	r.mu.Unlock()

	rerun := false
	if je, ok := r.j.Get(t.ID); ok {
		switch {
		case je.State == journal.Finished:
			// Already done here: never again; re-send the stored outcome.
			log.Info("task delivered again after it finished; re-sending its outcome", zap.String("status", je.Outcome.Status))
			r.outbox.add(je, t.LeaseID, t.Attempt)
			return
		case je.State == journal.Started:
			if _, ok := rerunTarget(t.Type); !ok {
				log.Warn("task interrupted by agent restart; not safe to re-run")
				je.LeaseID, je.Attempt = t.LeaseID, t.Attempt
				r.finishEntry(je, outcomeOf(protocol.Result{}, errInterrupted(), false))
				return
			}
			rerun = true
		}
	}
	r.enqueue(&execution{
		key:   queueKey(t),
		long:  longTask(t.Type),
		rerun: rerun,
		task:  t,
		log:   log,
	})
}

// enqueue appends e to its VM's queue, starting the VM's worker when idle,
// and starts the lease keeper of a control-plane task.
func (r *Runner) enqueue(e *execution) {
	e.kick = make(chan struct{}, 1)
	var keepCtx context.Context
	e.ctx, e.cancel = context.WithCancelCause(r.workCtx)
	keepCtx, e.stop = context.WithCancel(r.workCtx)
	r.mu.Lock()
	if !e.internal {
		r.tasks[e.task.ID] = e
	}
	q, ok := r.queues[e.key]
	if !ok {
		q = &vmQueue{}
		r.queues[e.key] = q
		r.workers.Add(1)
		go r.work(e.key, q)
	}
	e.queued = ok // behind the task its queue's worker runs
	q.items = append(q.items, e)
	r.mu.Unlock()
	if !e.internal {
		go r.keep(keepCtx, e)
	}
}

// work runs a VM's queue in order until it is empty.
func (r *Runner) work(key string, q *vmQueue) {
	defer r.workers.Done()
	for {
		r.mu.Lock()
		if len(q.items) == 0 {
			delete(r.queues, key)
			r.mu.Unlock()
			return
		}
		e := q.items[0]
		q.items = q.items[1:]
		skip := e.skipped
		r.mu.Unlock()
		if !skip {
			r.run(e)
		}
	}
}

// run executes one task: wait for a create slot, journal "started",
// execute, journal the outcome, queue it for delivery.
func (r *Runner) run(e *execution) {
	defer e.stop()
	if e.internal {
		r.runInternal(e)
		return
	}
	if e.long {
		select {
		case r.createSem <- struct{}{}:
			defer func() { <-r.createSem }()
		case <-r.drainCh:
		case <-e.ctx.Done():
		}
	}
	r.mu.Lock()
	if e.skipped {
		// Cancelled while waiting for a create slot; already completed.
		r.mu.Unlock()
		return
	}
	if r.draining {
		r.mu.Unlock()
		r.handBack(e)
		return
	}
	e.started = true
	t := e.task
	confirm := e.queuedSent
	r.mu.Unlock()

	if confirm && !r.confirmStart(e) {
		return
	}
	if e.rerun {
		if vm, done := r.converged(e.ctx, t); done {
			e.log.Info("task interrupted by restart had already taken effect")
			r.finish(e, r.clock.Now(), outcomeOf(protocol.Result{VM: vm}, nil, false))
			return
		}
	}
	startedAt := r.clock.Now()
	je := entryOf(t)
	je.StartedAt = startedAt
	if err := r.j.Start(je); err != nil {
		// Without a record the effect could happen twice: do not run.
		e.log.Error("journal failed; task not executed", zap.Error(err))
		r.finish(e, startedAt, outcomeOf(protocol.Result{}, errcode.Wrap(errcode.Internal, err, "journal"), false))
		return
	}
	run := t
	if e.rerun {
		run = r.remainder(e.ctx, t)
	}
	e.log.Info("task started", zap.Int("attempt", t.Attempt), zap.String("runs", run.Type))
	res, err := r.ex.Execute(e.ctx, run, e.report)
	cause := context.Cause(e.ctx)
	if err != nil && errors.Is(cause, ErrShutdown) {
		r.mu.Lock()
		delete(r.tasks, t.ID)
		r.signalFreed()
		r.mu.Unlock()
		if e.long {
			// Checkpointed: hand it back to run again after the restart.
			if jerr := r.j.Remove(t.ID); jerr != nil {
				e.log.Error("journal failed while handing back a checkpointed task", zap.Error(jerr))
			}
			e.log.Info("task checkpointed for shutdown; handed back", zap.Error(err))
		} else {
			e.log.Warn("task cut by shutdown; left to the restart policy", zap.Error(err))
		}
		return
	}
	r.finish(e, startedAt, outcomeOf(res, err, errors.Is(cause, ErrCancelled)))
}

// confirmStart tells the control plane that a task it was told is queued
// starts now (phase "started"), and runs it only if the answer does not
// say cancelled: the control plane cancels a queued task until this
// report, never after, so a cancel it accepted never meets a task that
// began. Without an answer the task does not start: the report is tried
// again with backoff. It reports whether to run the task; when not, the
// task is finished cancelled, or handed back on shutdown.
func (r *Runner) confirmStart(e *execution) bool {
	b := r.newBackoff()
	for {
		r.mu.Lock()
		lease := e.task.LeaseID
		r.mu.Unlock()
		e.sendMu.Lock()
		resp, err := r.client.Progress(e.ctx, e.task.ID, lease, &api.Progress{Phase: api.ProgressStarted})
		e.sendMu.Unlock()
		switch {
		case err == nil && resp.Cancelled, errors.Is(context.Cause(e.ctx), ErrCancelled):
			e.log.Info("control plane cancelled the task before it started")
			r.finish(e, time.Time{}, outcomeOf(protocol.Result{}, ErrCancelled, true))
			return false
		case e.ctx.Err() != nil:
			r.handBack(e)
			return false
		case err == nil:
			return true
		}
		e.log.Debug("start report failed; the task waits", zap.Error(err))
		t := r.clock.NewTimer(b.next(err))
		select {
		case <-t.C():
		case <-e.ctx.Done():
		case <-r.drainCh:
			t.Stop()
			r.handBack(e)
			return false
		}
		t.Stop()
	}
}

// handBack forgets a task that has not started, for the agent is
// draining: the control plane offers it again after its lease expires.
func (r *Runner) handBack(e *execution) {
	r.mu.Lock()
	delete(r.tasks, e.task.ID)
	r.signalFreed()
	r.mu.Unlock()
	e.log.Info("agent draining; task handed back unstarted")
}

// converged reports whether a re-run task's target state already holds.
func (r *Runner) converged(ctx context.Context, t protocol.Task) (*api.VM, bool) {
	if t.Type == api.TaskCreate {
		if rb, ok := r.ex.(RollBacker); ok {
			if vm, ok := rb.Created(t.VMUUID, t.ID); ok {
				return &vm, true
			}
		}
		return nil, false
	}
	target, _ := rerunTarget(t.Type)
	for _, vm := range r.inv.VMs(ctx) {
		if vm.UUID != t.VMUUID && (t.VMUUID != "" || vm.Name != t.VMName) {
			continue
		}
		if r.convergedVM(t, vm) || (target != "" && vm.Status == target) {
			return &vm, true
		}
		return nil, false
	}
	return nil, t.Type == api.TaskDelete // gone: deleted
}

// remainder is what is left to run of a re-run task that has not
// converged: a reboot cut after its stop half (the VM is stopped) has only
// its start left, where running the whole reboot again would answer
// conflict (a stopped VM cannot be rebooted).
func (r *Runner) remainder(ctx context.Context, t protocol.Task) protocol.Task {
	if t.Type != api.TaskReboot {
		return t
	}
	for _, vm := range r.inv.VMs(ctx) {
		if vm.UUID != t.VMUUID && (t.VMUUID != "" || vm.Name != t.VMName) {
			continue
		}
		if vm.Status == api.StatusStopped {
			t.Type, t.Spec = api.TaskStart, nil
		}
		break
	}
	return t
}

// convergedVM reports whether vm shows the effect of a task that a
// previous agent process started: a reboot's new QEMU (started after the
// task first started), an attached or detached disk.
func (r *Runner) convergedVM(t protocol.Task, vm api.VM) bool {
	switch t.Type {
	case api.TaskReboot:
		je, ok := r.j.Get(t.ID)
		return ok && vm.Status == api.StatusRunning && !vm.StartedAt.IsZero() && vm.StartedAt.After(je.StartedAt)
	case api.TaskAttachDisk, api.TaskDetachDisk:
		var d api.Device
		if len(t.Spec) == 0 || json.Unmarshal(t.Spec, &d) != nil {
			return false
		}
		has := false
		for _, x := range vm.Devices {
			has = has || (x.DevType == api.DevDisk && x.Source == d.Source && (d.StoragePool == "" || x.StoragePool == d.StoragePool))
		}
		return has == (t.Type == api.TaskAttachDisk)
	}
	return false
}

// outcomeOf turns an executor's result into an outcome.
func outcomeOf(res protocol.Result, err error, cancelled bool) journal.Outcome {
	switch {
	case err == nil:
		return journal.Outcome{Status: api.TaskSuccess, VM: res.VM, Output: res.Output}
	case cancelled:
		return journal.Outcome{Status: api.TaskCancelled, Error: &api.Error{Code: string(errcode.Cancelled), Message: "cancelled by the control plane"}}
	default:
		return journal.Outcome{Status: api.TaskFailed, Error: &api.Error{Code: string(errcode.Of(err)), Message: errcode.MessageOf(err)}}
	}
}

func entryOf(t protocol.Task) journal.Entry {
	return journal.Entry{TaskID: t.ID, Type: t.Type, VMName: t.VMName, VMUUID: t.VMUUID, Attempt: t.Attempt, LeaseID: t.LeaseID}
}

// finish journals an execution's outcome, queues it for delivery and
// forgets the execution.
func (r *Runner) finish(e *execution, startedAt time.Time, o journal.Outcome) {
	r.mu.Lock()
	je := entryOf(e.task)
	r.mu.Unlock()
	je.StartedAt = startedAt
	r.finishEntry(je, o)
	r.mu.Lock()
	delete(r.tasks, je.TaskID)
	r.signalFreed()
	r.mu.Unlock()
	fields := []zap.Field{zap.String("status", o.Status)}
	if o.Error != nil {
		fields = append(fields, zap.String("code", o.Error.Code), zap.String("message", o.Error.Message))
	}
	if r.cfg.ObserveTask != nil {
		r.cfg.ObserveTask(e.task.Type, o.Status, r.clock.Now().Sub(startedAt))
	}
	e.log.Info("task finished", fields...)
}

// finishEntry journals an outcome and queues it for delivery.
func (r *Runner) finishEntry(je journal.Entry, o journal.Outcome) {
	je.Outcome = &o
	je.FinishedAt = r.clock.Now()
	if err := r.j.Finish(je); err != nil {
		// The effect happened: deliver it anyway. A redelivery after a
		// restart then meets the restart policy.
		r.log.Error("journal failed to record an outcome", zap.String("task", je.TaskID), zap.Error(err))
	}
	r.outbox.add(je, je.LeaseID, je.Attempt)
}

// signalFreed wakes the lease loop waiting for a free slot; mu held.
func (r *Runner) signalFreed() {
	close(r.freed)
	r.freed = make(chan struct{})
}

// report is the executor's progress callback.
func (e *execution) report(p api.Progress) {
	e.pmu.Lock()
	fresh := e.progress == nil
	e.progress = &p
	e.pmu.Unlock()
	if fresh { // else the keeper already knows a report is due
		e.wake()
	}
}

// wake tells the keeper there is something to report.
func (e *execution) wake() {
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

func (e *execution) takeProgress() *api.Progress {
	e.pmu.Lock()
	defer e.pmu.Unlock()
	p := e.progress
	e.progress = nil
	return p
}

// keep extends a task's lease every third of its TTL (at most once a
// second) and reports new progress at most every ProgressInterval, from
// acceptance until the task finishes; nothing is sent on acceptance
// itself, and a redelivery is confirmed on its new lease at once. The
// TTL is the lease answer's, then each progress answer's. An answer
// saying "cancelled" cancels the task.
func (r *Runner) keep(ctx context.Context, e *execution) {
	var last time.Time // last report
	pending := false
	r.reportQueued(ctx, e)
	for {
		now := r.clock.Now()
		r.mu.Lock()
		renew := max(leaseTTL(e.task, now)/3, time.Second)
		r.mu.Unlock()
		if last.IsZero() {
			last = now
		}
		next := last.Add(renew)
		if p := last.Add(r.cfg.ProgressInterval); pending && p.Before(next) {
			next = p
		}
		t := r.clock.NewTimer(next.Sub(now))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-e.kick:
			t.Stop()
			r.mu.Lock()
			confirm := e.attached
			e.attached = false
			r.mu.Unlock()
			if !confirm {
				pending = true
				continue
			}
		case <-t.C():
		}
		pending = false
		last = r.clock.Now()
		r.mu.Lock()
		lease := e.task.LeaseID
		r.mu.Unlock()
		e.sendMu.Lock()
		resp, err := r.client.Progress(ctx, e.task.ID, lease, e.takeProgress())
		e.sendMu.Unlock()
		if err != nil {
			if ctx.Err() == nil {
				e.log.Debug("progress report failed", zap.Error(err))
			}
			continue
		}
		r.mu.Lock()
		if e.task.LeaseID == lease { // not delivered again meanwhile
			// The control plane may lengthen or shorten the lease:
			// later renewals follow its answer.
			if resp.LeaseTTLSeconds > 0 {
				e.task.LeaseTTLSeconds = resp.LeaseTTLSeconds
			}
			if !resp.LeaseExpiresAt.IsZero() {
				e.task.LeaseExpiresAt = resp.LeaseExpiresAt
			}
		}
		r.mu.Unlock()
		if resp.Cancelled {
			r.cancelTask(e)
		}
	}
}

// reportQueued tells the control plane at once that a task accepted
// behind another waits (phase "queued"), unless it started meanwhile:
// until it starts, the control plane may cancel it with nothing to undo.
func (r *Runner) reportQueued(ctx context.Context, e *execution) {
	e.sendMu.Lock()
	r.mu.Lock()
	send := e.queued && !e.started && !e.skipped
	e.queuedSent = send
	lease := e.task.LeaseID
	r.mu.Unlock()
	var resp *protocol.ProgressResponse
	var err error
	if send {
		resp, err = r.client.Progress(ctx, e.task.ID, lease, &api.Progress{Phase: api.ProgressQueued})
	}
	e.sendMu.Unlock()
	switch {
	case !send:
	case err != nil:
		e.log.Debug("queued report failed", zap.Error(err))
	case resp.Cancelled:
		r.cancelTask(e)
	}
}

// cancelByID cancels an accepted task the control plane cancelled
// (LeaseResponse.Cancel); an id not in flight here is ignored.
func (r *Runner) cancelByID(id string) {
	r.mu.Lock()
	e, ok := r.tasks[id]
	r.mu.Unlock()
	if ok {
		r.cancelTask(e)
	}
}

// leaseTTL is a lease's duration: lease_ttl_seconds, else what is left
// until lease_expires_at by our clock when that looks sane, else 60s.
func leaseTTL(t protocol.Task, now time.Time) time.Duration {
	if t.LeaseTTLSeconds > 0 {
		return time.Duration(t.LeaseTTLSeconds) * time.Second
	}
	if left := t.LeaseExpiresAt.Sub(now); left > 0 && left < time.Hour {
		return left
	}
	return 60 * time.Second
}

// cancelTask cancels a task the control plane cancelled: a queued one is
// completed as cancelled at once, a running one has its ctx cancelled.
func (r *Runner) cancelTask(e *execution) {
	r.mu.Lock()
	notStarted := !e.started && !e.skipped
	if notStarted {
		e.skipped = true
	}
	r.mu.Unlock()
	e.log.Info("control plane cancelled the task")
	e.cancel(ErrCancelled)
	if notStarted {
		e.stop()
		r.finish(e, time.Time{}, outcomeOf(protocol.Result{}, ErrCancelled, true))
	}
}

// runInternal runs a reconcile start: not journaled, not completed; the
// next heartbeat shows its effect.
func (r *Runner) runInternal(e *execution) {
	r.mu.Lock()
	draining := r.draining
	r.mu.Unlock()
	if draining {
		return
	}
	_, err := r.ex.Execute(e.ctx, e.task, func(api.Progress) {})
	if err != nil {
		e.log.Warn("reconcile start failed", zap.String("code", string(errcode.Of(err))), zap.Error(err))
		return
	}
	e.log.Info("reconcile started the VM")
}

// reconcileTask builds the task of a reconcile start.
func (r *Runner) reconcileTask(vm api.VM) *execution {
	r.mu.Lock()
	r.reconSeq++
	id := fmt.Sprintf("reconcile-%d-%s", r.reconSeq, vm.UUID)
	r.mu.Unlock()
	spec, _ := json.Marshal(api.StartSpec{Restart: true})
	t := protocol.Task{ID: id, Type: api.TaskStart, VMName: vm.Name, VMUUID: vm.UUID, Attempt: 1, Spec: spec}
	return &execution{
		key:      vmKey(vm.UUID, vm.Name),
		internal: true,
		task:     t,
		log:      r.log.With(zap.String("task", id), zap.String("op", t.Type), zap.String("vm", vm.Name), zap.String("vm_uuid", vm.UUID)),
	}
}
