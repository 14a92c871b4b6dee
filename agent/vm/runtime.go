package vm

import (
	"io"
	"slices"
	"sort"

	"github.com/otherix/otherix-agent/agent/guestagent"
)

// What the agent learns about, or ties to, one running QEMU lives with
// that QEMU's incarnation in the VM's record: the guest agent's report of
// the guest's interfaces (View.Guest), and things attached to it (the
// guest agent's poller, the forwards proxy of a bridged VM) which the
// engine closes when that QEMU exits. Nothing of it is persisted: a
// re-adopted QEMU starts with none.

// SetGuestInterfaces records the interfaces the guest agent of the VM
// with uuid reported. changed says whether its addresses changed. A VM
// that does not run keeps nothing (a late report of a QEMU gone).
func (e *Engine) SetGuestInterfaces(uuid string, ifs []guestagent.Interface) (changed bool, err error) {
	m, err := e.lookupUUID(uuid)
	if err != nil {
		return false, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.proc == nil {
		return false, nil
	}
	changed = !slices.Equal(GuestIPs(m.proc.guest), GuestIPs(ifs))
	m.proc.guest = slices.Clone(ifs)
	return changed, nil
}

// GuestIPs lists the addresses of ifs, sorted.
func GuestIPs(ifs []guestagent.Interface) []string {
	var ips []string
	for _, i := range ifs {
		for _, a := range i.Addrs {
			ips = append(ips, a.Addr().String())
		}
	}
	sort.Strings(ips)
	return ips
}

// Attach ties c to the running QEMU of the VM with uuid under key: the
// engine closes it when that QEMU exits or the engine lets go of it
// (Close). It returns false, attaching nothing, when the VM does not run
// or key is taken; c is then the caller's to close.
func (e *Engine) Attach(uuid, key string, c io.Closer) bool {
	m, err := e.lookupUUID(uuid)
	if err != nil {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.proc
	if p == nil || p.attached[key] != nil {
		return false
	}
	if p.attached == nil {
		p.attached = map[string]io.Closer{}
	}
	p.attached[key] = c
	return true
}

// Attached returns what is attached under key to the VM's running QEMU,
// or nil.
func (e *Engine) Attached(uuid, key string) io.Closer {
	m, err := e.lookupUUID(uuid)
	if err != nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.proc == nil {
		return nil
	}
	return m.proc.attached[key]
}

// Detach unties what is attached under key to the VM's running QEMU and
// returns it (nil when nothing is): the caller closes it.
func (e *Engine) Detach(uuid, key string) io.Closer {
	m, err := e.lookupUUID(uuid)
	if err != nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.proc == nil {
		return nil
	}
	c := m.proc.attached[key]
	delete(m.proc.attached, key)
	return c
}

// takeAttachedLocked empties p's runtime state and returns what was
// attached to it, for the caller to close once m.mu is released.
func (p *process) takeAttachedLocked() []io.Closer {
	var out []io.Closer
	for _, c := range p.attached {
		out = append(out, c)
	}
	p.attached, p.guest = nil, nil
	return out
}

func closeAll(cs []io.Closer) {
	for _, c := range cs {
		c.Close()
	}
}
