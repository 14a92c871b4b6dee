package agent

import (
	"context"
	"fmt"
	"math"

	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/systemd"
)

// ScopePlacer adapts a systemd.Placer to the engine: each VM's QEMU gets
// its own transient scope named by the VM's short id, with limits sized
// from the VM (ScopeLimits).
type ScopePlacer struct {
	P systemd.Placer
	// Limits are the config's limits.vm_* (the zero value: no memory
	// cap, systemd's default IO weight, no tasks limit).
	Limits config.Limits
	// OOM, when set, follows each scope's OOM kills: a QEMU killed at its
	// memory cap crashes with an out-of-memory reason (ExitCause).
	OOM *OOMTracker
}

// Place implements vm.Placer.
func (s ScopePlacer) Place(ctx context.Context, v vm.View) error {
	u := ScopeLimits(v.Spec, s.Limits)
	u.Name = systemd.ScopeName(vm.ShortID(v.Spec.UUID))
	u.Description = fmt.Sprintf("otherix VM %s (%s)", v.Spec.Name, v.Spec.UUID)
	u.PIDs = []int{v.PID}
	if err := s.P.Place(ctx, u); err != nil {
		return err
	}
	if s.OOM != nil && s.P.Kind() == systemd.KindScope {
		// Without its counters a kill is reported as a plain SIGKILL.
		_ = s.OOM.Track(v, u.Name, u.MemoryMaxBytes)
	}
	return nil
}

// ExitCause explains a QEMU exit caused by the VM's memory cap (see
// vm.Config.ExitCause).
func (s ScopePlacer) ExitCause(v vm.View) string {
	if s.OOM == nil {
		return ""
	}
	return s.OOM.Cause(v)
}

// Remove implements vm.Placer.
func (s ScopePlacer) Remove(ctx context.Context, v vm.View) error {
	if s.OOM != nil {
		s.OOM.Forget(v)
	}
	return s.P.Remove(ctx, systemd.ScopeName(vm.ShortID(v.Spec.UUID)))
}

// Kind implements vm.Placer.
func (s ScopePlacer) Kind() string { return s.P.Kind() }

// ScopeLimits are the limits of a VM's scope (docs/config.md, "VM
// limits"):
//   - memory: the guest's memory plus limits.vm_memory_overhead_mb for
//     QEMU itself (device emulation, IO buffers, the TCG translation
//     cache), swap off; a QEMU past it is killed by the kernel;
//   - CPU weight: 100 (systemd's default share) per vCPU, at most 10000;
//   - CPU quota: the VM's cpu_limit, when it has one;
//   - IO weight and tasks limit: limits.vm_io_weight and vm_tasks_max.
func ScopeLimits(s vm.Spec, l config.Limits) systemd.UnitSpec {
	u := systemd.UnitSpec{
		CPUWeight: uint64(min(max(s.VCPUs, 1)*100, 10000)),
		IOWeight:  uint64(max(l.VMIOWeight, 0)),
		TasksMax:  uint64(max(l.VMTasksMax, 0)),
	}
	if l.VMMemoryOverheadMB > 0 {
		u.MemoryMaxBytes = uint64(s.MemoryMB+l.VMMemoryOverheadMB) << 20
	}
	if s.CPULimit > 0 {
		u.CPUQuotaPercent = uint64(math.Round(s.CPULimit * 100))
	}
	return u
}
