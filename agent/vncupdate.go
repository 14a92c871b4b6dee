package agent

import (
	"context"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/agent/vnc"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// updateVNC turns a VM's console on or off or moves it (vm.update's
// vnc_enabled, vnc_port), with its new password if given. QEMU cannot add
// or remove a display adapter and VNC server at run time, so a running
// VM gets the change at its next start (pending_changes); until then it
// keeps its current port, and the new one is held for it too.
func (h *Host) updateVNC(ctx context.Context, name string, u api.UpdateVM) error {
	v, err := h.engine.Get(name)
	if err != nil {
		return err
	}
	base := v.Spec
	if v.Next != nil {
		base = *v.Next
	}
	on := base.VNC != nil
	if u.VNCEnabled != nil {
		on = *u.VNCEnabled
	}
	if !on {
		if u.VNCPort != nil || u.VNCPassword != nil {
			return errcode.New(errcode.ValidationFailed, "vm %q has no display (vnc_enabled is false): no VNC port or password to set", name)
		}
		if base.VNC == nil {
			return nil
		}
		return h.setVNC(ctx, name, nil)
	}
	if u.VNCPassword == nil && (base.VNC == nil || v.Record.VNCPassword == "") {
		return errcode.New(errcode.ValidationFailed, "vnc_password is required to turn vnc_enabled on: without one anyone reaching the port gets the VM's console")
	}
	next, err := h.vncPortFor(v, base, u.VNCPort)
	if err != nil {
		return err
	}
	if u.VNCPassword != nil {
		if err := h.setVNCPassword(ctx, name, *u.VNCPassword, next); err != nil {
			h.settleVNC(name)
			return err
		}
	}
	if base.VNC != nil && *base.VNC == *next {
		return nil
	}
	return h.setVNC(ctx, name, next)
}

// vncPortFor returns the console a VM is to have: on port (held for it
// here; port_in_use when taken), else on the port it has or, turned on,
// the next free one from 5900.
func (h *Host) vncPortFor(v vm.View, base vm.Spec, port *int) (*vm.VNC, error) {
	id, listen := v.Spec.UUID, h.cfg.Listen.VNC
	var own []*vm.VNC // consoles the VM has: their ports are its own
	for _, c := range []*vm.VNC{base.VNC, v.Spec.VNC} {
		if c != nil {
			own = append(own, c)
		}
	}
	if port == nil {
		if len(own) > 0 {
			c := *own[0]
			return &c, nil
		}
		p, err := h.vncPorts.PickAdd(listen, vnc.BasePort, id)
		if err != nil {
			return nil, err
		}
		return &vm.VNC{Listen: listen, Port: p}, nil
	}
	for _, c := range own {
		if c.Port == *port && c.Listen == listen {
			return &vm.VNC{Listen: listen, Port: *port}, nil
		}
	}
	if err := h.vncPorts.Add(id, *port); err != nil {
		return nil, err
	}
	if err := vnc.CheckPort(listen, *port); err != nil {
		h.settleVNC(v.Spec.Name)
		return nil, err
	}
	return &vm.VNC{Listen: listen, Port: *port}, nil
}

// setVNC makes c the VM's console (nil: none): at once when it is
// stopped, else at its next start. The ports it no longer needs are
// released, and a password it no longer needs forgotten.
func (h *Host) setVNC(ctx context.Context, name string, c *vm.VNC) error {
	_, err := h.engine.Update(ctx, name, func(s *vm.Spec) { s.VNC = c })
	h.settleVNC(name)
	return err
}

// settleVNC makes the VM hold exactly the VNC ports of its consoles (the
// one QEMU has and a pending one), and drops its sealed password once it
// has no console at all.
func (h *Host) settleVNC(name string) {
	v, err := h.engine.Get(name)
	if err != nil {
		return
	}
	var keep []int
	if v.Spec.VNC != nil {
		keep = append(keep, v.Spec.VNC.Port)
	}
	if v.Next != nil && v.Next.VNC != nil {
		keep = append(keep, v.Next.VNC.Port)
	}
	h.vncPorts.Keep(v.Spec.UUID, keep...)
	if len(keep) == 0 && v.Record.VNCPassword != "" {
		h.updateRecord(name, func(r *vm.Record) { r.VNCPassword = "" })
	}
}
