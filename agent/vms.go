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
	if u.VNCEnabled != nil && !*u.VNCEnabled && (u.VNCPort != nil || u.VNCPortAuto || u.VNCPassword != nil) {
		return errcode.New(errcode.ValidationFailed, "vnc_port and vnc_password need vnc_enabled true, not false")
	}
	if u.CPULimit != nil {
		return vm.ValidateCPULimit(*u.CPULimit)
	}
	return nil
}

// Update changes a VM's CPU, memory, autostart, restart policy or VNC
// console (seed 003's InstanceUpdateRequest), as one op on the VM (its
// Txn): a refused change (validation_failed, port_in_use) changes
// nothing; the record follows the spec, and the running QEMU's VNC
// password is set last. CPU, memory and
// the console turned on, off or moved apply to a running VM at its next
// start (the view shows them as pending_changes), a VNC password at
// once.
func (h *Host) Update(ctx context.Context, name string, u api.UpdateVM) (api.VM, error) {
	if err := h.ValidateUpdate(u); err != nil {
		return api.VM{}, err
	}
	_, err := h.engine.Do(ctx, name, "update", func(t *vm.Txn) error {
		v := t.View()
		var sealed string
		if u.VNCPassword != nil {
			s, err := h.box.Seal(*u.VNCPassword, v.Spec.UUID)
			if err != nil {
				return errcode.Wrap(errcode.Internal, err, "seal vnc password")
			}
			sealed = s
		}
		vncChange := u.VNCEnabled != nil || u.VNCPort != nil || u.VNCPortAuto
		if u.VNCPassword != nil && !vncChange && (v.Next == nil && v.Spec.VNC == nil || v.Next != nil && v.Next.VNC == nil) {
			return errcode.New(errcode.ValidationFailed, "vm %q has no display (vnc_enabled is false): no VNC password to change", name)
		}
		if vncChange || u.VCPUs != nil || u.MemoryMB != nil || u.CPULimit != nil {
			err := t.UpdateAlloc(func(s *vm.Spec, a *vm.Alloc) error {
				if vncChange {
					if err := h.applyVNC(name, v.Spec, s, v.Record.VNCPassword != "", u, a); err != nil {
						return err
					}
				}
				if u.VNCPassword != nil && s.VNC == nil {
					return errcode.New(errcode.ValidationFailed, "vm %q has no display (vnc_enabled is false): no VNC password to change", name)
				}
				if u.VCPUs != nil {
					s.VCPUs = *u.VCPUs
				}
				if u.CPULimit != nil {
					s.CPULimit = *u.CPULimit
				}
				if u.MemoryMB != nil {
					s.MemoryMB = *u.MemoryMB
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		after := t.View()
		if u.VNCPassword != nil || u.Autostart != nil || u.RestartPolicy != nil || !hasConsole(after) && v.Record.VNCPassword != "" {
			h.recordIn(t, func(r *vm.Record) {
				if u.VNCPassword != nil {
					r.VNCPassword = sealed
				}
				if !hasConsole(after) {
					r.VNCPassword = "" // no console, now or pending: forgotten
				}
				if u.Autostart != nil {
					r.Autostart = *u.Autostart
				}
				if u.RestartPolicy != nil {
					r.RestartPolicy = *u.RestartPolicy
				}
			})
		}
		if u.VNCPassword != nil && after.PID != 0 && after.Spec.VNC != nil {
			return h.setRunningVNCPassword(ctx, name, *u.VNCPassword)
		}
		return nil
	})
	if err != nil {
		return api.VM{}, err
	}
	return h.VM(name)
}
