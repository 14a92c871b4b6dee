// Package hostdev passes host devices through to VMs: PCI functions and
// GPUs (whole, SR-IOV virtual functions and mediated devices) through VFIO,
// USB devices through usbfs, and a host TPM. It covers the GPU, PCI, USB
// and TPM devices of seed 000 (virt.instance.create).
//
// A device goes through three steps:
//
//  1. [Spec.Validate]: the request alone (address syntax, GPU type and
//     its fields), validation_failed.
//  2. [Host.Resolve]: the request against this host's sysfs: the device
//     exists (device_not_found), the host has an IOMMU and the device an
//     IOMMU group (iommu_unavailable), every member of that group is bound
//     to vfio-pci or may share a group with it, and no other VM of this
//     host holds it (device_busy, from the [Holders] the caller derived
//     from its VMs). The answer is a [Plan]: the concrete host resources
//     (a VF chosen, an mdev UUID, a USB bus and address), JSON-encodable
//     to persist with the VM. The caller claims the devices by recording
//     the plan as the VM's, under the same lock as it derived Holders.
//  3. [Host.Acquire] before QEMU starts, [Host.Release] after it exits:
//     create mdevs, bind unbound functions to vfio-pci, and give the QEMU
//     user the VFIO group nodes (below).
//
// [Plan.Args] writes QEMU's options; golden files under testdata/.
//
// # QEMU is unprivileged
//
// QEMU runs as an unprivileged user with no capabilities and opens no file
// by path: the engine passes descriptors (-add-fd, /dev/fdset/N). What
// each device needs:
//
//   - USB: usb-host,hostdevice=/dev/fdset/N. QEMU (7.2, libusb ≥ 1.0.23)
//     takes an open usbfs node and wraps it (libusb_wrap_sys_device); the
//     agent opens /dev/bus/usb/BBB/DDD read-write and passes it. No change
//     of ownership, no path on the command line.
//   - TPM: -tpmdev passthrough,path=/dev/fdset/N,cancel-path=/dev/fdset/M.
//     Both options go through qemu_open, so both take fd sets: /dev/tpmN
//     opened read-write (an exclusive open: the kernel answers EBUSY while
//     another process holds it, which [OpenError] turns into device_busy)
//     and the cancel file write-only. A TPM 2.0 has no sysfs cancel file,
//     so the cancel file is /dev/null (see [TPMDev]).
//   - VFIO (PCI, GPU, SR-IOV VF, mdev): QEMU 7.2's vfio-pci has no fd
//     option (host= or sysfsdev= only); it opens /dev/vfio/vfio (0666)
//     and /dev/vfio/<group> itself. So the agent gives the group node to
//     the QEMU user while the VM runs and gives it back afterwards: the
//     discretionary-access approach. [Host.Acquire] records each node's
//     owner and mode in the Plan and chowns it to the QEMU user (mode
//     0600); [Host.Release] restores what it recorded. A VFIO group can be
//     open in one process at a time, so once QEMU holds it no other
//     process, of the same user or not, can open it. VFIO also pins guest
//     memory: QEMU needs RLIMIT_MEMLOCK of at least the guest's RAM
//     ([MemlockBytes]), which an unprivileged process cannot raise itself.
//
// # What the tests prove
//
// No passthrough hardware exists on the machine this was written on (no
// IOMMU groups, CONFIG_VFIO off, no USB bus, no TPM). The real kernel's
// /sys is read in TestRealSysfs (its PCI devices resolve to
// iommu_unavailable, absent ones to device_not_found) and its PCI layout is
// compared with the fake tree's (TestTreeMatchesRealSysfs). Everything
// else (IOMMU groups, vfio-pci binding, SR-IOV, mdev, USB, TPM sysfs) runs
// on fake trees built by package sysfstest from the kernel's documented
// layout. Real QEMU 7.2 checks the command lines: the TPM passthrough with
// both fd sets works end to end against a TPM 2.0 (swtpm on a socket pair
// standing in for /dev/tpm0), usb-host takes its fd set (and fails only in
// libusb, the fd not being a usbfs node), vfio-pci fails only at realize
// ("no iommu_group found"), and the root-port topology holds PCIe devices.
//
// Through the engine (agent/vm, agent): a host TPM 2.0 passes through end
// to end, the booted guest using it, with a pseudo-terminal to swtpm
// bind-mounted on the fake tree's /dev/tpm0 as the chip
// (sysfstest.BackTPM); a second VM asking for it gets device_busy, also
// after an agent restart; failed starts (vfio-pci, usb-host on a node that
// is not usbfs, a TPM node no driver backs) leave the fake tree as they
// found it.
package hostdev

import (
	"regexp"
	"strings"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// GPU types (seed 000 gpu_type).
const (
	GPUPhysical = "PHYSICAL"
	GPUMdev     = "MDEV"
	GPUMIG      = "MIG"
	GPUSRIOV    = "SRIOV"
)

// Spec is the host devices a VM asks for: seed 000's PCI, GPU, USB and TPM
// devices. It is persisted with the VM.
type Spec struct {
	PCI []PCI `json:"pci,omitempty"`
	GPU []GPU `json:"gpu,omitempty"`
	USB []USB `json:"usb,omitempty"`
	TPM *TPM  `json:"tpm,omitempty"`
}

// Empty reports whether s asks for no device.
func (s *Spec) Empty() bool {
	return s == nil || len(s.PCI) == 0 && len(s.GPU) == 0 && len(s.USB) == 0 && s.TPM == nil
}

// PCI is a PCI function passed through whole (seed: dev_type PCI).
type PCI struct {
	Address string `json:"address"` // DDDD:BB:DD.F
}

// GPU is a GPU (seed: dev_type GPU). Which fields apply depends on Type:
//
//   - PHYSICAL: the GPU at PCI, or the one display-class device matching
//     VendorID (and ProductID), or DRM card ID; passed whole.
//   - SRIOV: a free virtual function of the physical function at PCI.
//   - MDEV: Mdev is either the UUID of an existing mediated device or a
//     type (e.g. "nvidia-63", "i915-GVTg_V5_4") to create one from, on the
//     parent at PCI or on any parent offering the type.
//   - MIG: refused. A MIG instance is handed to containers; a VM gets a
//     slice of a MIG-capable GPU as a MIG-backed vGPU, an MDEV.
//
// UID, GID and Mode are container options; set for a VM they are refused.
type GPU struct {
	Type      string `json:"gpu_type"`
	ID        string `json:"id,omitempty"`
	PCI       string `json:"pci,omitempty"`
	Mdev      string `json:"mdev,omitempty"`
	MIGUUID   string `json:"mig_uuid,omitempty"`
	VendorID  string `json:"vendorid,omitempty"`
	ProductID string `json:"productid,omitempty"`
	UID       *int   `json:"uid,omitempty"`
	GID       *int   `json:"gid,omitempty"`
	Mode      string `json:"mode,omitempty"`
}

// USB is a host USB device, by bus and device number or by vendor and
// product ID (seed: dev_type USB).
type USB struct {
	Bus       *int   `json:"bus,omitempty"`
	Dev       *int   `json:"dev,omitempty"`
	VendorID  string `json:"vendor_id,omitempty"`
	ProductID string `json:"product_id,omitempty"`
}

// TPM is the host's TPM (seed: dev_type TPM). Path is the raw device,
// /dev/tpmN; PathRM, the resource manager /dev/tpmrmN, is a container
// option: QEMU passes the raw TPM through.
type TPM struct {
	Path   string `json:"path"`
	PathRM string `json:"pathrm,omitempty"`
}

var (
	pciAddrRE = regexp.MustCompile(`^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[01][0-9a-fA-F]\.[0-7]$`)
	uuidRE    = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
	hexIDRE   = regexp.MustCompile(`^(0[xX])?[0-9a-fA-F]{1,4}$`)
	mdevTypRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$`)
	tpmRE     = regexp.MustCompile(`^/dev/tpm[0-9]{1,3}$`)
	tpmRMRE   = regexp.MustCompile(`^/dev/tpmrm[0-9]{1,3}$`)
	drmIDRE   = regexp.MustCompile(`^[0-9]{1,3}$`)
)

// ParsePCIAddress checks a PCI address in the full DDDD:BB:DD.F form
// (domain, bus, device 00-1f, function 0-7) and returns it in lower case,
// as sysfs names it.
func ParsePCIAddress(s string) (string, error) {
	if !pciAddrRE.MatchString(s) {
		return "", errcode.New(errcode.ValidationFailed, "pci address %q is invalid: use DDDD:BB:DD.F, e.g. 0000:01:00.0", s)
	}
	return strings.ToLower(s), nil
}

// parseHexID normalizes a 16-bit vendor or product ID ("10DE", "0x10de")
// to four lower-case hex digits.
func parseHexID(field, s string) (string, error) {
	if !hexIDRE.MatchString(s) {
		return "", errcode.New(errcode.ValidationFailed, "%s %q is not a 16-bit hex ID, e.g. 10de", field, s)
	}
	s = strings.ToLower(strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X"))
	return strings.Repeat("0", 4-len(s)) + s, nil
}

// Validate checks the request alone, without looking at the host.
func (s *Spec) Validate() error {
	if s == nil {
		return nil
	}
	seen := map[string]bool{}
	dup := func(key, what string) error {
		if seen[key] {
			return errcode.New(errcode.ValidationFailed, "%s is requested twice", what)
		}
		seen[key] = true
		return nil
	}
	for _, p := range s.PCI {
		a, err := ParsePCIAddress(p.Address)
		if err != nil {
			return err
		}
		if err := dup("pci:"+a, "pci device "+a); err != nil {
			return err
		}
	}
	for i, g := range s.GPU {
		if err := g.validate(i); err != nil {
			return err
		}
		if g.PCI != "" && g.Type == GPUPhysical {
			a, _ := ParsePCIAddress(g.PCI)
			if err := dup("pci:"+a, "pci device "+a); err != nil {
				return err
			}
		}
		if g.Type == GPUMdev && uuidRE.MatchString(g.Mdev) {
			if err := dup("mdev:"+strings.ToLower(g.Mdev), "mdev "+g.Mdev); err != nil {
				return err
			}
		}
	}
	for i, u := range s.USB {
		if err := u.validate(i); err != nil {
			return err
		}
	}
	if t := s.TPM; t != nil {
		if !tpmRE.MatchString(t.Path) {
			if tpmRMRE.MatchString(t.Path) {
				return errcode.New(errcode.ValidationFailed, "tpm path %q is the resource manager: QEMU passes the raw TPM through, use /dev/tpmN", t.Path)
			}
			return errcode.New(errcode.ValidationFailed, "tpm path %q is invalid: use /dev/tpmN, e.g. /dev/tpm0", t.Path)
		}
		if t.PathRM != "" && !tpmRMRE.MatchString(t.PathRM) {
			return errcode.New(errcode.ValidationFailed, "tpm pathrm %q is invalid: use /dev/tpmrmN", t.PathRM)
		}
	}
	return nil
}

func (g *GPU) validate(i int) error {
	bad := func(format string, args ...any) error {
		return errcode.New(errcode.ValidationFailed, "gpu %d: "+format, append([]any{i}, args...)...)
	}
	if g.UID != nil || g.GID != nil || g.Mode != "" {
		return bad("uid, gid and mode apply to containers only")
	}
	if g.PCI != "" {
		if _, err := ParsePCIAddress(g.PCI); err != nil {
			return bad("%s", errcode.MessageOf(err))
		}
	}
	for _, f := range []struct{ name, v string }{{"vendorid", g.VendorID}, {"productid", g.ProductID}} {
		if f.v != "" {
			if _, err := parseHexID(f.name, f.v); err != nil {
				return bad("%s", errcode.MessageOf(err))
			}
		}
	}
	if g.ID != "" && !drmIDRE.MatchString(g.ID) {
		return bad("id %q is not a DRM card number", g.ID)
	}
	switch g.Type {
	case GPUPhysical:
		if g.PCI == "" && g.VendorID == "" && g.ID == "" {
			return bad("a PHYSICAL GPU needs pci, vendorid or id")
		}
		if g.ProductID != "" && g.VendorID == "" {
			return bad("productid needs vendorid")
		}
		if g.Mdev != "" || g.MIGUUID != "" {
			return bad("mdev and mig_uuid do not apply to a PHYSICAL GPU")
		}
	case GPUSRIOV:
		if g.PCI == "" {
			return bad("an SRIOV GPU needs pci, the address of the physical function")
		}
		if g.Mdev != "" || g.MIGUUID != "" {
			return bad("mdev and mig_uuid do not apply to an SRIOV GPU")
		}
	case GPUMdev:
		if g.Mdev == "" {
			return bad("an MDEV GPU needs mdev: an mdev UUID or an mdev type such as nvidia-63")
		}
		if !uuidRE.MatchString(g.Mdev) && !mdevTypRE.MatchString(g.Mdev) {
			return bad("mdev %q is neither a UUID nor an mdev type name", g.Mdev)
		}
		if g.MIGUUID != "" {
			return bad("mig_uuid does not apply to an MDEV GPU")
		}
	case GPUMIG:
		return bad("MIG GPUs are for containers: give a VM a MIG slice as a MIG-backed vGPU (gpu_type MDEV with the vGPU type)")
	case "":
		return bad("gpu_type is required: PHYSICAL, MDEV or SRIOV")
	default:
		return bad("gpu_type %q is unknown: use PHYSICAL, MDEV or SRIOV", g.Type)
	}
	return nil
}

func (u *USB) validate(i int) error {
	bad := func(format string, args ...any) error {
		return errcode.New(errcode.ValidationFailed, "usb %d: "+format, append([]any{i}, args...)...)
	}
	if (u.Bus == nil) != (u.Dev == nil) {
		return bad("bus and dev go together")
	}
	if u.Bus != nil {
		if *u.Bus < 1 || *u.Bus > 255 {
			return bad("bus %d is out of range 1..255", *u.Bus)
		}
		if *u.Dev < 1 || *u.Dev > 127 {
			return bad("dev %d is out of range 1..127", *u.Dev)
		}
	}
	if u.ProductID != "" && u.VendorID == "" {
		return bad("product_id needs vendor_id")
	}
	if u.Bus == nil && u.VendorID == "" {
		return bad("give bus and dev, or vendor_id (and product_id)")
	}
	for _, f := range []struct{ name, v string }{{"vendor_id", u.VendorID}, {"product_id", u.ProductID}} {
		if f.v != "" {
			if _, err := parseHexID(f.name, f.v); err != nil {
				return bad("%s", errcode.MessageOf(err))
			}
		}
	}
	return nil
}
