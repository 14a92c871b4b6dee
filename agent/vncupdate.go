package agent

import (
	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/agent/vnc"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// applyVNC makes next (the spec the VM is to have) carry the console
// vm.update's vnc_enabled and vnc_port ask for. cur is the spec its
// QEMU runs with; hasPassword says whether the VM has a sealed password.
// QEMU cannot add or remove a display adapter and VNC server at run
// time, so a running VM gets the change at its next start
// (pending_changes); until then it keeps its current port, and the new
// one is held for it too. The port is picked and checked through a, the
// engine's allocator: free of every other VM and create.
func (h *Host) applyVNC(name string, cur vm.Spec, next *vm.Spec, hasPassword bool, u api.UpdateVM, a *vm.Alloc) error {
	on := next.VNC != nil
	if u.VNCEnabled != nil {
		on = *u.VNCEnabled
	}
	if !on {
		if u.VNCPort != nil || u.VNCPortAuto || u.VNCPassword != nil {
			return errcode.New(errcode.ValidationFailed, "vm %q has no display (vnc_enabled is false): no VNC port or password to set", name)
		}
		next.VNC = nil
		return nil
	}
	if u.VNCPassword == nil && (next.VNC == nil || !hasPassword) {
		return errcode.New(errcode.ValidationFailed, "vnc_password is required to turn vnc_enabled on: without one anyone reaching the port gets the VM's console")
	}
	listen := h.cfg.Listen.VNC
	switch {
	case u.VNCPort != nil:
		port := *u.VNCPort
		for _, c := range []*vm.VNC{next.VNC, cur.VNC} {
			if c != nil && c.Port == port && c.Listen == listen {
				next.VNC = &vm.VNC{Listen: listen, Port: port} // its own
				return nil
			}
		}
		if err := a.TakenVNC(port); err != nil {
			return err
		}
		if err := vnc.CheckPort(listen, port); err != nil {
			return err
		}
		next.VNC = &vm.VNC{Listen: listen, Port: port}
	case u.VNCPortAuto || next.VNC == nil && cur.VNC == nil:
		// Automatic: the next free port from 5900, the VM's own
		// counting as free for it.
		p, err := a.PickVNC(listen, vnc.BasePort)
		if err != nil {
			return err
		}
		next.VNC = &vm.VNC{Listen: listen, Port: p}
	case next.VNC == nil:
		c := *cur.VNC // turned back on before its start turned it off
		next.VNC = &c
	}
	return nil
}

// hasConsole reports whether a VM has a console now or at its next start.
func hasConsole(v vm.View) bool {
	return v.Spec.VNC != nil || v.Next != nil && v.Next.VNC != nil
}

// forgetVNCPassword drops a VM's sealed VNC password once it has no
// console, now or pending.
func (h *Host) forgetVNCPassword(v vm.View) {
	if !hasConsole(v) && v.Record.VNCPassword != "" {
		h.updateRecord(v.Spec.Name, func(r *vm.Record) { r.VNCPassword = "" })
	}
}
