package hostdev

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// VFIO device kinds.
const (
	KindPCI  = "pci"  // a PCI device (seed dev_type PCI)
	KindGPU  = "gpu"  // a whole GPU (PHYSICAL)
	KindVF   = "vf"   // an SR-IOV virtual function (SRIOV)
	KindMdev = "mdev" // a mediated device (MDEV)
)

// Plan is the host resources a Spec resolved to on this host. It is
// JSON-encodable: persist it with the running VM, since Release needs it
// after an agent restart.
type Plan struct {
	VM   string    `json:"vm"`
	VFIO []VFIODev `json:"vfio,omitempty"`
	USB  []USBDev  `json:"usb,omitempty"`
	TPM  *TPMDev   `json:"tpm,omitempty"`

	// Set by Acquire for Release.
	Grants []Grant   `json:"grants,omitempty"`
	Bound  []string  `json:"bound,omitempty"`   // functions Acquire bound to vfio-pci
	Made   []MdevDev `json:"created,omitempty"` // mdevs Acquire created
}

// VFIODev is one device QEMU gets through vfio-pci.
type VFIODev struct {
	Kind    string   `json:"kind"`
	Address string   `json:"address,omitempty"` // PCI functions (not mdevs)
	PF      string   `json:"pf,omitempty"`      // a VF's physical function
	Mdev    *MdevDev `json:"mdev,omitempty"`
	Group   int      `json:"iommu_group"` // -1: an mdev Acquire creates
	Vendor  string   `json:"vendor,omitempty"`
	Device  string   `json:"device,omitempty"`
	// Driver is the function's driver when resolved: "vfio-pci", or ""
	// for an unbound function that Acquire binds.
	Driver string `json:"driver,omitempty"`
}

// MdevDev is a mediated device.
type MdevDev struct {
	UUID   string `json:"uuid"`
	Parent string `json:"parent"`
	Type   string `json:"type"`
	// Create: the mdev does not exist yet; Acquire creates it from Type on
	// Parent, Release removes it.
	Create bool `json:"create,omitempty"`
}

// USBDev is a host USB device.
type USBDev struct {
	Name    string `json:"name"` // sysfs name, the port path: "1-1.2"
	Bus     int    `json:"bus"`
	Dev     int    `json:"dev"`
	Vendor  string `json:"vendor"`
	Product string `json:"product"`
	Node    string `json:"node"` // /dev/bus/usb/BBB/DDD, opened read-write for QEMU
}

// TPMDev is the host TPM. Path is opened read-write for QEMU, Cancel
// write-only: the TPM 1.2 sysfs cancel file, or /dev/null for a TPM 2.0,
// which has none (the kernel gives TPM 2.0 chips no legacy attributes;
// QEMU writes "-" to it to cancel a command and only logs a failure).
type TPMDev struct {
	Path    string `json:"path"`
	Cancel  string `json:"cancel"`
	Version int    `json:"version"`
}

// Grant is a device node's owner and mode before Acquire gave it to the
// QEMU user; Release puts them back.
type Grant struct {
	Path string `json:"path"`
	UID  int    `json:"uid"`
	GID  int    `json:"gid"`
	Mode uint32 `json:"mode"`
}

// Clone returns a copy of p that shares nothing with it.
func (p *Plan) Clone() *Plan {
	if p == nil {
		return nil
	}
	q := *p
	q.VFIO = slices.Clone(p.VFIO)
	for i, d := range q.VFIO {
		if d.Mdev != nil {
			m := *d.Mdev
			q.VFIO[i].Mdev = &m
		}
	}
	q.USB = slices.Clone(p.USB)
	if p.TPM != nil {
		t := *p.TPM
		q.TPM = &t
	}
	q.Grants = slices.Clone(p.Grants)
	q.Bound = slices.Clone(p.Bound)
	q.Made = slices.Clone(p.Made)
	return &q
}

// Keys name the plan's devices for Holders: the PCI function and
// its IOMMU group (VFIO opens a whole group at once), the mdev, the USB
// port, the TPM.
func (p *Plan) Keys() []string {
	var k []string
	for _, d := range p.VFIO {
		if d.Mdev != nil {
			k = append(k, "mdev:"+d.Mdev.UUID)
		} else {
			k = append(k, "pci:"+d.Address)
		}
		if d.Group >= 0 && d.Mdev == nil {
			k = append(k, "iommu_group:"+strconv.Itoa(d.Group))
		}
	}
	for _, u := range p.USB {
		k = append(k, "usb:"+u.Name)
	}
	if p.TPM != nil {
		k = append(k, "tpm:"+p.TPM.Path)
	}
	return k
}

// Resolve checks s against this host and returns the resources it maps to
// for VM vmUUID; held says which devices other VMs hold (a free VF is
// picked past them). It changes nothing on the host (see Acquire) and
// claims nothing: the caller records the plan as the VM's under the lock
// held guards.
//
// Errors: validation_failed (the request, or a device that cannot be
// passed: a bridge, a hub), device_not_found, iommu_unavailable,
// device_busy (bound to a host driver, held by another VM, no free VF or
// mdev instance).
func (h *Host) Resolve(ctx context.Context, vmUUID string, s *Spec, held Holders) (*Plan, error) {
	vm, err := uuid.Parse(vmUUID)
	if err != nil {
		return nil, errcode.New(errcode.ValidationFailed, "vm uuid %q is invalid", vmUUID)
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	p := &Plan{VM: vmUUID}
	if s == nil {
		return p, nil
	}
	taken := map[string]bool{} // keys this plan already holds
	for _, r := range s.PCI {
		addr, _ := ParsePCIAddress(r.Address)
		d, err := h.vfioPCI(KindPCI, addr)
		if err != nil {
			return nil, err
		}
		taken["pci:"+addr] = true
		p.VFIO = append(p.VFIO, *d)
	}
	for i, g := range s.GPU {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		d, err := h.resolveGPU(vm, i, g, p, taken, held)
		if err != nil {
			return nil, err
		}
		if d.Address != "" {
			taken["pci:"+d.Address] = true
		}
		p.VFIO = append(p.VFIO, *d)
	}
	for i, u := range s.USB {
		d, err := h.resolveUSB(i, u)
		if err != nil {
			return nil, err
		}
		for _, o := range p.USB {
			if o.Name == d.Name {
				return nil, errcode.New(errcode.ValidationFailed, "usb %d: usb device %s (%d:%d) is requested twice", i, d.Name, d.Bus, d.Dev)
			}
		}
		p.USB = append(p.USB, *d)
	}
	if s.TPM != nil {
		t, err := h.resolveTPM(s.TPM)
		if err != nil {
			return nil, err
		}
		p.TPM = t
	}
	// Two requests may reach one function (pci and a GPU by vendor id),
	// or two functions one IOMMU group: fine, the group goes to one VM.
	seen := map[string]bool{}
	for _, d := range p.VFIO {
		if d.Mdev == nil {
			if seen[d.Address] {
				return nil, errcode.New(errcode.ValidationFailed, "pci device %s is requested twice", d.Address)
			}
			seen[d.Address] = true
		}
	}
	if err := held.Check(vmUUID, p.Keys()); err != nil {
		return nil, err
	}
	return p, nil
}

// vfioPCI checks a PCI function for vfio-pci and describes it.
func (h *Host) vfioPCI(kind, addr string) (*VFIODev, error) {
	d, err := h.readPCI(addr)
	if err != nil {
		return nil, err
	}
	if err := h.checkVFIO(d); err != nil {
		return nil, err
	}
	return &VFIODev{Kind: kind, Address: addr, Group: d.Group, Vendor: d.Vendor, Device: d.Device, Driver: d.Driver}, nil
}

func (h *Host) resolveGPU(vm uuid.UUID, i int, g GPU, p *Plan, taken map[string]bool, held Holders) (*VFIODev, error) {
	switch g.Type {
	case GPUPhysical:
		addr, err := h.findGPU(i, g)
		if err != nil {
			return nil, err
		}
		d, err := h.readPCI(addr)
		if err != nil {
			return nil, err
		}
		if !d.isDisplay() {
			return nil, errcode.New(errcode.ValidationFailed, "gpu %d: pci device %s is not a display controller (class 0x%06x): pass it as a PCI device", i, addr, d.Class)
		}
		return h.vfioPCI(KindGPU, addr)
	case GPUSRIOV:
		pf, _ := ParsePCIAddress(g.PCI)
		return h.pickVF(i, pf, p.VM, taken, held)
	case GPUMdev:
		return h.resolveMdev(vm, i, g, p.VM, taken)
	}
	return nil, errcode.New(errcode.ValidationFailed, "gpu %d: gpu_type %q is not supported", i, g.Type)
}

// findGPU finds a PHYSICAL GPU's address: pci, DRM card id, or the one
// display controller with the vendor (and product) id.
func (h *Host) findGPU(i int, g GPU) (string, error) {
	if g.PCI != "" {
		return ParsePCIAddress(g.PCI)
	}
	if g.ID != "" {
		card := h.sys("class/drm", "card"+g.ID, "device")
		t, err := filepath.EvalSymlinks(card)
		if err != nil {
			return "", errcode.New(errcode.DeviceNotFound, "gpu %d: no DRM card %s on this host", i, g.ID)
		}
		addr := filepath.Base(t)
		if _, err := ParsePCIAddress(addr); err != nil {
			return "", errcode.New(errcode.ValidationFailed, "gpu %d: DRM card %s is not a PCI device (%s)", i, g.ID, addr)
		}
		return addr, nil
	}
	vendor, _ := parseHexID("vendorid", g.VendorID)
	product := ""
	if g.ProductID != "" {
		product, _ = parseHexID("productid", g.ProductID)
	}
	all, err := h.listPCI()
	if err != nil {
		return "", err
	}
	var match []string
	for _, a := range all {
		d, err := h.readPCI(a)
		if err != nil {
			return "", err
		}
		if d.isDisplay() && d.Vendor == vendor && (product == "" || d.Device == product) {
			match = append(match, a)
		}
	}
	what := vendor
	if product != "" {
		what += ":" + product
	}
	switch len(match) {
	case 0:
		return "", errcode.New(errcode.DeviceNotFound, "gpu %d: no GPU %s on this host", i, what)
	case 1:
		return match[0], nil
	}
	return "", errcode.New(errcode.ValidationFailed, "gpu %d: %d GPUs match %s (%s): give pci", i, len(match), what, strings.Join(match, ", "))
}

// pickVF picks the first virtual function of pf that no VM holds, that no
// host driver holds and that passes checkVFIO.
func (h *Host) pickVF(i int, pf, vm string, taken map[string]bool, held Holders) (*VFIODev, error) {
	if _, err := h.readPCI(pf); err != nil {
		return nil, err
	}
	numvfs, err := readAttr(h.sys("bus/pci/devices", pf, "sriov_numvfs"))
	if err != nil {
		return nil, errcode.New(errcode.ValidationFailed, "gpu %d: pci device %s is not SR-IOV capable", i, pf)
	}
	n, err := strconv.Atoi(numvfs)
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "gpu %d: %s sriov_numvfs", i, pf)
	}
	if n == 0 {
		return nil, errcode.New(errcode.DeviceNotFound, "gpu %d: %s has no virtual functions enabled (write the count to its sriov_numvfs)", i, pf)
	}
	var reasons []string
	for k := 0; k < n; k++ {
		vf := linkBase(h.sys("bus/pci/devices", pf, "virtfn"+strconv.Itoa(k)))
		if vf == "" {
			continue
		}
		if taken["pci:"+vf] {
			continue
		}
		if owner := held.heldByOther(vm, "pci:"+vf); owner != "" {
			reasons = append(reasons, vf+" held by VM "+owner)
			continue
		}
		d, err := h.vfioPCI(KindVF, vf)
		if err != nil {
			reasons = append(reasons, errcode.MessageOf(err))
			continue
		}
		if owner := held.heldByOther(vm, "iommu_group:"+strconv.Itoa(d.Group)); owner != "" {
			reasons = append(reasons, vf+"'s IOMMU group held by VM "+owner)
			continue
		}
		d.PF = pf
		taken["pci:"+vf] = true
		return d, nil
	}
	return nil, errcode.New(errcode.DeviceBusy, "gpu %d: no free virtual function on %s (%s)", i, pf, strings.Join(reasons, "; "))
}

// MdevUUID is the UUID of the mdev created for GPU index i of VM vm: fixed
// for a VM and a device index, so an agent that restarts finds its mdevs.
func MdevUUID(vm uuid.UUID, i int) string {
	return uuid.NewSHA1(vm, []byte("otherix-mdev-"+strconv.Itoa(i))).String()
}

func (h *Host) resolveMdev(vm uuid.UUID, i int, g GPU, vmStr string, taken map[string]bool) (*VFIODev, error) {
	if _, err := os.Stat(h.sys("bus/mdev")); err != nil {
		return nil, errcode.New(errcode.DeviceNotFound, "gpu %d: this host has no mediated devices (no /sys/bus/mdev: load the GPU's vGPU driver)", i)
	}
	if uuidRE.MatchString(g.Mdev) {
		id := strings.ToLower(g.Mdev)
		m, group, err := h.readMdev(id)
		if err != nil {
			return nil, errcode.New(errcode.DeviceNotFound, "gpu %d: no mdev %s on this host", i, id)
		}
		if g.PCI != "" {
			if pf, _ := ParsePCIAddress(g.PCI); pf != m.Parent {
				return nil, errcode.New(errcode.ValidationFailed, "gpu %d: mdev %s is on %s, not %s", i, id, m.Parent, pf)
			}
		}
		return &VFIODev{Kind: KindMdev, Mdev: m, Group: group}, nil
	}
	// A type: create an instance on the parent at pci, or on the first
	// parent that has one left.
	id := MdevUUID(vm, i)
	if m, group, err := h.readMdev(id); err == nil {
		// Made by an earlier start of this VM and never removed (the agent
		// died): take it over; Acquire finds it there, Release removes it.
		if m.Type != g.Mdev {
			return nil, errcode.New(errcode.Conflict, "gpu %d: mdev %s of this VM exists with type %s, not %s: remove it (echo 1 > /sys/bus/mdev/devices/%s/remove)", i, id, m.Type, g.Mdev, id)
		}
		m.Create = true
		return &VFIODev{Kind: KindMdev, Mdev: m, Group: group}, nil
	}
	var parents []string
	if g.PCI != "" {
		pf, _ := ParsePCIAddress(g.PCI)
		if _, err := h.readPCI(pf); err != nil {
			return nil, err
		}
		if _, err := os.Stat(h.sys("bus/pci/devices", pf, "mdev_supported_types")); err != nil {
			return nil, errcode.New(errcode.ValidationFailed, "gpu %d: pci device %s offers no mediated devices", i, pf)
		}
		parents = []string{pf}
	} else {
		ents, _ := os.ReadDir(h.sys("class/mdev_bus"))
		for _, e := range ents {
			parents = append(parents, e.Name())
		}
		sort.Strings(parents)
	}
	found := false
	var offered []string
	for _, parent := range parents {
		td := h.sys("bus/pci/devices", parent, "mdev_supported_types", g.Mdev)
		if _, err := os.Stat(td); err != nil {
			ents, _ := os.ReadDir(h.sys("bus/pci/devices", parent, "mdev_supported_types"))
			for _, e := range ents {
				offered = append(offered, e.Name())
			}
			continue
		}
		found = true
		avail, err := readAttr(filepath.Join(td, "available_instances"))
		if err != nil {
			return nil, errcode.Wrap(errcode.Internal, err, "gpu %d: mdev type %s on %s", i, g.Mdev, parent)
		}
		if n, _ := strconv.Atoi(avail); n-countMade(taken, parent, g.Mdev) <= 0 {
			continue
		}
		taken["made:"+parent+"/"+g.Mdev+"/"+id] = true
		return &VFIODev{Kind: KindMdev, Mdev: &MdevDev{UUID: id, Parent: parent, Type: g.Mdev, Create: true}, Group: -1}, nil
	}
	if !found {
		if len(offered) > 0 {
			return nil, errcode.New(errcode.DeviceNotFound, "gpu %d: no parent offers mdev type %s (types offered: %s)", i, g.Mdev, strings.Join(uniq(offered), ", "))
		}
		return nil, errcode.New(errcode.DeviceNotFound, "gpu %d: no parent offers mdev type %s", i, g.Mdev)
	}
	return nil, errcode.New(errcode.DeviceBusy, "gpu %d: no instance of mdev type %s is left", i, g.Mdev)
}

// countMade counts the instances of a type this plan already takes.
func countMade(taken map[string]bool, parent, typ string) int {
	n := 0
	prefix := "made:" + parent + "/" + typ + "/"
	for k := range taken {
		if strings.HasPrefix(k, prefix) {
			n++
		}
	}
	return n
}

func uniq(xs []string) []string {
	sort.Strings(xs)
	out := xs[:0]
	for i, x := range xs {
		if i == 0 || x != xs[i-1] {
			out = append(out, x)
		}
	}
	return out
}

// readMdev reads an existing mdev: its parent, type and IOMMU group.
func (h *Host) readMdev(id string) (*MdevDev, int, error) {
	dir, err := filepath.EvalSymlinks(h.sys("bus/mdev/devices", id))
	if err != nil {
		return nil, -1, err
	}
	m := &MdevDev{UUID: id, Parent: filepath.Base(filepath.Dir(dir)), Type: linkBase(filepath.Join(dir, "mdev_type"))}
	group := -1
	if g := linkBase(filepath.Join(dir, "iommu_group")); g != "" {
		group, _ = strconv.Atoi(g)
	}
	return m, group, nil
}

// usbInfo is what sysfs says about one USB device.
type usbInfo struct {
	name            string
	bus, dev        int
	vendor, product string
	class           string
}

func (h *Host) readUSB(name string) (*usbInfo, error) {
	dir := h.sys("bus/usb/devices", name)
	u := &usbInfo{name: name}
	var err error
	read := func(f string) string {
		if err != nil {
			return ""
		}
		var v string
		v, err = readAttr(filepath.Join(dir, f))
		return v
	}
	bus, dev := read("busnum"), read("devnum")
	u.vendor, u.product, u.class = read("idVendor"), read("idProduct"), read("bDeviceClass")
	if err != nil {
		return nil, err
	}
	if u.bus, err = strconv.Atoi(bus); err != nil {
		return nil, err
	}
	if u.dev, err = strconv.Atoi(dev); err != nil {
		return nil, err
	}
	return u, nil
}

func (h *Host) resolveUSB(i int, r USB) (*USBDev, error) {
	ents, err := os.ReadDir(h.sys("bus/usb/devices"))
	if err != nil {
		return nil, errcode.New(errcode.DeviceNotFound, "usb %d: this host has no USB bus", i)
	}
	vendor, product := "", ""
	if r.VendorID != "" {
		vendor, _ = parseHexID("vendor_id", r.VendorID)
	}
	if r.ProductID != "" {
		product, _ = parseHexID("product_id", r.ProductID)
	}
	var match []*usbInfo
	for _, e := range ents {
		name := e.Name()
		if strings.Contains(name, ":") || strings.HasPrefix(name, "usb") {
			continue // an interface, or a root hub
		}
		u, err := h.readUSB(name)
		if err != nil {
			continue // gone while we looked
		}
		if r.Bus != nil && (u.bus != *r.Bus || u.dev != *r.Dev) {
			continue
		}
		if vendor != "" && (u.vendor != vendor || product != "" && u.product != product) {
			continue
		}
		match = append(match, u)
	}
	what := ""
	if r.Bus != nil {
		what = fmt.Sprintf("at %d:%d", *r.Bus, *r.Dev)
	}
	if vendor != "" {
		id := vendor
		if product != "" {
			id += ":" + product
		}
		what = strings.TrimSpace(what + " with id " + id)
	}
	switch len(match) {
	case 0:
		return nil, errcode.New(errcode.DeviceNotFound, "usb %d: no usb device %s on this host", i, what)
	case 1:
	default:
		var names []string
		for _, m := range match {
			names = append(names, fmt.Sprintf("%s at %d:%d", m.name, m.bus, m.dev))
		}
		return nil, errcode.New(errcode.ValidationFailed, "usb %d: %d usb devices %s (%s): give bus and dev", i, len(match), what, strings.Join(names, ", "))
	}
	u := match[0]
	if u.class == "09" {
		return nil, errcode.New(errcode.ValidationFailed, "usb %d: usb device %s is a hub: pass the devices behind it", i, u.name)
	}
	node := h.dev("bus/usb", fmt.Sprintf("%03d", u.bus), fmt.Sprintf("%03d", u.dev))
	if _, err := os.Stat(node); err != nil {
		return nil, errcode.New(errcode.DeviceNotFound, "usb %d: usb device %s has no node %s", i, u.name, node)
	}
	return &USBDev{Name: u.name, Bus: u.bus, Dev: u.dev, Vendor: u.vendor, Product: u.product, Node: node}, nil
}

func (h *Host) resolveTPM(r *TPM) (*TPMDev, error) {
	name := filepath.Base(r.Path)
	node := h.dev(name)
	fi, err := os.Stat(node)
	if err != nil {
		return nil, errcode.New(errcode.DeviceNotFound, "tpm: no %s on this host", r.Path)
	}
	if fi.IsDir() {
		return nil, errcode.New(errcode.ValidationFailed, "tpm: %s is not a device", r.Path)
	}
	cls := h.sys("class/tpm", name)
	if _, err := os.Stat(cls); err != nil {
		return nil, errcode.New(errcode.DeviceNotFound, "tpm: %s has no TPM chip in sysfs (%s)", r.Path, cls)
	}
	t := &TPMDev{Path: node, Cancel: "/dev/null", Version: 2}
	if v, err := readAttr(filepath.Join(cls, "tpm_version_major")); err == nil {
		t.Version, _ = strconv.Atoi(v)
	}
	if c := filepath.Join(cls, "device", "cancel"); fileExists(c) {
		t.Cancel = c
	}
	return t, nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// OpenError turns the error of opening a plan's device node (a USB node,
// the TPM) into a coded error: EBUSY is device_busy (a TPM opens once:
// another VM, tpm2-abrmd or a tool holds it), a missing device is
// device_not_found.
func OpenError(path string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, syscall.EBUSY):
		return errcode.Wrap(errcode.DeviceBusy, err, "%s is in use by another process", path)
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ENODEV), errors.Is(err, syscall.ENXIO):
		return errcode.Wrap(errcode.DeviceNotFound, err, "%s is gone", path)
	}
	return errcode.Wrap(errcode.Internal, err, "open %s", path)
}
