// Package sysfstest builds fake /sys and /dev trees for host-device tests,
// laid out as the Linux kernel lays them out, and plays the kernel's part
// when the code under test writes to a control file.
//
// The layout follows the real one, link for link: a PCI function is a
// directory under /sys/devices/pci<domain>:<bus>/…, nested under its bridge,
// and everything else points at it with relative symlinks written the way
// the kernel writes them:
//
//	/sys/bus/pci/devices/0000:01:00.0 -> ../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0
//	<dev>/driver       -> ../../../../bus/pci/drivers/vfio-pci
//	<dev>/iommu_group  -> ../../../../kernel/iommu_groups/13
//	<dev>/subsystem    -> ../../../../bus/pci
//	<pf>/virtfn0       -> ../0000:03:00.1      <vf>/physfn -> ../0000:03:00.0
//	/sys/kernel/iommu_groups/13/devices/0000:01:00.0 -> ../../../../devices/…
//	/sys/bus/pci/drivers/vfio-pci/0000:01:00.0 -> ../../../../devices/…
//	/sys/bus/mdev/devices/<uuid> -> ../../../devices/pci0000:00/0000:00:02.0/<uuid>
//	/sys/bus/usb/devices/1-1 -> ../../../devices/pci0000:00/0000:00:14.0/usb1/1-1
//	/sys/class/tpm/tpm0 -> ../../devices/LNXSYSTM:00/LNXSYBUS:00/MSFT0101:00/tpm/tpm0
//
// with the attribute files the code reads (vendor "0x10de\n", class
// "0x030000\n", driver_override "(null)\n", uevent, modalias; USB busnum,
// devnum, idVendor "046d\n", idProduct; mdev available_instances, …) in the
// kernel's formats. TestTreeMatchesRealSysfs in package hostdev builds this
// machine's PCI devices here and compares them, link and file, with the
// real /sys.
//
// Device nodes (/dev/vfio/N, /dev/bus/usb/BBB/DDD, /dev/tpm0) are made with
// mknod, with the kernel's major and minor numbers, when the process may
// (root); otherwise they are empty regular files.
package sysfstest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// Tree is a fake /sys (Sys) and /dev (Dev) under a test's temporary
// directory.
type Tree struct {
	Sys string
	Dev string

	tb        testing.TB
	mu        sync.Mutex
	nextGroup int
	usbMinor  int
}

// New makes an empty tree with the directories every Linux host has:
// /sys/bus/pci/{devices,drivers}, /sys/kernel/iommu_groups and
// /sys/bus/pci/drivers_probe.
func New(tb testing.TB) *Tree {
	tb.Helper()
	root := tb.TempDir()
	t := &Tree{Sys: filepath.Join(root, "sys"), Dev: filepath.Join(root, "dev"), tb: tb, nextGroup: 100}
	t.dir("bus/pci/devices")
	t.dir("bus/pci/drivers")
	t.dir("kernel/iommu_groups")
	t.dir("devices")
	t.file("bus/pci/drivers_probe", "", 0o200)
	t.file("bus/pci/rescan", "", 0o200)
	if err := os.MkdirAll(t.Dev, 0o755); err != nil {
		tb.Fatal(err)
	}
	return t
}

// S is the absolute path of a path relative to the fake /sys.
func (t *Tree) S(rel string) string { return filepath.Join(t.Sys, rel) }

// D is the absolute path of a path relative to the fake /dev.
func (t *Tree) D(rel string) string { return filepath.Join(t.Dev, rel) }

func (t *Tree) dir(rel string) {
	t.tb.Helper()
	if err := os.MkdirAll(t.S(rel), 0o755); err != nil {
		t.tb.Fatal(err)
	}
}

func (t *Tree) file(rel, content string, mode os.FileMode) {
	t.tb.Helper()
	p := t.S(rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.tb.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.tb.Fatal(err)
	}
	// WriteFile leaves the mode of an existing file alone.
	if err := os.Chmod(p, mode); err != nil {
		t.tb.Fatal(err)
	}
}

// link makes the symlink at (relative to /sys) point at target (relative
// to /sys), written as the relative path the kernel uses.
func (t *Tree) link(at, target string) {
	t.tb.Helper()
	if err := t.linkErr(at, target); err != nil {
		t.tb.Fatal(err)
	}
}

func (t *Tree) linkErr(at, target string) error {
	p := t.S(at)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	rel, err := filepath.Rel(filepath.Dir(p), t.S(target))
	if err != nil {
		return err
	}
	os.Remove(p)
	return os.Symlink(rel, p)
}

// node makes a character device node under /dev.
func (t *Tree) node(rel string, major, minor uint32, mode uint32) {
	t.tb.Helper()
	p := t.D(rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.tb.Fatal(err)
	}
	os.Remove(p)
	if err := unix.Mknod(p, unix.S_IFCHR|mode, int(unix.Mkdev(major, minor))); err != nil {
		if !errors.Is(err, fs.ErrPermission) {
			t.tb.Fatal(err)
		}
		if err := os.WriteFile(p, nil, fs.FileMode(mode)); err != nil {
			t.tb.Fatal(err)
		}
	}
	if err := os.Chmod(p, fs.FileMode(mode)); err != nil {
		t.tb.Fatal(err)
	}
}

// PCI is one PCI function.
type PCI struct {
	Addr   string // "0000:01:00.0"
	Parent string // the bridge it sits behind ("" = the root bus)
	Vendor uint16
	Device uint16
	Class  uint32 // 0x030000 for a VGA controller
	// SubVendor and SubDevice are the subsystem IDs (0x0000 for many
	// bridges).
	SubVendor, SubDevice uint16
	Revision             uint8
	Driver               string // bound driver, "" for none
	// Group is the IOMMU group; -1 leaves the device without one (a host
	// without an IOMMU, like the machine these tests were written on).
	Group int
}

// devPath is the device's directory relative to /sys.
func (t *Tree) devPath(addr string) string {
	t.tb.Helper()
	p, err := os.Readlink(t.S("bus/pci/devices/" + addr))
	if err != nil {
		t.tb.Fatalf("sysfstest: no PCI device %s: %v", addr, err)
	}
	rel, err := filepath.Rel(t.Sys, filepath.Join(t.S("bus/pci/devices"), p))
	if err != nil {
		t.tb.Fatal(err)
	}
	return rel
}

// AddPCI adds a PCI function. Its parent bridge, if any, must exist.
func (t *Tree) AddPCI(d PCI) {
	t.tb.Helper()
	var dir string
	if d.Parent == "" {
		dir = "devices/pci" + d.Addr[:7] + "/" + d.Addr
	} else {
		dir = t.devPath(d.Parent) + "/" + d.Addr
	}
	t.dir(dir)
	hex16 := func(v uint16) string { return fmt.Sprintf("0x%04x\n", v) }
	t.file(dir+"/vendor", hex16(d.Vendor), 0o444)
	t.file(dir+"/device", hex16(d.Device), 0o444)
	t.file(dir+"/subsystem_vendor", hex16(d.SubVendor), 0o444)
	t.file(dir+"/subsystem_device", hex16(d.SubDevice), 0o444)
	t.file(dir+"/class", fmt.Sprintf("0x%06x\n", d.Class), 0o444)
	t.file(dir+"/revision", fmt.Sprintf("0x%02x\n", d.Revision), 0o444)
	t.file(dir+"/driver_override", "(null)\n", 0o644)
	t.file(dir+"/numa_node", "-1\n", 0o644)
	t.file(dir+"/enable", "1\n", 0o644)
	t.file(dir+"/modalias", modalias(d)+"\n", 0o444)
	t.file(dir+"/remove", "", 0o220)
	t.file(dir+"/rescan", "", 0o200)
	t.link(dir+"/subsystem", "bus/pci")
	t.link("bus/pci/devices/"+d.Addr, dir)
	t.writeUevent(dir, d)
	if d.Driver != "" {
		t.bind(dir, d.Addr, d.Driver)
	}
	if d.Group >= 0 {
		t.setGroup(dir, d.Addr, d.Group)
	}
}

func modalias(d PCI) string {
	return fmt.Sprintf("pci:v%08Xd%08Xsv%08Xsd%08Xbc%02Xsc%02Xi%02X",
		d.Vendor, d.Device, d.SubVendor, d.SubDevice, d.Class>>16, (d.Class>>8)&0xff, d.Class&0xff)
}

func (t *Tree) writeUevent(dir string, d PCI) {
	var b strings.Builder
	if d.Driver != "" {
		fmt.Fprintf(&b, "DRIVER=%s\n", d.Driver)
	}
	fmt.Fprintf(&b, "PCI_CLASS=%X\nPCI_ID=%04X:%04X\nPCI_SUBSYS_ID=%04X:%04X\nPCI_SLOT_NAME=%s\nMODALIAS=%s\n",
		d.Class, d.Vendor, d.Device, d.SubVendor, d.SubDevice, d.Addr, modalias(d))
	t.file(dir+"/uevent", b.String(), 0o644)
}

// driverDir makes /sys/bus/pci/drivers/<name> with its control files.
func (t *Tree) driverDir(name string) string {
	dir := "bus/pci/drivers/" + name
	if _, err := os.Stat(t.S(dir)); err == nil {
		return dir
	}
	t.dir(dir)
	for _, f := range []string{"bind", "unbind", "new_id", "remove_id", "uevent"} {
		t.file(dir+"/"+f, "", 0o200)
	}
	return dir
}

// AddDriver registers a PCI driver with no device (a loaded module, e.g.
// vfio-pci before anything is bound to it).
func (t *Tree) AddDriver(name string) {
	t.tb.Helper()
	t.driverDir(name)
	if name == "vfio-pci" {
		t.vfioContainer()
	}
}

// vfioContainer makes /dev/vfio/vfio (10:196, 0666), present once the vfio
// module is loaded.
func (t *Tree) vfioContainer() {
	if _, err := os.Lstat(t.D("vfio/vfio")); err == nil {
		return
	}
	t.node("vfio/vfio", 10, 196, 0o666)
}

func (t *Tree) bind(dir, addr, driver string) {
	ddir := t.driverDir(driver)
	t.link(dir+"/driver", ddir)
	t.link(ddir+"/"+addr, dir)
	if driver == "vfio-pci" {
		t.vfioContainer()
		if g, err := os.Readlink(t.S(dir + "/iommu_group")); err == nil {
			t.node("vfio/"+filepath.Base(g), 243, 0, 0o600)
		}
	}
}

func (t *Tree) setGroup(dir, addr string, group int) {
	g := "kernel/iommu_groups/" + strconv.Itoa(group)
	if _, err := os.Stat(t.S(g)); err != nil {
		t.dir(g + "/devices")
		t.file(g+"/type", "DMA\n", 0o644)
		t.file(g+"/reserved_regions", "0x00000000fee00000 0x00000000feefffff msi\n", 0o444)
	}
	t.link(dir+"/iommu_group", g)
	t.link(g+"/devices/"+addr, dir)
	if drv, err := os.Readlink(t.S(dir + "/driver")); err == nil && filepath.Base(drv) == "vfio-pci" {
		t.node("vfio/"+strconv.Itoa(group), 243, 0, 0o600)
	}
}

// Unbind removes a device's driver link, as writing its address to the
// driver's unbind file does.
func (t *Tree) Unbind(addr string) {
	t.tb.Helper()
	if err := t.unbind(addr); err != nil {
		t.tb.Fatal(err)
	}
}

func (t *Tree) unbind(addr string) error {
	dir := t.devPath(addr)
	drv, err := os.Readlink(t.S(dir + "/driver"))
	if err != nil {
		return &fs.PathError{Op: "write", Path: "unbind", Err: syscall.ENODEV}
	}
	os.Remove(t.S(dir + "/driver"))
	os.Remove(t.S("bus/pci/drivers/" + filepath.Base(drv) + "/" + addr))
	return nil
}

// SRIOV makes pf a physical function with the given virtual functions,
// which are added as siblings of pf (same parent) with virtfnN/physfn
// links and their own IOMMU groups.
func (t *Tree) SRIOV(pf string, vfs ...PCI) {
	t.tb.Helper()
	pdir := t.devPath(pf)
	parent := ""
	if up := filepath.Dir(pdir); !strings.HasPrefix(filepath.Base(up), "pci") {
		parent = filepath.Base(up)
	}
	t.file(pdir+"/sriov_totalvfs", strconv.Itoa(len(vfs))+"\n", 0o444)
	t.file(pdir+"/sriov_numvfs", strconv.Itoa(len(vfs))+"\n", 0o644)
	for i, vf := range vfs {
		vf.Parent = parent
		t.AddPCI(vf)
		vdir := t.devPath(vf.Addr)
		t.link(pdir+"/virtfn"+strconv.Itoa(i), vdir)
		t.link(vdir+"/physfn", pdir)
	}
}

// AddDRM makes DRM card n of the GPU at addr: /sys/class/drm/card<n> ->
// <dev>/drm/card<n>, whose device link points back at the GPU.
func (t *Tree) AddDRM(n int, addr string) {
	t.tb.Helper()
	dir := t.devPath(addr)
	card := fmt.Sprintf("card%d", n)
	cdir := dir + "/drm/" + card
	t.dir(cdir)
	t.file(cdir+"/dev", fmt.Sprintf("226:%d\n", n), 0o444)
	t.link(cdir+"/device", dir)
	t.link(cdir+"/subsystem", "class/drm")
	t.link("class/drm/"+card, cdir)
}

// MdevType is a mediated device type a parent device offers.
type MdevType struct {
	Name      string // directory name, e.g. "i915-GVTg_V5_4" or "nvidia-63"
	Available int
}

// AddMdevParent gives a PCI device mdev_supported_types and registers it
// under /sys/class/mdev_bus; it also makes /sys/bus/mdev.
func (t *Tree) AddMdevParent(addr string, types ...MdevType) {
	t.tb.Helper()
	dir := t.devPath(addr)
	t.dir("bus/mdev/devices")
	t.dir("bus/mdev/drivers/vfio_mdev")
	for _, ty := range types {
		td := dir + "/mdev_supported_types/" + ty.Name
		t.dir(td + "/devices")
		t.file(td+"/available_instances", strconv.Itoa(ty.Available)+"\n", 0o444)
		t.file(td+"/create", "", 0o200)
		t.file(td+"/device_api", "vfio-pci\n", 0o444)
		t.file(td+"/name", strings.TrimPrefix(ty.Name, "i915-")+"\n", 0o444)
		t.file(td+"/description", "low_gm_size: 128MB\nhigh_gm_size: 512MB\nfence: 4\nresolution: 1920x1200\nweight: 4\n", 0o444)
	}
	t.link("class/mdev_bus/"+addr, dir)
}

// AddMdev creates a mediated device on parent of type typ, as the kernel
// does when uuid is written to the type's create file: its own IOMMU
// group, the vfio_mdev driver, and one instance fewer available.
func (t *Tree) AddMdev(parent, typ, uuid string) {
	t.tb.Helper()
	if err := t.createMdev(t.devPath(parent), typ, uuid); err != nil {
		t.tb.Fatal(err)
	}
}

func (t *Tree) createMdev(pdir, typ, uuid string) error {
	td := pdir + "/mdev_supported_types/" + typ
	avail, err := readInt(t.S(td + "/available_instances"))
	if err != nil {
		return err
	}
	mdir := pdir + "/" + uuid
	if _, err := os.Lstat(t.S(mdir)); err == nil {
		return &fs.PathError{Op: "write", Path: t.S(td + "/create"), Err: syscall.EEXIST}
	}
	if avail <= 0 {
		return &fs.PathError{Op: "write", Path: t.S(td + "/create"), Err: syscall.ENOSPC}
	}
	t.mu.Lock()
	g := t.nextGroup
	t.nextGroup++
	t.mu.Unlock()
	t.dir(mdir)
	t.file(mdir+"/remove", "", 0o200)
	t.file(mdir+"/uevent", "MDEV_TYPE="+typ+"\n", 0o644)
	t.link(mdir+"/mdev_type", td)
	t.link(mdir+"/subsystem", "bus/mdev")
	t.link(mdir+"/driver", "bus/mdev/drivers/vfio_mdev")
	t.link("bus/mdev/drivers/vfio_mdev/"+uuid, mdir)
	t.link("bus/mdev/devices/"+uuid, mdir)
	t.link(td+"/devices/"+uuid, mdir)
	gd := "kernel/iommu_groups/" + strconv.Itoa(g)
	t.dir(gd + "/devices")
	t.file(gd+"/type", "DMA\n", 0o644)
	t.link(mdir+"/iommu_group", gd)
	t.link(gd+"/devices/"+uuid, mdir)
	t.vfioContainer()
	t.node("vfio/"+strconv.Itoa(g), 243, uint32(g), 0o600)
	t.file(td+"/available_instances", strconv.Itoa(avail-1)+"\n", 0o444)
	return nil
}

func (t *Tree) removeMdev(uuid string) error {
	p, err := os.Readlink(t.S("bus/mdev/devices/" + uuid))
	if err != nil {
		return &fs.PathError{Op: "write", Path: "remove", Err: syscall.ENODEV}
	}
	mdir, err := filepath.Rel(t.Sys, filepath.Join(t.S("bus/mdev/devices"), p))
	if err != nil {
		return err
	}
	ty, err := os.Readlink(t.S(mdir + "/mdev_type"))
	if err != nil {
		return err
	}
	td, err := filepath.Rel(t.Sys, filepath.Join(t.S(mdir), ty))
	if err != nil {
		return err
	}
	g, err := os.Readlink(t.S(mdir + "/iommu_group"))
	if err != nil {
		return err
	}
	group := filepath.Base(g)
	os.RemoveAll(t.S("kernel/iommu_groups/" + group))
	os.Remove(t.D("vfio/" + group))
	os.Remove(t.S("bus/mdev/devices/" + uuid))
	os.Remove(t.S("bus/mdev/drivers/vfio_mdev/" + uuid))
	os.Remove(t.S(td + "/devices/" + uuid))
	os.RemoveAll(t.S(mdir))
	avail, err := readInt(t.S(td + "/available_instances"))
	if err != nil {
		return err
	}
	t.file(td+"/available_instances", strconv.Itoa(avail+1)+"\n", 0o444)
	return nil
}

// USB is one USB device (not an interface).
type USB struct {
	Name         string // sysfs name, the port path: "1-1", "1-1.2"
	Controller   string // PCI address of the host controller, "0000:00:14.0"
	Bus, Dev     int
	Vendor       uint16
	Product      uint16
	Class        uint8 // bDeviceClass: 0x00 (per interface), 0x09 hub, ...
	Manufacturer string
	ProductName  string
}

// AddUSB adds a USB device, its first interface and its usbfs node
// /dev/bus/usb/BBB/DDD (189:minor, 0664). The root hub usb<Bus> of the
// controller is created if missing.
func (t *Tree) AddUSB(d USB) {
	t.tb.Helper()
	ctrl := t.devPath(d.Controller)
	root := fmt.Sprintf("usb%d", d.Bus)
	rootDir := ctrl + "/" + root
	if _, err := os.Stat(t.S(rootDir)); err != nil {
		t.usbDevice(rootDir, root, USB{Name: root, Bus: d.Bus, Dev: 1, Vendor: 0x1d6b, Product: 0x0002, Class: 0x09, Manufacturer: "Linux 6.1.0-13-amd64 xhci-hcd", ProductName: "xHCI Host Controller"})
	}
	// A device at port path 1-1.2 sits under the hub 1-1.
	parent := rootDir
	if i := strings.LastIndex(d.Name, "."); i > 0 {
		p, err := os.Readlink(t.S("bus/usb/devices/" + d.Name[:i]))
		if err != nil {
			t.tb.Fatalf("sysfstest: hub %s of %s missing", d.Name[:i], d.Name)
		}
		parent, _ = filepath.Rel(t.Sys, filepath.Join(t.S("bus/usb/devices"), p))
	}
	t.usbDevice(parent+"/"+d.Name, d.Name, d)
}

func (t *Tree) usbDevice(dir, name string, d USB) {
	t.mu.Lock()
	minor := t.usbMinor
	t.usbMinor++
	t.mu.Unlock()
	t.dir(dir)
	devpath := "0"
	if i := strings.Index(name, "-"); i > 0 {
		devpath = name[i+1:]
	}
	for f, v := range map[string]string{
		"busnum":              strconv.Itoa(d.Bus),
		"devnum":              strconv.Itoa(d.Dev),
		"idVendor":            fmt.Sprintf("%04x", d.Vendor),
		"idProduct":           fmt.Sprintf("%04x", d.Product),
		"bDeviceClass":        fmt.Sprintf("%02x", d.Class),
		"bNumInterfaces":      " 1",
		"bConfigurationValue": "1",
		"devpath":             devpath,
		"speed":               "480",
		"manufacturer":        d.Manufacturer,
		"product":             d.ProductName,
		"authorized":          "1",
		"dev":                 fmt.Sprintf("189:%d", minor),
	} {
		if v != "" {
			t.file(dir+"/"+f, v+"\n", 0o444)
		}
	}
	node := fmt.Sprintf("bus/usb/%03d/%03d", d.Bus, d.Dev)
	t.file(dir+"/uevent", fmt.Sprintf("MAJOR=189\nMINOR=%d\nDEVNAME=%s\nDEVTYPE=usb_device\nDRIVER=usb\nPRODUCT=%x/%x/100\nTYPE=%d/0/0\nBUSNUM=%03d\nDEVNUM=%03d\n",
		minor, node, d.Vendor, d.Product, d.Class, d.Bus, d.Dev), 0o644)
	t.dir("bus/usb/drivers/usb")
	t.link(dir+"/driver", "bus/usb/drivers/usb")
	t.link(dir+"/subsystem", "bus/usb")
	t.link("bus/usb/devices/"+name, dir)
	// Its first interface: <name>:1.0 (a root hub's is <bus>-0:1.0).
	iname := name + ":1.0"
	if strings.HasPrefix(name, "usb") {
		iname = strings.TrimPrefix(name, "usb") + "-0:1.0"
	}
	idir := dir + "/" + iname
	t.dir(idir)
	t.file(idir+"/bInterfaceClass", fmt.Sprintf("%02x\n", d.Class), 0o444)
	t.file(idir+"/bInterfaceNumber", "00\n", 0o444)
	t.link(idir+"/subsystem", "bus/usb")
	t.link("bus/usb/devices/"+iname, idir)
	t.node(node, 189, uint32(minor), 0o664)
}

// AddTPM adds TPM chip n of the given major version (1 or 2) on an ACPI
// MSFT0101 device: /sys/class/tpm/tpm<n>, /dev/tpm<n> (10:224 for tpm0)
// and, for TPM 2.0, /sys/class/tpmrm/tpmrm<n> and /dev/tpmrm<n>. A TPM
// 1.2 has the legacy attributes, cancel among them, on its parent device
// (/sys/class/tpm/tpm0/device/cancel); a TPM 2.0 has none.
func (t *Tree) AddTPM(n, version int) {
	t.tb.Helper()
	parent := fmt.Sprintf("devices/LNXSYSTM:00/LNXSYBUS:00/MSFT0101:%02d", n)
	name := fmt.Sprintf("tpm%d", n)
	dir := parent + "/tpm/" + name
	t.dir(dir)
	minor := uint32(224)
	if n > 0 {
		minor = uint32(n)
	}
	major := uint32(10)
	if n > 0 {
		major = 252
	}
	t.file(dir+"/dev", fmt.Sprintf("%d:%d\n", major, minor), 0o444)
	t.file(dir+"/uevent", fmt.Sprintf("MAJOR=%d\nMINOR=%d\nDEVNAME=%s\n", major, minor, name), 0o644)
	t.file(dir+"/tpm_version_major", strconv.Itoa(version)+"\n", 0o444)
	t.link(dir+"/device", parent)
	t.link(dir+"/subsystem", "class/tpm")
	t.link("class/tpm/"+name, dir)
	t.node(name, major, minor, 0o660)
	if version == 1 {
		t.file(parent+"/cancel", "", 0o220)
		t.file(parent+"/caps", "Manufacturer: 0x49465800\nTCG version: 1.2\n", 0o444)
		return
	}
	rm := fmt.Sprintf("tpmrm%d", n)
	rdir := parent + "/tpmrm/" + rm
	t.dir(rdir)
	t.file(rdir+"/dev", fmt.Sprintf("253:%d\n", 65536+n), 0o444)
	t.link(rdir+"/device", parent)
	t.link("class/tpmrm/"+rm, rdir)
	t.node(rm, 253, uint32(65536+n), 0o660)
}

// Write plays the kernel's part for the control files the agent writes:
//
//   - <dev>/driver_override: stored ("vfio-pci\n"; an empty write clears);
//   - bus/pci/drivers_probe: binds the named device to its driver_override
//     driver when it has no driver;
//   - bus/pci/drivers/<d>/unbind: unbinds the named device;
//   - mdev_supported_types/<t>/create: creates the mdev (EEXIST, ENOSPC
//     as the kernel answers);
//   - bus/mdev/devices/<uuid>/remove: removes it.
//
// Any other path is written as a plain file. Pass it as hostdev.Host.Write.
func (t *Tree) Write(path string, data []byte) error {
	rel, err := filepath.Rel(t.Sys, path)
	if err != nil || strings.HasPrefix(rel, "..") {
		return os.WriteFile(path, data, 0o644)
	}
	val := strings.TrimSpace(string(data))
	base := filepath.Base(rel)
	switch {
	case rel == "bus/pci/drivers_probe":
		return t.probe(val)
	case base == "driver_override":
		if val == "" {
			val = "(null)"
		}
		return os.WriteFile(path, []byte(val+"\n"), 0o644)
	case base == "unbind" && strings.HasPrefix(rel, "bus/pci/drivers/"):
		return t.unbind(val)
	case base == "create" && strings.Contains(rel, "/mdev_supported_types/"):
		td := filepath.Dir(rel)
		pdir := filepath.Dir(filepath.Dir(td))
		return t.createMdev(pdir, filepath.Base(td), val)
	case base == "remove" && strings.HasPrefix(rel, "bus/mdev/devices/"):
		return t.removeMdev(filepath.Base(filepath.Dir(rel)))
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (t *Tree) probe(addr string) error {
	link, err := os.Readlink(t.S("bus/pci/devices/" + addr))
	if err != nil {
		return &fs.PathError{Op: "write", Path: t.S("bus/pci/drivers_probe"), Err: syscall.ENODEV}
	}
	dir, _ := filepath.Rel(t.Sys, filepath.Join(t.S("bus/pci/devices"), link))
	if _, err := os.Lstat(t.S(dir + "/driver")); err == nil {
		return nil
	}
	ov, err := os.ReadFile(t.S(dir + "/driver_override"))
	if err != nil {
		return err
	}
	drv := strings.TrimSpace(string(ov))
	if drv == "(null)" {
		return nil
	}
	if _, err := os.Stat(t.S("bus/pci/drivers/" + drv)); err != nil {
		return nil // no such driver loaded: the device stays unbound
	}
	t.bind(dir, addr, drv)
	return nil
}

func readInt(p string) (int, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// Links lists every symlink under the tree's /sys with its target, sorted:
// a compact picture of a layout for golden files and failure messages.
func (t *Tree) Links() []string {
	var out []string
	filepath.WalkDir(t.Sys, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.Type()&fs.ModeSymlink == 0 {
			return nil
		}
		target, _ := os.Readlink(p)
		rel, _ := filepath.Rel(t.Sys, p)
		out = append(out, rel+" -> "+target)
		return nil
	})
	sort.Strings(out)
	return out
}
