package hostdev

import (
	"fmt"
	"os"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Layout is where the plan's devices go in the guest.
type Layout struct {
	Arch string // "amd64" (default) or "arm64": picks the TPM front end
	Bus  string // the root bus, default "pcie.0"
	// PortSlot is the first slot of Bus for the root ports of VFIO devices
	// (default 0x18). Each device gets its own pcie-root-port, eight per
	// slot as functions of a multifunction slot, so a GPU sits on a PCIe
	// link as its drivers expect; PortSlots slots are used at most
	// (default 7: 0x18 to 0x1e, 56 devices).
	PortSlot  int
	PortSlots int
	// Chassis is the chassis number of the first root port (default
	// 0x40); root ports need distinct ones.
	Chassis int
	// XHCISlot is the slot of Bus for the USB controller (default 0x03).
	XHCISlot int
}

func (l Layout) withDefaults() Layout {
	if l.Arch == "" {
		l.Arch = "amd64"
	}
	if l.Bus == "" {
		l.Bus = "pcie.0"
	}
	if l.PortSlot == 0 {
		l.PortSlot = 0x18
	}
	if l.PortSlots == 0 {
		l.PortSlots = 7
	}
	if l.Chassis == 0 {
		l.Chassis = 0x40
	}
	if l.XHCISlot == 0 {
		l.XHCISlot = 0x03
	}
	return l
}

// FDSet is how Args asks the engine for a file: the engine opens path
// with flags (os.O_RDWR, os.O_WRONLY) when it starts QEMU, passes the
// descriptor with -add-fd in a new fd set, and returns the set's path
// "/dev/fdset/N". Args calls it once per file, in argv order.
type FDSet func(path string, flags int) string

// Device IDs Args gives QEMU.
const (
	XHCIID = "xhci0"
	TPMID  = "hosttpm0"
)

// PortID and DeviceID are the QEMU ids of the i-th VFIO device's root port
// and device; USBID is the i-th USB device's.
func PortID(i int) string   { return fmt.Sprintf("hostport%d", i) }
func DeviceID(i int) string { return fmt.Sprintf("hostdev%d", i) }
func USBID(i int) string    { return fmt.Sprintf("usbhost%d", i) }

// MaxUSB is the most USB devices a VM gets: the xhci controller's 15 USB 2
// and 15 USB 3 ports.
const MaxUSB = 15

// Args returns QEMU's options for the plan:
//
//	-device pcie-root-port,id=hostport0,bus=pcie.0,addr=0x18.0,multifunction=on,chassis=64
//	-device vfio-pci,host=0000:01:00.0,id=hostdev0,bus=hostport0,addr=0x0
//	-device vfio-pci,sysfsdev=/sys/bus/mdev/devices/<uuid>,id=hostdev1,bus=hostport1,addr=0x0
//	-device qemu-xhci,id=xhci0,bus=pcie.0,addr=0x3,p2=4,p3=4
//	-device usb-host,id=usbhost0,bus=xhci0.0,hostdevice=/dev/fdset/N
//	-tpmdev passthrough,id=hosttpm0,path=/dev/fdset/N,cancel-path=/dev/fdset/M
//	-device tpm-tis,tpmdev=hosttpm0      (arm64: tpm-tis-device)
//
// The TPM front end is TIS, not CRB: QEMU's CRB buffer is 3968 bytes and
// refuses a host TPM whose buffer is 4096, the usual size ("Requested
// buffer size of 3968 is smaller than host TPM's fixed buffer size"),
// while TIS takes 4096.
//
// Every mdev must exist (Acquire first). Args is a pure function of its
// inputs; testdata/*.golden holds examples.
func (p *Plan) Args(l Layout, fdset FDSet) ([]string, error) {
	l = l.withDefaults()
	var tpmFront string
	switch l.Arch {
	case "amd64":
		tpmFront = "tpm-tis"
	case "arm64":
		tpmFront = "tpm-tis-device"
	default:
		return nil, errcode.New(errcode.ValidationFailed, "hostdev: arch %q is not supported", l.Arch)
	}
	if n := len(p.VFIO); n > 8*l.PortSlots {
		return nil, errcode.New(errcode.ValidationFailed, "%d passthrough devices: at most %d", n, 8*l.PortSlots)
	}
	if n := len(p.USB); n > MaxUSB {
		return nil, errcode.New(errcode.ValidationFailed, "%d usb devices: at most %d", n, MaxUSB)
	}
	var a []string
	add := func(xs ...string) { a = append(a, xs...) }
	for i, d := range p.VFIO {
		slot, fn := l.PortSlot+i/8, i%8
		port := fmt.Sprintf("pcie-root-port,id=%s,bus=%s,addr=0x%x.%d", PortID(i), l.Bus, slot, fn)
		if fn == 0 {
			port += ",multifunction=on"
		}
		add("-device", port+fmt.Sprintf(",chassis=%d", l.Chassis+i))
		var dev string
		switch {
		case d.Mdev != nil:
			if !uuidRE.MatchString(d.Mdev.UUID) {
				return nil, errcode.New(errcode.ValidationFailed, "mdev uuid %q is invalid", d.Mdev.UUID)
			}
			dev = "vfio-pci,sysfsdev=/sys/bus/mdev/devices/" + d.Mdev.UUID
		default:
			addr, err := ParsePCIAddress(d.Address)
			if err != nil {
				return nil, err
			}
			dev = "vfio-pci,host=" + addr
		}
		add("-device", dev+",id="+DeviceID(i)+",bus="+PortID(i)+",addr=0x0")
	}
	if len(p.USB) > 0 {
		ports := max(4, len(p.USB))
		add("-device", fmt.Sprintf("qemu-xhci,id=%s,bus=%s,addr=0x%x,p2=%d,p3=%d", XHCIID, l.Bus, l.XHCISlot, ports, ports))
		for i, u := range p.USB {
			add("-device", "usb-host,id="+USBID(i)+",bus="+XHCIID+".0,hostdevice="+fdset(u.Node, os.O_RDWR))
		}
	}
	if t := p.TPM; t != nil {
		dev := fdset(t.Path, os.O_RDWR)
		cancel := fdset(t.Cancel, os.O_WRONLY)
		add("-tpmdev", "passthrough,id="+TPMID+",path="+dev+",cancel-path="+cancel)
		add("-device", tpmFront+",tpmdev="+TPMID)
	}
	return a, nil
}
