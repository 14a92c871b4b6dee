package hostdev

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Host is one machine's sysfs and /dev. Which VM holds which device is
// not its to keep: see Holders.
type Host struct {
	// SysRoot and DevRoot are where sysfs and /dev are ("" = /sys, /dev);
	// tests point them at a fake tree (package sysfstest).
	SysRoot string
	DevRoot string
	// Write writes a sysfs control file (driver_override, drivers_probe,
	// an mdev type's create, an mdev's remove). nil writes the file;
	// tests pass sysfstest.Tree.Write, which plays the kernel's part.
	Write func(path string, data []byte) error
}

func (h *Host) sys(rel ...string) string {
	root := h.SysRoot
	if root == "" {
		root = "/sys"
	}
	return filepath.Join(append([]string{root}, rel...)...)
}

func (h *Host) dev(rel ...string) string {
	root := h.DevRoot
	if root == "" {
		root = "/dev"
	}
	return filepath.Join(append([]string{root}, rel...)...)
}

func (h *Host) write(path, data string) error {
	if h.Write != nil {
		return h.Write(path, []byte(data))
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// readAttr reads a sysfs attribute, trimmed.
func readAttr(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// linkBase is the last element of a symlink's target ("" if p is no link).
func linkBase(p string) string {
	t, err := os.Readlink(p)
	if err != nil {
		return ""
	}
	return filepath.Base(t)
}

// Drivers a VFIO group may hold besides vfio-pci: pci-stub only keeps host
// drivers off a device, and pcieport drives bridges, which the kernel lets
// share a group with a user-owned device.
var groupSafeDrivers = map[string]bool{"vfio-pci": true, "pci-stub": true, "pcieport": true, "": true}

const (
	classBridgePCI = 0x0604 // class>>8 of a PCI-to-PCI bridge
	classDisplay   = 0x03   // class>>16 of a display controller
)

// pciDev is what sysfs says about one PCI function.
type pciDev struct {
	Addr   string
	Vendor string // "10de"
	Device string
	Class  uint32
	Driver string // "" when unbound
	Group  int    // -1 without an IOMMU group
}

func (d *pciDev) isBridge() bool  { return d.Class>>8 == classBridgePCI }
func (d *pciDev) isDisplay() bool { return d.Class>>16 == classDisplay }

// readPCI reads the function at addr (already normalized).
func (h *Host) readPCI(addr string) (*pciDev, error) {
	dir := h.sys("bus/pci/devices", addr)
	if _, err := os.Stat(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, errcode.New(errcode.DeviceNotFound, "no pci device %s on this host", addr)
		}
		return nil, errcode.Wrap(errcode.Internal, err, "pci device %s", addr)
	}
	d := &pciDev{Addr: addr, Group: -1}
	var err error
	read := func(name string) string {
		if err != nil {
			return ""
		}
		var v string
		v, err = readAttr(filepath.Join(dir, name))
		return v
	}
	d.Vendor = strings.TrimPrefix(read("vendor"), "0x")
	d.Device = strings.TrimPrefix(read("device"), "0x")
	class := read("class")
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "pci device %s", addr)
	}
	c, perr := strconv.ParseUint(strings.TrimPrefix(class, "0x"), 16, 32)
	if perr != nil {
		return nil, errcode.Wrap(errcode.Internal, perr, "pci device %s: class %q", addr, class)
	}
	d.Class = uint32(c)
	d.Driver = linkBase(filepath.Join(dir, "driver"))
	if g := linkBase(filepath.Join(dir, "iommu_group")); g != "" {
		if n, err := strconv.Atoi(g); err == nil {
			d.Group = n
		}
	}
	return d, nil
}

// hasIOMMU reports whether the kernel made any IOMMU group.
func (h *Host) hasIOMMU() bool {
	ents, err := os.ReadDir(h.sys("kernel/iommu_groups"))
	return err == nil && len(ents) > 0
}

// groupMembers lists the devices of an IOMMU group (PCI addresses, or an
// mdev's UUID), sorted.
func (h *Host) groupMembers(group int) ([]string, error) {
	ents, err := os.ReadDir(h.sys("kernel/iommu_groups", strconv.Itoa(group), "devices"))
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "iommu group %d", group)
	}
	out := make([]string, 0, len(ents))
	for _, e := range ents {
		out = append(out, e.Name())
	}
	sort.Strings(out)
	return out, nil
}

// checkVFIO checks that d can be given to a VM through vfio-pci: the host
// has an IOMMU, d has a group, d is bound to vfio-pci or unbound with
// vfio-pci loaded, and every other member of the group is safe to leave
// beside a user-owned device.
func (h *Host) checkVFIO(d *pciDev) error {
	if d.isBridge() {
		return errcode.New(errcode.ValidationFailed, "pci device %s is a PCI bridge: pass the devices behind it", d.Addr)
	}
	if d.Group < 0 {
		if !h.hasIOMMU() {
			return errcode.New(errcode.IOMMUUnavailable, "pci device %s: this host has no IOMMU (no groups under /sys/kernel/iommu_groups): enable VT-d or AMD-Vi in the firmware and intel_iommu=on or amd_iommu=on on the kernel command line", d.Addr)
		}
		return errcode.New(errcode.IOMMUUnavailable, "pci device %s has no IOMMU group", d.Addr)
	}
	switch d.Driver {
	case "vfio-pci":
	case "":
		if _, err := os.Stat(h.sys("bus/pci/drivers/vfio-pci")); err != nil {
			return errcode.New(errcode.IOMMUUnavailable, "pci device %s: vfio-pci is not loaded (modprobe vfio-pci)", d.Addr)
		}
	default:
		return errcode.New(errcode.DeviceBusy, "pci device %s is bound to the host driver %s: bind it to vfio-pci first (driver_override)", d.Addr, d.Driver)
	}
	if _, err := os.Stat(h.dev("vfio/vfio")); err != nil {
		return errcode.New(errcode.IOMMUUnavailable, "pci device %s: %s is missing: vfio is not loaded", d.Addr, h.dev("vfio/vfio"))
	}
	members, err := h.groupMembers(d.Group)
	if err != nil {
		return err
	}
	for _, m := range members {
		if m == d.Addr {
			continue
		}
		md, err := h.readPCI(m)
		if err != nil {
			return errcode.Wrap(errcode.Internal, err, "iommu group %d", d.Group)
		}
		if !groupSafeDrivers[md.Driver] && !md.isBridge() {
			return errcode.New(errcode.DeviceBusy, "pci device %s: its IOMMU group %d also holds %s, bound to the host driver %s: bind every device of the group to vfio-pci", d.Addr, d.Group, m, md.Driver)
		}
	}
	return nil
}

// listPCI lists the PCI addresses of the host, sorted.
func (h *Host) listPCI() ([]string, error) {
	ents, err := os.ReadDir(h.sys("bus/pci/devices"))
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "list pci devices")
	}
	out := make([]string, 0, len(ents))
	for _, e := range ents {
		out = append(out, e.Name())
	}
	sort.Strings(out)
	return out, nil
}
