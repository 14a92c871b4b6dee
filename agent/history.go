package agent

import (
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// event records one fact of a VM's life in its history, on disk when it
// returns. An event store that cannot persist keeps the event in memory;
// the agent goes on.
func (h *Host) event(v vm.View, typ, msg, taskID string) {
	h.addEvent(h.events.Add, v, typ, msg, taskID)
}

// eventSoon is event written in the background, within a few
// milliseconds: a task's own history entry (a pause, a reset), which
// nothing reads back as a commit point, does not make its task wait for
// the disk.
func (h *Host) eventSoon(v vm.View, typ, msg, taskID string) {
	h.addEvent(h.events.AddSoon, v, typ, msg, taskID)
}

func (h *Host) addEvent(add func(api.VMEvent) (api.VMEvent, error), v vm.View, typ, msg, taskID string) {
	if h.events == nil {
		return
	}
	e, err := add(api.VMEvent{VMName: v.Spec.Name, VMUUID: v.Spec.UUID, Type: typ, Message: msg, TaskID: taskID})
	if err != nil {
		h.log.Warn("persist vm event", zap.String("vm", v.Spec.Name), zap.String("type", typ), zap.Error(err))
	}
	h.log.Info("vm event", zap.String("vm", v.Spec.Name), zap.String("vm_uuid", v.Spec.UUID), zap.String("type", typ),
		zap.String("message", msg), zap.Int64("seq", e.Seq))
}

// eventByName records an event of a VM known by name.
func (h *Host) eventByName(name, typ, msg, taskID string) {
	if v, err := h.engine.Get(name); err == nil {
		h.event(v, typ, msg, taskID)
	}
}

// eventSoonByName is eventSoon of a VM known by name.
func (h *Host) eventSoonByName(name, typ, msg, taskID string) {
	if v, err := h.engine.Get(name); err == nil {
		h.eventSoon(v, typ, msg, taskID)
	}
}

// Events returns a VM's history, oldest first.
func (h *Host) Events(name string) ([]api.VMEvent, error) {
	v, err := h.engine.Get(name)
	if err != nil {
		if _, creating := h.engine.ReservedView(name); creating {
			return []api.VMEvent{}, nil
		}
		return nil, err
	}
	return h.events.List(v.Spec.UUID), nil
}

// PendingEvents returns up to n events the control plane has not
// acknowledged, oldest first (runner.EventSource).
func (h *Host) PendingEvents(n int) []api.VMEvent { return h.events.Pending(n) }

// AckEvents records that the control plane has every event up to seq.
func (h *Host) AckEvents(seq int64) {
	if err := h.events.Ack(seq); err != nil {
		h.log.Warn("persist acknowledged events", zap.Error(err))
	}
}

// onRunState records a run-state change QEMU made on its own (engine
// OnRunState): paused (an I/O error, a guest panic), resumed, a disk
// error reported to the guest, a guest reboot. These come in bursts (a
// rebooting firmware, a pause on every retried write) and are written in
// the background, as a task's own event is.
func (h *Host) onRunState(v vm.View, event, reason string) {
	typ := map[string]string{vm.RunStatePaused: api.EventPaused, vm.RunStateResumed: api.EventResumed, vm.RunStateIOError: api.EventIOError,
		vm.RunStateGuestReboot: api.EventGuestReboot}[event]
	if typ == "" {
		return
	}
	h.eventSoon(v, typ, reason, "")
}

// taskEvent is the event a finished task leaves in its VM's history.
func taskEvent(typ string, err error) (string, bool) {
	if err != nil {
		if errcode.Of(err) == errcode.StopTimeout {
			return api.EventStopTimeout, true
		}
		return "", false
	}
	switch typ {
	case api.TaskStop, api.TaskPoweroff:
		return api.EventStopped, true
	case api.TaskReboot:
		return api.EventRebooted, true
	case api.TaskReset:
		return api.EventReset, true
	case api.TaskPause:
		return api.EventPaused, true
	case api.TaskResume:
		return api.EventResumed, true
	}
	return "", false
}
