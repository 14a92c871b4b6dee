package agent

import (
	"context"
	"github.com/otherix/otherix-agent/agent/crashpoint"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/agent/vnc"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Delete removes a VM and every file of it and unpins its images: the
// root disk's and its CD-ROMs'.
func (h *Host) Delete(ctx context.Context, name string) error {
	var v vm.View
	if _, err := h.engine.Do(ctx, name, "delete", func(t *vm.Txn) error {
		v = t.View()
		return t.Delete(ctx)
	}); err != nil {
		return err
	}
	crashpoint.Hit("delete.unpinning")
	// The VM is gone: no op can change its record any more.
	m := v.Record
	h.macs.Release(v.Spec.UUID)
	h.vncPorts.Release(v.Spec.UUID)
	if m.ImageSHA256 != "" {
		if err := h.cache.Unpin(m.Pool, m.ImageSHA256, v.Spec.UUID); err != nil {
			h.log.Warn("unpin image", zap.String("vm", name), zap.Error(err))
		}
	}
	for _, p := range m.CDROMPins {
		h.unpinCDROM(name, cdromOwner(v.Spec.UUID), p)
	}
	h.event(v, api.EventDeleted, "", "")
	if err := h.events.Remove(v.Spec.UUID); err != nil {
		h.log.Warn("remove vm history", zap.String("vm", name), zap.Error(err))
	}
	return nil
}

// updateRecord changes a VM's record (not atomically with an op: see
// vm.Engine.Do), logging a failure to persist it.
func (h *Host) updateRecord(name string, fn func(*vm.Record)) {
	h.updateRecordWith(h.engine.UpdateRecord, name, fn)
}

// updateRecordWith is updateRecord through update: the engine's durable
// UpdateRecord, or UpdateRecordVolatile for what a crash may lose.
func (h *Host) updateRecordWith(update func(string, func(*vm.Record)) error, name string, fn func(*vm.Record)) {
	if err := update(name, fn); err != nil && errcode.Of(err) != errcode.NotFound {
		h.log.Warn("persist vm record", zap.String("vm", name), zap.Error(err))
	}
}

// recordIn changes a VM's record within a Txn, logging a failure to
// persist it: the op it records is done.
func (h *Host) recordIn(t *vm.Txn, fn func(*vm.Record)) {
	if err := t.UpdateRecord(fn); err != nil {
		h.log.Warn("persist vm record", zap.String("vm", t.View().Spec.Name), zap.Error(err))
	}
}

// ValidateUpdate checks an update's values without touching anything: the
// API answers a bad one at once rather than after queueing its task.
func (h *Host) ValidateUpdate(u api.UpdateVM) error {
	if u.VCPUs != nil && (*u.VCPUs < vm.MinVCPUs || *u.VCPUs > vm.MaxVCPUs) {
		return errcode.New(errcode.ValidationFailed, "vcpus %d out of range %d..%d", *u.VCPUs, vm.MinVCPUs, vm.MaxVCPUs)
	}
	if u.RestartPolicy != nil && !api.ValidRestartPolicy(*u.RestartPolicy) {
		return errcode.New(errcode.ValidationFailed, "restart_policy %q: use on-failure, always or never", *u.RestartPolicy)
	}
	if u.MemoryMB != nil && (*u.MemoryMB < vm.MinMemoryMB || *u.MemoryMB > vm.MaxMemoryMB) {
		return errcode.New(errcode.ValidationFailed, "memory_mb %d out of range %d..%d", *u.MemoryMB, vm.MinMemoryMB, vm.MaxMemoryMB)
	}
	if u.VNCPassword != nil {
		if err := vnc.Validate(true, nil, *u.VNCPassword); err != nil {
			return err
		}
	}
	if err := vnc.Validate(false, u.VNCPort, ""); err != nil {
		return err
	}
	if u.VNCEnabled != nil && !*u.VNCEnabled && (u.VNCPort != nil || u.VNCPassword != nil) {
		return errcode.New(errcode.ValidationFailed, "vnc_port and vnc_password need vnc_enabled true, not false")
	}
	if u.CPULimit != nil {
		return vm.ValidateCPULimit(*u.CPULimit)
	}
	return nil
}

// Update changes a VM's CPU, memory, autostart, restart policy or VNC
// console (seed 003's InstanceUpdateRequest). CPU, memory and the console
// turned on, off or moved apply to a running VM at its next start (the
// view shows them as pending_changes), a VNC password at once.
func (h *Host) Update(ctx context.Context, name string, u api.UpdateVM) (api.VM, error) {
	if err := h.ValidateUpdate(u); err != nil {
		return api.VM{}, err
	}
	if u.VNCEnabled != nil || u.VNCPort != nil {
		if err := h.updateVNC(ctx, name, u); err != nil {
			return api.VM{}, err
		}
	} else if u.VNCPassword != nil {
		if err := h.setVNCPassword(ctx, name, *u.VNCPassword, nil); err != nil {
			return api.VM{}, err
		}
	}
	if u.VCPUs != nil || u.MemoryMB != nil || u.CPULimit != nil {
		if _, err := h.engine.Update(ctx, name, func(s *vm.Spec) {
			if u.VCPUs != nil {
				s.VCPUs = *u.VCPUs
			}
			if u.CPULimit != nil {
				s.CPULimit = *u.CPULimit
			}
			if u.MemoryMB != nil {
				s.MemoryMB = *u.MemoryMB
			}
		}); err != nil {
			return api.VM{}, err
		}
	}
	if u.Autostart != nil {
		h.updateRecord(name, func(m *vm.Record) { m.Autostart = *u.Autostart })
	}
	if u.RestartPolicy != nil {
		h.updateRecord(name, func(m *vm.Record) { m.RestartPolicy = *u.RestartPolicy })
	}
	return h.VM(name)
}
