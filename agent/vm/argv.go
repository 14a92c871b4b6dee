package vm

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/otherix/otherix-agent/agent/firmware"
	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/agent/tpm"
	"github.com/otherix/otherix-agent/agent/vnc"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Paths are the per-VM files QEMU is given. QEMU opens none of them by
// path: the agent opens each one and passes the descriptor (see FileSpec).
type Paths struct {
	QMPSocket  string // <run>/<shortid>/qmp.sock, bound by the agent
	QGASocket  string // <run>/<shortid>/qga.sock: the guest agent channel
	ConsoleLog string // <state>/vms/<uuid>/console.log
}

// Platform is the host side of the command line: accelerator and machine.
type Platform struct {
	Accel string // "tcg" or "kvm"
	// HostDevices is what the spec's host devices resolved to on this
	// host (required when the spec has some).
	HostDevices *hostdev.Plan
}

// FileKind says how the agent opens a file it passes to QEMU.
type FileKind int

// File kinds.
const (
	FileRead        FileKind = iota // O_RDONLY
	FileWrite                       // O_RDWR
	FileAppend                      // O_WRONLY|O_APPEND|O_CREAT, 0600
	FileListen                      // a unix socket the agent binds and listens on
	FileTap                         // the tap or macvtap of NIC Index, made by the agent
	FileTPM                         // a connection to the VM's swtpm, started by the agent
	FileDevice                      // a host device node, O_RDWR (usbfs, /dev/tpmN)
	FileDeviceWrite                 // a host device control file, O_WRONLY (TPM cancel)
)

// FileSpec is one descriptor QEMU inherits: the i-th FileSpec becomes fd
// 3+i (exec.Cmd.ExtraFiles).
type FileSpec struct {
	Path  string
	Kind  FileKind
	Index int // FileTap: the NIC
}

// OpenFlags returns the open(2) flags of a file kind.
func (k FileKind) OpenFlags() int {
	switch k {
	case FileWrite, FileDevice:
		return os.O_RDWR
	case FileDeviceWrite:
		return os.O_WRONLY
	case FileAppend:
		return os.O_WRONLY | os.O_APPEND | os.O_CREATE
	}
	return os.O_RDONLY
}

// BalloonID is the id of every VM's virtio balloon: its QOM path is
// /machine/peripheral/<BalloonID>.
const BalloonID = "balloon0"

// HotplugPorts is how many disks can be attached while a VM runs.
const HotplugPorts = 4

// HostDeviceLayout places passed-through devices: their root ports from
// slot 0x1a (0x18 holds the balloon, 0x19 the hot-plug ports, 0x1f is the
// ICH9's), the USB controller at slot 0x03.
func HostDeviceLayout(arch string) hostdev.Layout {
	return hostdev.Layout{Arch: arch, PortSlot: 0x1a, PortSlots: 4, Chassis: 0x40, XHCISlot: 0x03}
}

// escapeOpt escapes a value for QEMU's option syntax (key=value,...):
// a comma is written twice.
func escapeOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// fdPlan hands out descriptor numbers and fd sets.
type fdPlan struct {
	files []FileSpec
	args  []string
	sets  int
}

// add registers a file and returns its fd number.
func (f *fdPlan) add(path string, kind FileKind) int {
	f.files = append(f.files, FileSpec{Path: path, Kind: kind})
	return 2 + len(f.files)
}

// set puts files into a new fd set and returns the path QEMU opens it by.
// QEMU picks from the set a descriptor whose access mode matches what it
// asks for, so a writable disk gets a read-write and a read-only one (QEMU
// opens images read-only first when probing).
func (f *fdPlan) set(path string, kinds ...FileKind) string {
	f.sets++
	for _, k := range kinds {
		fd := f.add(path, k)
		f.args = append(f.args, "-add-fd", fmt.Sprintf("fd=%d,set=%d", fd, f.sets))
	}
	return fmt.Sprintf("/dev/fdset/%d", f.sets)
}

// BuildArgs returns QEMU's argv (without the binary) for spec and the files
// QEMU inherits as descriptors. It is a pure function of its inputs,
// golden-tested under testdata/argv.
//
// No path reaches the command line: every file is opened by the agent and
// named as /dev/fdset/N, so QEMU, running as an unprivileged user, needs no
// access to any VM file and no path can carry a QEMU option. Names are
// validated by Spec.Validate and escaped all the same.
func BuildArgs(s *Spec, p Paths, plat Platform) ([]string, []FileSpec, error) {
	if err := s.Validate(); err != nil {
		return nil, nil, err
	}
	for _, x := range []string{p.QMPSocket, p.QGASocket, p.ConsoleLog} {
		if err := checkPath(x); err != nil {
			return nil, nil, err
		}
	}
	accel := plat.Accel
	if accel == "" {
		accel = "tcg"
	}
	var fds fdPlan
	qmpFD := fds.add(p.QMPSocket, FileListen)
	qgaFD := fds.add(p.QGASocket, FileListen)
	console := fds.set(p.ConsoleLog, FileAppend)

	var a []string
	add := func(xs ...string) { a = append(a, xs...) }

	add("-name", "guest="+escapeOpt(s.Name)+",debug-threads=on")
	add("-uuid", s.UUID)
	add("-nodefaults", "-no-user-config")
	fw := s.Firmware
	smm := ""
	if fw != nil && fw.RequiresSMM {
		smm = ",smm=on"
	}
	switch s.Arch {
	case ArchAMD64:
		add("-machine", "q35,accel="+accel+smm)
		if accel == "kvm" {
			add("-cpu", "host")
		}
	case ArchARM64:
		add("-machine", "virt,accel="+accel+smm)
		if accel == "kvm" {
			add("-cpu", "host")
		} else {
			add("-cpu", "cortex-a57")
		}
	}
	if fw != nil && fw.Interface == "uefi" {
		e := firmware.Entry{Interface: "uefi", Arch: s.Arch, CodeFormat: fw.CodeFormat, VarsFormat: fw.VarsFormat, RequiresSMM: fw.RequiresSMM}
		code := fds.set(fw.Code, FileRead)
		vars := fds.set(fw.Vars, FileWrite, FileRead)
		add(e.Globals()...)
		add(e.FlashArgs(code, vars)...)
	}
	add("-smp", strconv.Itoa(s.VCPUs))
	add("-m", strconv.Itoa(s.MemoryMB))
	add("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
	add("-display", "none")
	if v := s.VNC; v != nil {
		disp, err := vnc.DisplayArgs(s.Arch, 1)
		if err != nil {
			return nil, nil, err
		}
		va, err := vnc.Args(v.Listen, v.Port)
		if err != nil {
			return nil, nil, err
		}
		add(disp...)
		add(va...)
	}
	add("-chardev", fmt.Sprintf("socket,id=qmp,fd=%d,server=on,wait=off", qmpFD))
	add("-mon", "chardev=qmp,mode=control")
	add("-chardev", "file,id=console,path="+console+",append=on")
	add("-serial", "chardev:console")

	// Fixed PCI slots on the root bus keep guest device names stable across
	// restarts and as devices are added.
	slot := 0x04
	nextAddr := func() string {
		s := fmt.Sprintf("0x%x", slot)
		slot++
		return s
	}
	bus := "pcie.0"

	needSCSI := len(s.CDROMs) > 0
	for _, d := range s.Disks {
		if d.Bus == BusVirtioSCSI {
			needSCSI = true
		}
	}
	if needSCSI {
		add("-device", "virtio-scsi-pci,id=scsi0,bus="+bus+",addr="+nextAddr())
	}
	for i, d := range s.Disks {
		node := fmt.Sprintf("disk%d", i)
		ro := ""
		backing := ""
		if b := d.Backing; b != nil {
			bpath := fds.set(b.Path, FileRead)
			add("-blockdev", "driver=file,node-name="+node+"-base-file,filename="+bpath+",read-only=on")
			add("-blockdev", "driver="+b.Format+",node-name="+node+"-base,file="+node+"-base-file,read-only=on")
			backing = ",backing=" + node + "-base"
		}
		var path string
		if d.ReadOnly {
			ro = ",read-only=on"
			path = fds.set(d.Path, FileRead)
		} else {
			path = fds.set(d.Path, FileWrite, FileRead)
		}
		add("-blockdev", "driver=file,node-name="+node+"-file,filename="+path+ro+",cache.direct=off")
		add("-blockdev", "driver="+d.Format+",node-name="+node+",file="+node+"-file"+ro+backing)
		boot := d.BootIndex
		if i == 0 && boot == 0 {
			boot = 1
		}
		bootOpt := ""
		if boot > 0 {
			bootOpt = ",bootindex=" + strconv.Itoa(boot)
		}
		switch d.Bus {
		case "", BusVirtioBlk:
			add("-device", "virtio-blk-pci,id="+node+"-dev,drive="+node+",bus="+bus+",addr="+nextAddr()+bootOpt+ErrorPolicy)
		case BusNVMe:
			add("-device", "nvme,id="+node+"-dev,drive="+node+",serial="+node+",bus="+bus+",addr="+nextAddr()+bootOpt)
		case BusVirtioSCSI:
			add("-device", "scsi-hd,id="+node+"-dev,drive="+node+",bus=scsi0.0"+bootOpt+ErrorPolicy)
		}
	}
	for i, c := range s.CDROMs {
		node := fmt.Sprintf("cd%d", i)
		path := fds.set(c.Path, FileRead)
		add("-blockdev", "driver=file,node-name="+node+"-file,filename="+path+",read-only=on")
		add("-blockdev", "driver=raw,node-name="+node+",file="+node+"-file,read-only=on")
		bootOpt := ""
		if c.BootIndex > 0 {
			bootOpt = ",bootindex=" + strconv.Itoa(c.BootIndex)
		}
		add("-device", "scsi-cd,id="+node+"-dev,drive="+node+",bus=scsi0.0"+bootOpt)
	}
	// Empty PCIe root ports for disks attached while the VM runs (q35 and
	// virt have no hot-plug slot on the root bus).
	for i := 0; i < HotplugPorts; i++ {
		opts := fmt.Sprintf("pcie-root-port,id=hp%d,bus=%s,chassis=%d,addr=0x19.%d", i, bus, 10+i, i)
		if i == 0 {
			opts += ",multifunction=on"
		}
		add("-device", opts)
	}
	nics := s.NICs
	if len(nics) == 0 {
		nics = []NIC{{Type: NICUser, MAC: MACFromUUID(s.UUID, 0)}}
	}
	for i, n := range nics {
		id := fmt.Sprintf("net%d", i)
		addr := fmt.Sprintf("0x%x", 0x10+i)
		if n.Type == NICUser {
			netdevOpt := "user,id=" + id
			fwd, err := portfwd.HostFwdOptions(n.Forwards)
			if err != nil {
				return nil, nil, err
			}
			for _, f := range fwd {
				netdevOpt += "," + f
			}
			add("-netdev", netdevOpt)
			add("-device", "virtio-net-pci,id="+id+"-dev,netdev="+id+",mac="+n.MAC+",romfile=,bus="+bus+",addr="+addr)
			continue
		}
		fds.files = append(fds.files, FileSpec{Kind: FileTap, Index: i})
		fd := 2 + len(fds.files)
		add(netdev.QEMUArgs(i, &netdev.Attached{MAC: n.MAC}, fd, addr)...)
	}
	if s.TPM != nil {
		fds.files = append(fds.files, FileSpec{Path: s.TPM.State, Kind: FileTPM})
		targs, err := tpm.ArgsFD(s.Arch, 2+len(fds.files))
		if err != nil {
			return nil, nil, err
		}
		add(targs...)
	}
	if !s.HostDevices.Empty() {
		if plat.HostDevices == nil {
			return nil, nil, errcode.New(errcode.Internal, "vm %q: host devices not acquired", s.Name)
		}
		kinds := map[int]FileKind{os.O_RDWR: FileDevice, os.O_WRONLY: FileDeviceWrite}
		hargs, err := plat.HostDevices.Args(HostDeviceLayout(s.Arch), func(path string, flags int) string {
			return fds.set(path, kinds[flags])
		})
		if err != nil {
			return nil, nil, err
		}
		add(hargs...)
	}
	// The guest agent channel: with an id on the port, QMP reports
	// VSERPORT_CHANGE when qemu-ga opens it. Two ports (0 is kept for a
	// console, qemu-ga's is 1), not QEMU's default 31: each port has two
	// virtqueues, and with the default's 64 every QMP stop and cont of a
	// running guest took about 0.55 ms longer under TCG; with two ports
	// they are within 0.1 ms of a bare QEMU's.
	add("-chardev", fmt.Sprintf("socket,id=qga0,fd=%d,server=on,wait=off", qgaFD))
	add("-device", "virtio-serial-pci,id=vser0,bus="+bus+",addr=0xe,max_ports=2")
	add("-device", "virtserialport,id=qgaport,chardev=qga0,name=org.qemu.guest_agent.0")
	// A balloon, never inflated by the agent: through it the guest reports
	// its memory (QMP query-balloon, and qom-get guest-stats once the
	// usage collector turned stats polling on).
	add("-device", "virtio-balloon-pci,id="+BalloonID+",bus="+bus+",addr=0x18")
	// pvpanic: a guest kernel that panics tells QEMU (GUEST_PANICKED),
	// which then exits (its default panic action): the VM is crashed with
	// a guest-panic reason, not a silent hang. Last, so its automatic slot
	// is one no device above asked for.
	add("-device", "pvpanic-pci,bus="+bus)
	// The -add-fd options go first so every /dev/fdset/N exists before the
	// option that opens it.
	return append(fds.args, a...), fds.files, nil
}
