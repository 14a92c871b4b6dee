package agent

import (
	"context"
	"fmt"

	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/systemd"
)

// ScopePlacer adapts a systemd.Placer to the engine: each VM's QEMU gets
// its own transient scope named by the VM's short id, with memory and CPU
// accounting sized from the VM.
type ScopePlacer struct{ P systemd.Placer }

// Place implements vm.Placer.
func (s ScopePlacer) Place(ctx context.Context, v vm.View) error {
	return s.P.Place(ctx, systemd.UnitSpec{
		Name:        systemd.ScopeName(vm.ShortID(v.Spec.UUID)),
		Description: fmt.Sprintf("otherix VM %s (%s)", v.Spec.Name, v.Spec.UUID),
		PIDs:        []int{v.PID},
		// Guest RAM plus QEMU's own overhead.
		MemoryMaxBytes:  uint64(v.Spec.MemoryMB)<<20 + 512<<20,
		CPUQuotaPercent: uint64(v.Spec.VCPUs) * 100,
	})
}

// Remove implements vm.Placer.
func (s ScopePlacer) Remove(ctx context.Context, v vm.View) error {
	return s.P.Remove(ctx, systemd.ScopeName(vm.ShortID(v.Spec.UUID)))
}

// Kind implements vm.Placer.
func (s ScopePlacer) Kind() string { return s.P.Kind() }
