package agent

import (
	"context"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/usage"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// usageSource is the engine as the usage collector reads it: the VMs
// whose QEMU runs, with their NICs' host links, and QMP.
type usageSource struct{ e *vm.Engine }

// Running implements usage.Source.
func (s usageSource) Running() []usage.VM {
	var out []usage.VM
	for _, v := range s.e.List() {
		if v.PID == 0 {
			continue
		}
		u := usage.VM{Name: v.Spec.Name, UUID: v.Spec.UUID, PID: v.PID}
		for i, n := range v.Spec.NICs {
			if n.Type != vm.NICBridge && n.Type != vm.NICMACVLAN {
				continue
			}
			link, err := netdev.LinkName(n.Type, vm.ShortID(v.Spec.UUID), i)
			if err != nil {
				continue
			}
			u.NICs = append(u.NICs, usage.NIC{Index: i, Link: link, Macvtap: n.Type == vm.NICMACVLAN})
		}
		out = append(out, u)
	}
	return out
}

// QMP implements usage.Source.
func (s usageSource) QMP(ctx context.Context, name, cmd string, args, out any) error {
	return s.e.QMP(ctx, name, cmd, args, out)
}

// Usage returns the usage collector, nil when collection is off.
func (h *Host) Usage() *usage.Collector { return h.usage }

// usageOf returns the last usage sample of a VM whose QEMU runs.
func (h *Host) usageOf(v vm.View) *api.Usage {
	if h.usage == nil || v.PID == 0 {
		return nil
	}
	u, ok := h.usage.Get(v.Spec.UUID)
	if !ok || u.QEMUPID != v.PID {
		return nil
	}
	return &u
}

// Stats returns a VM's usage (GET /v1/vms/{name}/stats).
func (h *Host) Stats(name string) (api.VMStats, error) {
	if h.usage == nil {
		return api.VMStats{}, errcode.New(errcode.ValidationFailed, "usage collection is off on this host (usage.interval: 0)")
	}
	v, err := h.engine.Get(name)
	if err != nil {
		return api.VMStats{}, err
	}
	return api.VMStats{Name: v.Spec.Name, UUID: v.Spec.UUID, Status: v.Status, Usage: h.usageOf(v)}, nil
}

// AllStats returns the usage of every VM whose QEMU runs and has been
// sampled, sorted by name (the /metrics series).
func (h *Host) AllStats() []api.VMStats {
	if h.usage == nil {
		return nil
	}
	var out []api.VMStats
	for _, v := range h.engine.List() {
		if u := h.usageOf(v); u != nil {
			out = append(out, api.VMStats{Name: v.Spec.Name, UUID: v.Spec.UUID, Status: v.Status, Usage: u})
		}
	}
	return out
}
