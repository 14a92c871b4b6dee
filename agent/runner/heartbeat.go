package runner

import (
	"bytes"
	"context"
	"encoding/json"
	"sort"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
)

// heartbeatLoop heartbeats at once (the first answer reconciles at
// start), then every interval (the control plane may change it), or
// after a failure with backoff clamped to the interval unless the control
// plane asked for a longer Retry-After, until ctx ends.
func (r *Runner) heartbeatLoop(ctx context.Context) {
	b := r.newBackoff()
	for {
		err := r.heartbeat(ctx)
		r.compact()
		r.mu.Lock()
		wait := r.interval
		r.mu.Unlock()
		if err != nil {
			// The backoff never outgrows the interval: a node whose
			// heartbeats pause longer than its liveness lease (three
			// intervals in cluster mode) reads lost after an outage of
			// the store alone. A longer Retry-After is honoured.
			wait = max(min(b.next(err), wait), min(protocol.RetryAfter(err), maxRetryAfter))
		} else {
			b.reset()
		}
		if sleep(ctx, r.clock, wait) != nil {
			return
		}
	}
}

// heartbeat sends one heartbeat and reconciles on its answer.
func (r *Runner) heartbeat(ctx context.Context) error {
	vms, node, err := r.heartbeatOnce(ctx)
	if err != nil {
		return err
	}
	r.mu.Lock()
	desired := r.desired
	r.lastNode = node
	r.mu.Unlock()
	r.reconcile(desired, vms)
	return nil
}

// heartbeatOnce sends one heartbeat and records its answer.
func (r *Runner) heartbeatOnce(ctx context.Context) ([]api.VM, []byte, error) {
	r.touch()
	vms := r.inv.VMs(ctx)
	node := r.inv.Node(ctx)
	nodeJSON, _ := json.Marshal(node)

	r.mu.Lock()
	r.hbSeq++
	req := protocol.HeartbeatRequest{Seq: r.hbSeq, State: protocol.NodeReady}
	if r.draining {
		req.State = protocol.NodeDraining
	}
	if !bytes.Equal(nodeJSON, r.lastNode) {
		req.NodeInfo = &node
	}
	for id := range r.tasks {
		req.InFlight = append(req.InFlight, id)
	}
	req.Orphans = orphanUUIDs(r.desired, vms, r.knownVM)
	r.mu.Unlock()
	sort.Strings(req.InFlight)
	req.VMs = make([]protocol.VMStatus, len(vms))
	for i, vm := range vms {
		req.VMs[i] = protocol.StatusOf(vm)
	}
	evs, _ := r.inv.(EventSource)
	if evs != nil {
		req.Events = evs.PendingEvents(protocol.MaxHeartbeatEvents)
	}

	resp, err := r.client.Heartbeat(ctx, req)
	if err != nil {
		if ctx.Err() == nil {
			r.requestFailed("heartbeat", err)
		}
		return nil, nil, err
	}
	now := r.clock.Now()
	r.mu.Lock()
	r.lastHB = now
	r.connected = true
	// An absent map is "no opinion": no reconcile, no orphans, until a
	// map comes again.
	r.desired = resp.Desired
	r.desiredSeq = req.Seq
	for uuid, seen := range r.taskSeen {
		if seen < req.Seq {
			delete(r.taskSeen, uuid) // this answer knows of that task
		}
	}
	r.mu.Unlock()
	r.setInterval(resp.IntervalSeconds)
	if n := len(req.Events); n > 0 {
		evs.AckEvents(req.Events[n-1].Seq)
	}
	return vms, nodeJSON, nil
}

// reconcile starts the VMs that should run and do not, with a per-VM
// backoff, and logs what it leaves alone. It never stops or deletes.
func (r *Runner) reconcile(desired map[string]string, vms []api.VM) {
	if desired == nil {
		return // the control plane has no opinion
	}
	r.reconMu.Lock()
	defer r.reconMu.Unlock()
	r.mu.Lock()
	if r.draining {
		r.mu.Unlock()
		return
	}
	r.mu.Unlock()
	d := diffVMs(desired, vms, func(vm api.VM) bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		_, busy := r.queues[vmKey(vm.UUID, vm.Name)]
		return busy
	})
	start, held := r.recon.plan(r.clock.Now(), desired, d)
	for _, vm := range d.orphans {
		r.mu.Lock()
		known := r.knownVM(vm.UUID)
		r.mu.Unlock()
		if known {
			continue // the map predates its task: not an orphan
		}
		r.log.Debug("orphan VM: unknown to the control plane; reported, left alone", zap.String("vm", vm.Name), zap.String("vm_uuid", vm.UUID))
	}
	for _, vm := range d.drift {
		r.log.Debug("VM runs but is desired stopped; reported, left alone", zap.String("vm", vm.Name), zap.String("vm_uuid", vm.UUID))
	}
	for _, uuid := range d.missing {
		r.log.Debug("VM desired here is not on this host", zap.String("vm_uuid", uuid))
	}
	for _, vm := range d.held {
		r.log.Debug("VM desired running is "+vm.Status+"; not started: "+policyHolds(vm), zap.String("vm", vm.Name), zap.String("vm_uuid", vm.UUID))
	}
	for _, vm := range held {
		r.log.Debug("VM desired running; restart held back by backoff", zap.String("vm", vm.Name), zap.String("vm_uuid", vm.UUID))
	}
	for _, vm := range start {
		r.log.Info("VM desired running is "+vm.Status+"; starting it", zap.String("vm", vm.Name), zap.String("vm_uuid", vm.UUID))
		r.enqueue(r.reconcileTask(vm))
	}
}

// knownVM reports whether the control plane knows a VM its last desired
// map may not list: a task of its for that VM was accepted after the
// heartbeat that map answered was sent (a vm.create leased just after the
// control plane answered). The next map, answering a heartbeat sent
// after that task, is the truth again. mu held.
func (r *Runner) knownVM(uuid string) bool {
	seen, ok := r.taskSeen[uuid]
	return ok && seen >= r.desiredSeq
}

// Kick asks for a reconcile now, with the last desired map: a VM that
// crashed is restarted by its policy without waiting for the next
// heartbeat. It never blocks.
func (r *Runner) Kick() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// reconcileLoop reconciles on a Kick until ctx ends. Restarts held back
// by their backoff wait for a later heartbeat or Kick.
func (r *Runner) reconcileLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
		}
		r.mu.Lock()
		desired := r.desired
		r.mu.Unlock()
		r.reconcile(desired, r.inv.VMs(ctx))
	}
}
