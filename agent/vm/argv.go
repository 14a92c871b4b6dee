package vm

import (
	"fmt"
	"strconv"
	"strings"
)

// Paths are the per-VM files QEMU is told about.
type Paths struct {
	QMPSocket  string // <run>/<shortid>/qmp.sock
	PIDFile    string // <run>/<shortid>/qemu.pid
	ConsoleLog string // <state>/vms/<uuid>/console.log
}

// Platform is the host side of the command line: accelerator and machine.
type Platform struct {
	Accel string // "tcg" or "kvm"
}

// escapeOpt escapes a value for QEMU's option syntax (key=value,...):
// a comma is written twice.
func escapeOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// BuildArgs returns QEMU's argv (without the binary) for spec. It is a pure
// function of its inputs, golden-tested under testdata/argv.
//
// Every value that comes from outside (names, paths) is validated by
// Spec.Validate and escaped here, so no input can add an option.
func BuildArgs(s *Spec, p Paths, plat Platform) ([]string, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	for _, x := range []string{p.QMPSocket, p.PIDFile, p.ConsoleLog} {
		if err := checkPath(x); err != nil {
			return nil, err
		}
	}
	accel := plat.Accel
	if accel == "" {
		accel = "tcg"
	}
	var a []string
	add := func(xs ...string) { a = append(a, xs...) }

	add("-name", "guest="+escapeOpt(s.Name)+",debug-threads=on")
	add("-uuid", s.UUID)
	add("-nodefaults", "-no-user-config")
	switch s.Arch {
	case ArchAMD64:
		add("-machine", "q35,accel="+accel)
		if accel == "kvm" {
			add("-cpu", "host")
		}
	case ArchARM64:
		add("-machine", "virt,accel="+accel)
		if accel == "kvm" {
			add("-cpu", "host")
		} else {
			add("-cpu", "cortex-a57")
		}
	}
	add("-smp", strconv.Itoa(s.VCPUs))
	add("-m", strconv.Itoa(s.MemoryMB))
	add("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
	add("-display", "none")
	add("-chardev", "socket,id=qmp,path="+escapeOpt(p.QMPSocket)+",server=on,wait=off")
	add("-mon", "chardev=qmp,mode=control")
	add("-chardev", "file,id=console,path="+escapeOpt(p.ConsoleLog)+",append=on")
	add("-serial", "chardev:console")
	add("-pidfile", p.PIDFile)

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
		if d.ReadOnly {
			ro = ",read-only=on"
		}
		add("-blockdev", "driver=file,node-name="+node+"-file,filename="+escapeOpt(d.Path)+ro+",cache.direct=off")
		add("-blockdev", "driver="+d.Format+",node-name="+node+",file="+node+"-file"+ro)
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
			add("-device", "virtio-blk-pci,id="+node+"-dev,drive="+node+",bus="+bus+",addr="+nextAddr()+bootOpt)
		case BusNVMe:
			add("-device", "nvme,id="+node+"-dev,drive="+node+",serial="+node+",bus="+bus+",addr="+nextAddr()+bootOpt)
		case BusVirtioSCSI:
			add("-device", "scsi-hd,id="+node+"-dev,drive="+node+",bus=scsi0.0"+bootOpt)
		}
	}
	for i, c := range s.CDROMs {
		node := fmt.Sprintf("cd%d", i)
		add("-blockdev", "driver=file,node-name="+node+"-file,filename="+escapeOpt(c.Path)+",read-only=on")
		add("-blockdev", "driver=raw,node-name="+node+",file="+node+"-file,read-only=on")
		bootOpt := ""
		if c.BootIndex > 0 {
			bootOpt = ",bootindex=" + strconv.Itoa(c.BootIndex)
		}
		add("-device", "scsi-cd,id="+node+"-dev,drive="+node+",bus=scsi0.0"+bootOpt)
	}
	nics := s.NICs
	if len(nics) == 0 {
		nics = []NIC{{Type: "user", MAC: MACFromUUID(s.UUID, 0)}}
	}
	for i, n := range nics {
		id := fmt.Sprintf("net%d", i)
		add("-netdev", "user,id="+id)
		add("-device", "virtio-net-pci,id="+id+"-dev,netdev="+id+",mac="+n.MAC+",romfile=,bus="+bus+",addr="+fmt.Sprintf("0x%x", 0x10+i))
	}
	return a, nil
}
