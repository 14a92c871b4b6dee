package agent

import (
	"fmt"
	"sync"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vm"
)

// lifecycle follows VM status changes for the facts no task ordered: a
// crash, a guest that powered itself off. It keeps the last status seen
// per VM to tell a change from a repeated notification.
type lifecycle struct {
	mu   sync.Mutex
	last map[string]string // by VM uuid
}

// guestPoweredOff is the engine's status reason for a QEMU that exited
// because its guest powered off.
const guestPoweredOff = "guest powered off"

// followStatus is called on every VM status change (engine OnChange).
func (h *Host) followStatus(v vm.View) {
	id := v.Spec.UUID
	h.life.mu.Lock()
	if h.life.last == nil {
		h.life.last = map[string]string{}
	}
	prev, seen := h.life.last[id]
	if v.Status == api.StatusDeleted {
		delete(h.life.last, id)
	} else {
		h.life.last[id] = v.Status
	}
	h.life.mu.Unlock()
	if seen && prev == v.Status {
		return
	}
	switch {
	case v.Status == api.StatusCrashed:
		h.onCrash(v)
	case v.Status == api.StatusStopped && v.Reason == guestPoweredOff:
		h.onGuestShutdown(v)
	}
}

// onCrash records a crash: its event, and the crash-loop window. Crashing
// restart_crash_loop_count times within the window holds the VM's
// restarts (crash_loop) until it is started by request.
func (h *Host) onCrash(v vm.View) {
	now := time.Now().UTC()
	window, limit := h.cfg.Restart.CrashLoopWindow, h.cfg.Restart.CrashLoopCount
	loop, n := false, 0
	h.updateRecord(v.Spec.Name, func(m *vm.Record) {
		kept := m.Crashes[:0]
		for _, t := range m.Crashes {
			if now.Sub(t) < window {
				kept = append(kept, t)
			}
		}
		m.Crashes = append(kept, now)
		n = len(m.Crashes)
		if n >= limit && m.Policy() != api.RestartNever && !m.CrashLoop {
			m.CrashLoop, loop = true, true
		}
	})
	h.event(v, api.EventCrashed, v.Reason, "")
	if loop {
		h.event(v, api.EventCrashLoop, fmt.Sprintf("%d crashes within %s: no more restarts until the vm is started", n, window), "")
	}
}

// onGuestShutdown records a guest that powered itself off. Unless its
// restart policy is always, its desired phase becomes stopped: nothing
// starts it again but a start by request, and the control plane learns it
// from the heartbeat.
func (h *Host) onGuestShutdown(v vm.View) {
	h.updateRecord(v.Spec.Name, func(m *vm.Record) {
		if m.Policy() != api.RestartAlways {
			m.DesiredPhase = api.PhaseStopped
		}
	})
	h.event(v, api.EventGuestShutdown, "", "")
}

// started records a start's effect on the restart bookkeeping: a restart
// by the policy counts; a start by request begins afresh (no crash loop,
// no count).
func (h *Host) started(name string, before vm.View, s api.StartSpec, taskID string) {
	if s.Restart {
		h.updateRecord(name, func(m *vm.Record) { m.Restarts++ })
		msg := "after " + before.Status
		if before.Reason != "" {
			msg += ": " + before.Reason
		}
		h.eventByName(name, api.EventRestarted, msg, taskID)
		return
	}
	h.updateRecord(name, func(m *vm.Record) { m.Restarts, m.Crashes, m.CrashLoop = 0, nil, false })
	if before.PID == 0 {
		h.eventByName(name, api.EventStarted, "", taskID)
	}
}

// statusReason is a VM's status_reason: the engine's, said to be a crash
// loop when the restart policy gave up.
func statusReason(v vm.View, m vm.Record) string {
	if m.CrashLoop && v.Status == api.StatusCrashed {
		return fmt.Sprintf("crash loop: %d crashes in a short window, not restarted until started by request; last: %s", len(m.Crashes), v.Reason)
	}
	return v.Reason
}
