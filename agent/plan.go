package agent

import (
	"context"
	"encoding/json"
	"slices"
	"sort"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/errcode"
)

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

// macAssigner gives a create's NICs their MACs: its vm.Reservation.
type macAssigner interface {
	AssignMAC(index int, mac string) (string, error)
}

// planNICs validates the network part of a create (seed 004's --network,
// seed 000's NIC and PROXY devices) and gets its NICs' MACs from macs
// (the create's reservation, which releasing frees them).
func (h *Host) planNICs(c *api.CreateVM, macs macAssigner) (plan nicPlan, err error) {
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
		m, err := macs.AssignMAC(len(plan.nics), strings.ToLower(mac))
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
		m, err := macs.AssignMAC(0, "")
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
