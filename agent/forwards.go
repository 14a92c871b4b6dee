package agent

import (
	"context"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// ruleOf turns a PROXY device into a forward rule on the configured
// listen address.
func (h *Host) ruleOf(d api.Device) portfwd.Rule {
	return portfwd.Rule{Proto: d.SourceProto, DestProto: d.DestProto, HostAddr: h.cfg.Listen.Forwards, HostPort: d.SourcePort, GuestPort: d.DestPort}
}

// AddForward adds a PROXY forward to a VM, running or not: SLIRP VMs get it
// from QEMU (HMP hostfwd_add), bridged VMs from the agent's proxy.
func (h *Host) AddForward(ctx context.Context, name string, d api.Device) (api.VM, error) {
	v, err := h.engine.Get(name)
	if err != nil {
		return api.VM{}, err
	}
	r := h.ruleOf(d)
	if userNICOf(v.Spec) {
		if _, err := h.engine.AddForward(ctx, name, r); err != nil {
			return api.VM{}, err
		}
		return h.VM(name)
	}
	var first bool // a running VM's first forward starts its proxy
	if _, err := h.engine.Do(ctx, name, "forward_add", func(t *vm.Txn) error {
		v := t.View()
		rules, err := portfwd.Validate(v.Record.Forwards, []portfwd.Rule{r})
		if err != nil {
			return err
		}
		p := h.proxyOf(v.Spec.UUID)
		if p != nil {
			if err := p.Add(ctx, rules[0]); err != nil {
				return err
			}
		} else if err := portfwd.CheckFree(ctx, rules); err != nil {
			return err
		}
		h.recordIn(t, func(m *vm.Record) { m.Forwards = append(m.Forwards, rules[0]) })
		first = p == nil
		return nil
	}); err != nil {
		return api.VM{}, err
	}
	if first {
		if nv, err := h.engine.Get(name); err == nil {
			h.syncNetState(nv)
		}
	}
	return h.VM(name)
}

// RemoveForward removes a VM's forward of a host port.
func (h *Host) RemoveForward(ctx context.Context, name string, d api.Device) (api.VM, error) {
	v, err := h.engine.Get(name)
	if err != nil {
		return api.VM{}, err
	}
	r, err := h.ruleOf(d).Normalize()
	if err != nil {
		return api.VM{}, err
	}
	if userNICOf(v.Spec) {
		if _, err := h.engine.RemoveForward(ctx, name, r); err != nil {
			return api.VM{}, err
		}
		return h.VM(name)
	}
	if _, err := h.engine.Do(ctx, name, "forward_remove", func(t *vm.Txn) error {
		v := t.View()
		found := false
		var keep []portfwd.Rule
		for _, f := range v.Record.Forwards {
			if f.Proto == r.Proto && f.HostPort == r.HostPort {
				found = true
				r = f
				continue
			}
			keep = append(keep, f)
		}
		if !found {
			return errcode.New(errcode.NotFound, "vm %q has no forward of host port %d/%s", name, r.HostPort, r.Proto)
		}
		p := h.proxyOf(v.Spec.UUID)
		if p != nil {
			p.Remove(r)
		}
		h.recordIn(t, func(m *vm.Record) { m.Forwards = keep })
		return nil
	}); err != nil {
		return api.VM{}, err
	}
	return h.VM(name)
}

func userNICOf(s vm.Spec) bool {
	if len(s.NICs) == 0 {
		return true
	}
	for _, n := range s.NICs {
		if n.Type == vm.NICUser {
			return true
		}
	}
	return false
}
