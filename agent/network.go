package agent

import (
	"context"
	"encoding/json"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/errcode"
	"github.com/otherix/otherix-agent/agent/guestagent"
	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/cloudinit"
)

// networkNS derives stable network uuids from names.
var networkNS = uuid.MustParse("6f1d2a8e-4c2b-4f6e-9a51-0d7c3e2b9f10")

// NetworkUUID is a configured network's uuid: the configured one, or one
// derived from its name (stable across restarts and hosts).
func NetworkUUID(name string, n config.Network) string {
	if n.UUID != "" {
		return n.UUID
	}
	return uuid.NewSHA1(networkNS, []byte("otherix-network:"+name)).String()
}

// network resolves a network by name or uuid.
func (h *Host) network(ref string) (string, config.Network, error) {
	for name, n := range h.cfg.Networks {
		if ref == name || strings.EqualFold(ref, NetworkUUID(name, n)) {
			return name, n, nil
		}
	}
	return "", config.Network{}, errcode.New(errcode.NetworkNotFound, "network %q not found", ref)
}

// nicPlan is what a create asks of the network: NICs and forwards.
type nicPlan struct {
	nics     []vm.NIC
	forwards []portfwd.Rule // PROXY devices
	tpm      bool           // a TPM device (emulated)
	disks    []vm.Disk      // DISK devices (volumes)
	cdroms   []int          // indexes of CDROM devices in the request
	// Host devices passed through (PCI, GPU, USB, a host TPM).
	host *hostdev.Spec
}

// planNICs validates the network part of a create (seed 004's --network,
// seed 000's NIC and PROXY devices) and reserves MACs for id. On error no
// MAC stays reserved.
func (h *Host) planNICs(c *api.CreateVM, id string) (plan nicPlan, err error) {
	defer func() {
		if err != nil {
			h.macs.Release(id)
		}
	}()
	addNIC := func(ref, nicType, parent, mac string) error {
		n := vm.NIC{}
		if ref != "" {
			name, nw, err := h.network(ref)
			if err != nil {
				return err
			}
			n.Network = name
			n.Type, n.Bridge, n.Parent = nw.Type, nw.Bridge, nw.Parent
			if want := map[string]string{"BRIDGED": vm.NICBridge, "MACVLAN": vm.NICMACVLAN}[nicType]; nicType != "" && want != n.Type {
				return errcode.New(errcode.ValidationFailed, "nic_type %s does not match network %q (%s)", nicType, name, nw.Type)
			}
			if parent != "" && parent != nw.Bridge && parent != nw.Parent {
				return errcode.New(errcode.ValidationFailed, "parent %q is not the interface of network %q", parent, name)
			}
		} else {
			// A NIC by nic_type and parent must still name a configured
			// network's interface: callers do not pick host interfaces.
			found := false
			for name, nw := range h.cfg.Networks {
				if (nicType == "BRIDGED" && nw.Type == "bridge" && nw.Bridge == parent) || (nicType == "MACVLAN" && nw.Type == "macvlan" && nw.Parent == parent) {
					n.Network, n.Type, n.Bridge, n.Parent, found = name, nw.Type, nw.Bridge, nw.Parent, true
					break
				}
			}
			if !found {
				return errcode.New(errcode.NetworkNotFound, "no configured network for nic_type %q parent %q", nicType, parent)
			}
		}
		m, err := h.macs.Assign(id, len(plan.nics), strings.ToLower(mac))
		if err != nil {
			return err
		}
		n.MAC = m
		plan.nics = append(plan.nics, n)
		return nil
	}
	if c.Network != "" {
		_, nw, err := h.network(c.Network)
		if err != nil {
			return plan, err
		}
		if nw.Type != "bridge" {
			return plan, errcode.New(errcode.ValidationFailed, "network %q is of type %s: --network takes bridge networks only", c.Network, nw.Type)
		}
		if err := addNIC(c.Network, "", "", ""); err != nil {
			return plan, err
		}
	}
	for i, d := range c.Devices {
		if err := checkDeviceFields(i, d); err != nil {
			return plan, err
		}
		switch d.DevType {
		case api.DevNIC:
			if d.NICType != "" && d.NICType != "BRIDGED" && d.NICType != "MACVLAN" {
				return plan, errcode.New(errcode.ValidationFailed, "devices[%d].nic_type %q: use BRIDGED or MACVLAN", i, d.NICType)
			}
			if d.Network == "" && (d.NICType == "" || d.Parent == "") {
				return plan, errcode.New(errcode.ValidationFailed, "devices[%d]: a NIC needs network, or nic_type and parent", i)
			}
			if err := addNIC(d.Network, d.NICType, d.Parent, d.MAC); err != nil {
				return plan, errcode.Prefix(err, "devices[%d]", i)
			}
		case api.DevProxy:
			plan.forwards = append(plan.forwards, portfwd.Rule{Proto: d.SourceProto, DestProto: d.DestProto,
				HostAddr: h.cfg.Listen.Forwards, HostPort: d.SourcePort, GuestPort: d.DestPort})
		case api.DevDisk:
			disk, err := h.diskDevice(context.Background(), i, d)
			if err != nil {
				return plan, err
			}
			plan.disks = append(plan.disks, disk)
		case api.DevCDROM:
			plan.cdroms = append(plan.cdroms, i) // resolved at create: a URL means a download
		case api.DevTPM:
			if plan.tpm || plan.host != nil && plan.host.TPM != nil {
				return plan, errcode.New(errcode.ValidationFailed, "devices[%d]: a VM has at most one TPM", i)
			}
			if d.Path == "" {
				plan.tpm = true
				break
			}
			if err := addHostDevice(&plan, i, hostdev.Spec{TPM: &hostdev.TPM{Path: d.Path, PathRM: d.PathRM}}); err != nil {
				return plan, err
			}
		case api.DevPCI:
			if err := addHostDevice(&plan, i, hostdev.Spec{PCI: []hostdev.PCI{{Address: d.Address}}}); err != nil {
				return plan, err
			}
		case api.DevGPU:
			g := hostdev.GPU{Type: d.GPUType, ID: d.ID, PCI: d.PCI, Mdev: d.Mdev, MIGUUID: d.MIGUUID,
				VendorID: d.GPUVendorID, ProductID: d.GPUProductID, UID: d.UID, GID: d.GID, Mode: d.Mode}
			if err := addHostDevice(&plan, i, hostdev.Spec{GPU: []hostdev.GPU{g}}); err != nil {
				return plan, err
			}
		case api.DevUSB:
			u := hostdev.USB{Bus: d.Bus, Dev: d.Dev, VendorID: d.VendorID, ProductID: d.ProductID}
			if err := addHostDevice(&plan, i, hostdev.Spec{USB: []hostdev.USB{u}}); err != nil {
				return plan, err
			}
		default:
			return plan, errcode.New(errcode.ValidationFailed, "devices[%d].dev_type %q is not supported by this agent", i, d.DevType)
		}
	}
	rules, err := portfwd.Validate(nil, plan.forwards)
	if err != nil {
		return plan, err
	}
	plan.forwards = rules
	if len(plan.nics) == 0 {
		m, err := h.macs.Assign(id, 0, "")
		if err != nil {
			return plan, err
		}
		plan.nics = []vm.NIC{{Type: vm.NICUser, MAC: m, Forwards: plan.forwards}}
		plan.forwards = nil // SLIRP forwards them
	}
	return plan, nil
}

// addHostDevice adds one passthrough device to the plan, validated alone
// (errors name devices[i]) and then with the others (a device asked twice).
func addHostDevice(plan *nicPlan, i int, one hostdev.Spec) error {
	if err := one.Validate(); err != nil {
		return errcode.Prefix(err, "devices[%d]", i)
	}
	if plan.host == nil {
		plan.host = &hostdev.Spec{}
	}
	h := plan.host
	h.PCI = append(h.PCI, one.PCI...)
	h.GPU = append(h.GPU, one.GPU...)
	h.USB = append(h.USB, one.USB...)
	if one.TPM != nil {
		h.TPM = one.TPM
	}
	if err := h.Validate(); err != nil {
		return errcode.Prefix(err, "devices[%d]", i)
	}
	return nil
}

// deviceFields are the fields of each seed-000 device type besides
// dev_type, name, description and readonly (seed 000: "No Additional
// Properties"). CDROM's sha256 and storage_pool are this agent's: the
// digest of an ISO fetched by URL and the pool that caches it.
var deviceFields = map[string][]string{
	api.DevNIC:   {"network", "nic_type", "parent", "mac"},
	api.DevProxy: {"source_proto", "source_port", "dest_proto", "dest_port"},
	api.DevTPM:   {"path", "pathrm"},
	api.DevDisk:  {"source", "storage_pool", "io_bus", "boot_priority"},
	api.DevCDROM: {"source", "storage_pool", "boot_priority", "sha256"},
	api.DevPCI:   {"address"},
	api.DevGPU:   {"gpu_type", "id", "pci", "mdev", "mig_uuid", "vendorid", "productid", "uid", "gid", "mode"},
	api.DevUSB:   {"bus", "dev", "vendor_id", "product_id"},
}

// checkDeviceFields refuses a field of another device type, naming it.
func checkDeviceFields(i int, d api.Device) error {
	allowed, ok := deviceFields[d.DevType]
	if !ok {
		return errcode.New(errcode.ValidationFailed, "devices[%d].dev_type %q is not supported by this agent", i, d.DevType)
	}
	if d.Readonly && d.DevType != api.DevDisk && d.DevType != api.DevCDROM {
		return errcode.New(errcode.ValidationFailed, "devices[%d].readonly applies to DISK and CDROM devices, not %s", i, d.DevType)
	}
	b, _ := json.Marshal(d)
	var set map[string]json.RawMessage
	json.Unmarshal(b, &set)
	var bad []string
	for k := range set {
		switch k {
		case "dev_type", "name", "description", "readonly":
			continue
		}
		if !slices.Contains(allowed, k) {
			bad = append(bad, k)
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return errcode.New(errcode.ValidationFailed, "devices[%d].%s is not a field of a %s device", i, bad[0], d.DevType)
	}
	return nil
}

// generatedNetworkConfig matches each bridged or macvlan NIC by MAC with
// DHCP, for a create that gives no network-config.
func generatedNetworkConfig(nics []vm.NIC) []byte {
	var ns []cloudinit.NIC
	for i, n := range nics {
		if n.Type == vm.NICBridge || n.Type == vm.NICMACVLAN {
			ns = append(ns, cloudinit.NIC{Name: "eth" + strconv.Itoa(i), MAC: n.MAC})
		}
	}
	if len(ns) == 0 {
		return nil
	}
	return cloudinit.GenerateNetworkConfig(ns)
}

// netState is the per-VM runtime network state the host keeps: guest IPs
// from the guest agent and the agent-side proxy of bridged VMs' forwards.
type netState struct {
	mu      sync.Mutex
	ips     map[string][]string // vm uuid -> addresses
	ifaces  map[string][]guestagent.Interface
	pollers map[string]context.CancelFunc
	proxies map[string]*portfwd.Proxy
}

func newNetState() *netState {
	return &netState{ips: map[string][]string{}, ifaces: map[string][]guestagent.Interface{},
		pollers: map[string]context.CancelFunc{}, proxies: map[string]*portfwd.Proxy{}}
}

// onGuestAgent starts or stops following a VM's guest agent.
func (h *Host) onGuestAgent(v vm.View, up bool) {
	ns := h.net
	ns.mu.Lock()
	if cancel := ns.pollers[v.Spec.UUID]; cancel != nil {
		cancel()
		delete(ns.pollers, v.Spec.UUID)
	}
	if !up {
		ns.mu.Unlock()
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	ns.pollers[v.Spec.UUID] = cancel
	ns.mu.Unlock()
	go h.pollGuestAgent(ctx, v)
}

// pollGuestAgent refreshes a VM's IPs from its guest agent: at once, then
// every 10 s while the channel is open.
func (h *Host) pollGuestAgent(ctx context.Context, v vm.View) {
	c := guestagent.New(v.QGASocket)
	defer c.Close()
	log := h.log.With(zap.String("vm", v.Spec.Name), zap.String("vm_uuid", v.Spec.UUID))
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		ifs, err := c.Interfaces(qctx)
		cancel()
		if err != nil {
			log.Debug("guest agent", zap.Error(err))
			c.Reset()
			t.Reset(2 * time.Second)
			continue
		}
		var ips []string
		for _, i := range ifs {
			for _, a := range i.Addrs {
				ips = append(ips, a.Addr().String())
			}
		}
		sort.Strings(ips)
		h.net.mu.Lock()
		changed := strings.Join(h.net.ips[v.Spec.UUID], ",") != strings.Join(ips, ",")
		h.net.ips[v.Spec.UUID] = ips
		h.net.ifaces[v.Spec.UUID] = ifs
		h.net.mu.Unlock()
		if changed {
			log.Info("guest addresses", zap.Strings("ip_addresses", ips))
			if h.onChange != nil {
				if nv, err := h.engine.GetByUUID(v.Spec.UUID); err == nil {
					h.onChange(h.toAPI(nv))
				}
			}
		}
		t.Reset(10 * time.Second)
	}
}

// guestIPv4 is the first IPv4 the guest agent reported on a bridged or
// macvlan NIC of the VM: where the proxy sends forwards.
func (h *Host) guestIPv4(id string, nics []vm.NIC) (netip.Addr, error) {
	h.net.mu.Lock()
	defer h.net.mu.Unlock()
	for _, i := range h.net.ifaces[id] {
		for _, n := range nics {
			if n.Type != vm.NICUser && strings.EqualFold(i.MAC, n.MAC) {
				for _, a := range i.Addrs {
					if a.Addr().Is4() {
						return a.Addr(), nil
					}
				}
			}
		}
	}
	return netip.Addr{}, errcode.New(errcode.NetworkUnavailable, "the guest agent has not reported an address yet")
}

// syncNetState follows status changes: a running VM with forwards on a
// bridged NIC gets its proxy; a VM that stops loses proxy, IPs and poller.
func (h *Host) syncNetState(v vm.View) {
	m := v.Record
	id := v.Spec.UUID
	running := v.Status == api.StatusRunning || v.Status == api.StatusPaused
	ns := h.net
	ns.mu.Lock()
	p := ns.proxies[id]
	if !running {
		delete(ns.proxies, id)
		delete(ns.ips, id)
		delete(ns.ifaces, id)
		if cancel := ns.pollers[id]; cancel != nil {
			cancel()
			delete(ns.pollers, id)
		}
		ns.mu.Unlock()
		if p != nil {
			p.Close()
		}
		return
	}
	if p != nil || len(m.Forwards) == 0 {
		ns.mu.Unlock()
		return
	}
	nics := v.Spec.NICs
	p = portfwd.NewProxy(func(ctx context.Context) (netip.Addr, error) { return h.guestIPv4(id, nics) }, portfwd.ProxyOptions{Log: h.log.Named("proxy")})
	ns.proxies[id] = p
	ns.mu.Unlock()
	if err := p.Add(context.Background(), m.Forwards...); err != nil {
		h.log.Warn("port forwards", zap.String("vm", v.Spec.Name), zap.Error(err))
	}
}

// ips returns the guest addresses known for a VM.
func (h *Host) ips(id string) []string {
	h.net.mu.Lock()
	defer h.net.mu.Unlock()
	return append([]string(nil), h.net.ips[id]...)
}

// nicViews describes a VM's NICs.
func (h *Host) nicViews(v vm.View) []api.NICView {
	h.net.mu.Lock()
	ifs := h.net.ifaces[v.Spec.UUID]
	h.net.mu.Unlock()
	var out []api.NICView
	for i, n := range v.Spec.NICs {
		nv := api.NICView{Network: n.Network, Type: n.Type, MAC: n.MAC}
		if n.Type != vm.NICUser {
			nv.Link, _ = netdev.LinkName(n.Type, vm.ShortID(v.Spec.UUID), i)
		}
		for _, gi := range ifs {
			if strings.EqualFold(gi.MAC, n.MAC) {
				for _, a := range gi.Addrs {
					nv.IPs = append(nv.IPs, a.Addr().String())
				}
			}
		}
		out = append(out, nv)
	}
	return out
}

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
		h.net.mu.Lock()
		p := h.net.proxies[v.Spec.UUID]
		h.net.mu.Unlock()
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
		h.net.mu.Lock()
		p := h.net.proxies[v.Spec.UUID]
		h.net.mu.Unlock()
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
