package vm

import (
	"context"
	"slices"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/vnc"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Host-wide allocations: NIC MACs, VNC ports and host devices.
//
// Invariant: no two VMs of this host, nor a VM and a create in progress,
// share a MAC, a VNC port or a host device. A VM's MACs and port are part
// of its spec (NICs[].MAC, VNC.Port) and of its pending spec (Next: a
// console moved or turned on while it runs keeps its old port until its
// next start and holds the new one meanwhile), persisted in its vm.json
// and changed only by its own ops (Define, Update, a start taking Next).
// Its host devices (PCI functions and their IOMMU groups, mdevs, USB
// devices, the host TPM) are held while its QEMU starts and runs: they
// are its HostPlan, what its spec's devices resolved to, claimed at each
// start and forgotten when QEMU exits (hostdevices.go), persisted in its
// vm.json meanwhile. A create in progress holds its own MACs, port and
// devices in its Reservation until Define takes it over (the VM holds
// its devices again from its start, the create's next step).
//
// There is no table of allocations to keep in step: the used set is
// derived from those specs, plans and reservations each time (allocMu
// makes each derivation and the change it allows one step). So a failed
// create (its reservation released), a refused define, a deleted VM, a
// start that took a pending console or failed after its claim, or an
// agent restart (reservations are in memory; specs and plans are read
// back from vm.json, and the plan of a QEMU that died meanwhile is
// released by the recovery) leaves no MAC, port or device held for
// nothing.

// Reservation is a create in progress before the engine knows its VM:
// its name and uuid (no other VM or create takes them), a placeholder
// view the host lists meanwhile, and the MACs, VNC port and host devices
// it was given.
// Define takes them over; Release drops them. A Reservation with no name
// is a probe: it reserves nothing but what it is given, and is not
// listed (a create's dry run).
type Reservation struct {
	e    *Engine
	name string
	uuid string
	view api.VM

	// Guarded by e.allocMu.
	macs map[string]int // mac -> NIC index
	vnc  []int
	devs []string // host devices: a hostdev.Plan's keys
}

// Reserve reserves name and uuid for a create in progress, with view as
// the VM's placeholder (Reserved). conflict when a VM or another create
// has either.
func (e *Engine) Reserve(name, uuid string, view api.VM) (*Reservation, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if name != "" {
		if _, ok := e.vms[name]; ok {
			return nil, errcode.New(errcode.Conflict, "vm %q already exists", name)
		}
		for _, r := range e.reserved {
			if r.name == name {
				return nil, errcode.New(errcode.Conflict, "vm %q is being created", name)
			}
		}
	}
	if _, ok := e.uuid[uuid]; ok {
		return nil, errcode.New(errcode.Conflict, "a vm with uuid %s already exists", uuid)
	}
	if _, ok := e.reserved[uuid]; ok {
		return nil, errcode.New(errcode.Conflict, "a vm with uuid %s is being created", uuid)
	}
	r := &Reservation{e: e, name: name, uuid: uuid, view: view, macs: map[string]int{}}
	e.reserved[uuid] = r
	return r, nil
}

// UUID is the reserved VM's uuid.
func (r *Reservation) UUID() string { return r.uuid }

// Release drops the reservation and what it was given. It is a no-op
// once Define took it over, or when released already.
func (r *Reservation) Release() {
	r.e.allocMu.Lock()
	defer r.e.allocMu.Unlock()
	r.e.mu.Lock()
	defer r.e.mu.Unlock()
	if r.e.reserved[r.uuid] == r {
		delete(r.e.reserved, r.uuid)
	}
}

// AssignMAC gives NIC index of the reserved VM a MAC: mac if given and
// free (conflict when another NIC has it), else a generated one
// (netdev.AssignMAC).
func (r *Reservation) AssignMAC(index int, mac string) (string, error) {
	r.e.allocMu.Lock()
	defer r.e.allocMu.Unlock()
	used := r.e.usedLocked()
	m, err := netdev.AssignMAC(r.uuid, index, mac, used.holder())
	if err != nil {
		return "", err
	}
	for old, i := range r.macs {
		if i == index {
			delete(r.macs, old)
		}
	}
	r.macs[m] = index
	return m, nil
}

// HoldVNC gives the reserved VM VNC port port, instead of any it held:
// port_in_use when another VM or create has it. Whether another process
// has bound it is the caller's to check (vnc.CheckPort).
func (r *Reservation) HoldVNC(port int) error {
	r.e.allocMu.Lock()
	defer r.e.allocMu.Unlock()
	used := r.e.usedLocked()
	if o, ok := used.ports[port]; ok && o != r.uuid {
		return errcode.New(errcode.PortInUse, "vnc port %d is VM %s's", port, o)
	}
	r.vnc = []int{port}
	return nil
}

// PickVNC gives the reserved VM the first port from from that no VM or
// create has and that can be bound on listen now.
func (r *Reservation) PickVNC(listen string, from int) (int, error) {
	r.e.allocMu.Lock()
	defer r.e.allocMu.Unlock()
	used := r.e.usedLocked()
	port, err := vnc.PickFree(listen, from, func(p int) bool { _, ok := used.ports[p]; return ok })
	if err != nil {
		return 0, err
	}
	r.vnc = []int{port}
	return port, nil
}

// HoldDevices resolves the host devices s asks for against this host and
// against what every VM and other create holds (validation_failed,
// device_not_found, iommu_unavailable, device_busy) and holds them for
// the reserved VM, instead of any it held. It changes nothing on the
// host: the VM's start acquires them.
func (r *Reservation) HoldDevices(ctx context.Context, s *hostdev.Spec) error {
	r.e.allocMu.Lock()
	defer r.e.allocMu.Unlock()
	if s.Empty() {
		r.devs = nil
		return nil
	}
	hd := r.e.cfg.HostDevices
	if hd == nil {
		return errcode.New(errcode.ValidationFailed, "this agent passes no host devices through")
	}
	p, err := hd.Resolve(ctx, r.uuid, s, r.e.usedLocked().devs)
	if err != nil {
		return err
	}
	r.devs = p.Keys()
	return nil
}

// Reserved returns the placeholders of the creates in progress, except
// probes.
func (e *Engine) Reserved() []api.VM {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []api.VM
	for _, r := range e.reserved {
		if r.name != "" {
			out = append(out, r.view)
		}
	}
	slices.SortFunc(out, func(a, b api.VM) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	return out
}

// ReservedView returns the placeholder of the create in progress of the
// VM name.
func (e *Engine) ReservedView(name string) (api.VM, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, r := range e.reserved {
		if r.name != "" && r.name == name {
			return r.view, true
		}
	}
	return api.VM{}, false
}

// used is the derived set of allocations: who holds each MAC, port and
// host device.
type used struct {
	macs  map[string]nicRef
	ports map[int]string // port -> VM uuid
	devs  hostdev.Holders
}

type nicRef struct {
	owner string
	index int
}

func (u used) holder() netdev.Holder {
	return func(mac string) (string, int, bool) {
		r, ok := u.macs[mac]
		return r.owner, r.index, ok
	}
}

// add records the allocations of one spec of VM id.
func (u used) add(id string, s *Spec) {
	if s == nil {
		return
	}
	for i, n := range s.NICs {
		if m, err := netdev.NormalizeMAC(n.MAC); err == nil {
			u.macs[m] = nicRef{id, i}
		}
	}
	if s.VNC != nil {
		u.ports[s.VNC.Port] = id
	}
}

// usedLocked derives what every VM and reservation holds. allocMu held,
// no machine's lock.
func (e *Engine) usedLocked() used {
	u := used{macs: map[string]nicRef{}, ports: map[int]string{}, devs: hostdev.Holders{}}
	e.mu.Lock()
	ms := make([]*machine, 0, len(e.vms))
	for _, m := range e.vms {
		ms = append(ms, m)
	}
	for id, r := range e.reserved {
		for mac, i := range r.macs {
			u.macs[mac] = nicRef{id, i}
		}
		for _, p := range r.vnc {
			u.ports[p] = id
		}
		u.devs.Add(id, r.devs)
	}
	e.mu.Unlock()
	for _, m := range ms {
		m.mu.Lock()
		id := m.st.Spec.UUID
		u.add(id, &m.st.Spec)
		u.add(id, m.st.Next)
		if p := m.st.HostPlan; p != nil {
			u.devs.Add(id, p.Keys())
		}
		m.mu.Unlock()
	}
	return u
}

// check refuses a spec whose MACs or VNC port another VM
// or create holds. allocMu held.
func (u used) check(s *Spec) error {
	id := s.UUID
	for i, n := range s.NICs {
		m, err := netdev.NormalizeMAC(n.MAC)
		if err != nil {
			continue // the spec's validation says what is wrong
		}
		if r, ok := u.macs[m]; ok && r.owner != id {
			return errcode.New(errcode.Conflict, "nic %d: mac %s is already used by nic %d of vm %s", i, m, r.index, r.owner)
		}
	}
	if s.VNC != nil {
		if o, ok := u.ports[s.VNC.Port]; ok && o != id {
			return errcode.New(errcode.PortInUse, "vnc port %d is VM %s's", s.VNC.Port, o)
		}
	}
	return nil
}

// Alloc picks host-wide resources for one VM's spec change, within
// Engine.UpdateAlloc: what it picks is free of every other VM and
// create, and stays so, for the change is made under the same lock.
type Alloc struct {
	id   string
	u    used
	self *machine // its lock is held while the Alloc is used
}

// TakenVNC reports whether another VM or create has port: port_in_use.
func (a *Alloc) TakenVNC(port int) error {
	if o, ok := a.u.ports[port]; ok && o != a.id {
		return errcode.New(errcode.PortInUse, "vnc port %d is VM %s's", port, o)
	}
	return nil
}

// PickVNC returns the first port from from that no other VM or create
// has and that is the VM's own (its running QEMU has it bound) or can be
// bound on listen now.
func (a *Alloc) PickVNC(listen string, from int) (int, error) {
	own := map[int]bool{}
	for _, s := range []*Spec{&a.self.st.Spec, a.self.st.Next} {
		if s != nil && s.VNC != nil && s.VNC.Listen == listen {
			own[s.VNC.Port] = true
		}
	}
	for p := max(from, vnc.BasePort); p <= vnc.MaxPort; p++ {
		if own[p] {
			return p, nil
		}
		if _, taken := a.u.ports[p]; taken {
			continue
		}
		err := vnc.CheckPort(listen, p)
		if err == nil {
			return p, nil
		}
		if !errcode.Is(err, errcode.PortInUse) {
			return 0, err
		}
	}
	return 0, errcode.New(errcode.PortInUse, "no free vnc port from %d on %s", from, listen)
}

// HeldVNCPorts returns the VNC ports VM or create uuid holds, in order:
// its console's and its pending console's.
func (e *Engine) HeldVNCPorts(uuid string) []int {
	e.allocMu.Lock()
	defer e.allocMu.Unlock()
	var out []int
	for p, o := range e.usedLocked().ports {
		if o == uuid {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}

// MACOwner returns the VM or create holding mac, and its NIC's index.
func (e *Engine) MACOwner(mac string) (uuid string, index int, ok bool) {
	m, err := netdev.NormalizeMAC(mac)
	if err != nil {
		return "", 0, false
	}
	e.allocMu.Lock()
	defer e.allocMu.Unlock()
	r, ok := e.usedLocked().macs[m]
	return r.owner, r.index, ok
}

// HeldDevices returns the host devices (hostdev.Plan keys) VM or create
// uuid holds, sorted.
func (e *Engine) HeldDevices(uuid string) []string {
	e.allocMu.Lock()
	defer e.allocMu.Unlock()
	var out []string
	for k, o := range e.usedLocked().devs {
		if o == uuid {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// DeviceHolder returns the VM or create holding host device key
// (hostdev.Plan keys: "tpm:/dev/tpm0", "pci:0000:01:00.0", ...), or "".
func (e *Engine) DeviceHolder(key string) string {
	e.allocMu.Lock()
	defer e.allocMu.Unlock()
	return e.usedLocked().devs[key]
}
