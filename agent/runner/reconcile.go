package runner

import (
	"sort"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// diff classifies this host's VMs against the control plane's desired
// phases, like nomad's diffAllocs: what to start, what to report, what to
// leave alone.
type diff struct {
	start   []api.VM // desired running, stopped or crashed: start it
	held    []api.VM // desired running, stopped or crashed, left so by its restart policy
	orphans []api.VM // unknown to the control plane: report, never delete
	drift   []api.VM // desired stopped yet running or paused: report only
	busy    []api.VM // a task for it is queued or running: leave it to that
	inSync  []api.VM // nothing to do
	missing []string // desired here but not on this host (uuids)
}

// diffVMs computes the diff. busy reports whether a VM has a task queued
// or running on this host.
func diffVMs(desired map[string]string, vms []api.VM, busy func(api.VM) bool) diff {
	var d diff
	seen := make(map[string]bool, len(vms))
	for _, vm := range vms {
		seen[vm.UUID] = true
		phase, known := desired[vm.UUID]
		switch {
		case !known:
			d.orphans = append(d.orphans, vm)
		case busy(vm):
			d.busy = append(d.busy, vm)
		case phase == api.PhaseRunning && (vm.Status == api.StatusStopped || vm.Status == api.StatusCrashed):
			if policyHolds(vm) != "" {
				d.held = append(d.held, vm)
			} else {
				d.start = append(d.start, vm)
			}
		case phase == api.PhaseStopped && (vm.Status == api.StatusRunning || vm.Status == api.StatusPaused):
			d.drift = append(d.drift, vm)
		default:
			d.inSync = append(d.inSync, vm)
		}
	}
	for uuid := range desired {
		if !seen[uuid] {
			d.missing = append(d.missing, uuid)
		}
	}
	sort.Strings(d.missing)
	return d
}

// policyHolds says why a VM the control plane wants running, and that is
// stopped or crashed, is not started ("" when it is): the agent's own
// record of its desired phase (a guest that powered itself off, a host
// boot without autostart: facts newer than the control plane's map), a
// restart policy of never, or a crash loop.
func policyHolds(vm api.VM) string {
	switch {
	case vm.DesiredPhase == api.PhaseStopped:
		return "its desired phase on this host is stopped (" + vm.StatusReason + ")"
	case vm.Status == api.StatusStopped && vm.StatusReason == guestPoweredOff && vm.RestartPolicy != api.RestartAlways:
		// The agent turns the desired phase to stopped just after the
		// status: a view taken in between says so by its reason.
		return "the guest powered itself off"
	case vm.RestartPolicy == api.RestartNever:
		return "its restart policy is never"
	case vm.Status == api.StatusCrashed && vm.CrashLoop:
		return "it is in a crash loop"
	}
	return ""
}

// guestPoweredOff is the status reason of a VM whose guest powered off.
const guestPoweredOff = "guest powered off"

// orphanUUIDs lists the uuids of VMs the desired map does not know and
// known does not vouch for (a VM whose task the map predates); nil when
// the control plane gave no map.
func orphanUUIDs(desired map[string]string, vms []api.VM, known func(uuid string) bool) []string {
	if desired == nil {
		return nil
	}
	var out []string
	for _, vm := range vms {
		if _, ok := desired[vm.UUID]; !ok && !known(vm.UUID) {
			out = append(out, vm.UUID)
		}
	}
	sort.Strings(out)
	return out
}

// reconciler remembers reconcile starts per VM so a VM that stops again
// right after each start (a crash at boot) is started at growing
// intervals, base·2ⁿ up to max, instead of flapping. The backoff resets
// once the VM has stayed running for stable after a start, or when it is
// no longer desired running.
type reconciler struct {
	base, max, stable time.Duration
	state             map[string]*restartState // by VM uuid
}

type restartState struct {
	attempts  int
	lastStart time.Time
	next      time.Time // no start before
}

// plan returns the VMs to start now and updates the backoff state.
func (rc *reconciler) plan(now time.Time, desired map[string]string, d diff) (start, held []api.VM) {
	for uuid := range rc.state {
		if desired[uuid] != api.PhaseRunning {
			delete(rc.state, uuid)
		}
	}
	for _, vm := range d.inSync {
		if st, ok := rc.state[vm.UUID]; ok && vm.Status == api.StatusRunning && now.Sub(st.lastStart) >= rc.stable {
			delete(rc.state, vm.UUID)
		}
	}
	for _, vm := range d.start {
		st, ok := rc.state[vm.UUID]
		if !ok {
			st = &restartState{}
			rc.state[vm.UUID] = st
		}
		if now.Before(st.next) {
			held = append(held, vm)
			continue
		}
		st.attempts++
		st.lastStart = now
		wait := rc.base
		for i := 1; i < st.attempts && wait < rc.max; i++ {
			wait *= 2
		}
		st.next = now.Add(min(wait, rc.max))
		start = append(start, vm)
	}
	return start, held
}
