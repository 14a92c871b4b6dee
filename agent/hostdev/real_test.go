package hostdev

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/hostdev/sysfstest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// realPCI lists this machine's PCI functions, or skips.
func realPCI(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/sys/bus/pci/devices")
	if err != nil || len(ents) == 0 {
		t.Skipf("no PCI devices in /sys: %v", err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func hex(t *testing.T, path string, bits int) uint64 {
	t.Helper()
	s, err := readAttr(path)
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.ParseUint(strings.TrimPrefix(s, "0x"), 16, bits)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return v
}

// TestTreeMatchesRealSysfs rebuilds this machine's PCI functions in a fake
// tree and compares it with the real /sys: the bus entry's link, the
// driver, subsystem and iommu_group links, the driver's back link and the
// attribute files, byte for byte. It is what keeps sysfstest honest.
func TestTreeMatchesRealSysfs(t *testing.T) {
	t.Parallel()
	addrs := realPCI(t)
	tr := sysfstest.New(t)
	for _, a := range addrs {
		dir := filepath.Join("/sys/bus/pci/devices", a)
		real, err := filepath.EvalSymlinks(dir)
		if err != nil {
			t.Fatal(err)
		}
		parent := filepath.Base(filepath.Dir(real))
		if strings.HasPrefix(parent, "pci") {
			parent = ""
		}
		group := -1
		if g := linkBase(filepath.Join(dir, "iommu_group")); g != "" {
			group, _ = strconv.Atoi(g)
		}
		tr.AddPCI(sysfstest.PCI{
			Addr: a, Parent: parent,
			Vendor:    uint16(hex(t, filepath.Join(dir, "vendor"), 16)),
			Device:    uint16(hex(t, filepath.Join(dir, "device"), 16)),
			Class:     uint32(hex(t, filepath.Join(dir, "class"), 32)),
			SubVendor: uint16(hex(t, filepath.Join(dir, "subsystem_vendor"), 16)),
			SubDevice: uint16(hex(t, filepath.Join(dir, "subsystem_device"), 16)),
			Revision:  uint8(hex(t, filepath.Join(dir, "revision"), 8)),
			Driver:    linkBase(filepath.Join(dir, "driver")),
			Group:     group,
		})
	}
	compared := 0
	for _, a := range addrs {
		realDir := filepath.Join("/sys/bus/pci/devices", a)
		fakeDir := tr.S("bus/pci/devices/" + a)
		links := []string{"", "driver", "subsystem", "iommu_group", "physfn"}
		for _, l := range links {
			rp, fp := filepath.Join(realDir, l), filepath.Join(fakeDir, l)
			if l == "" {
				rp, fp = realDir, fakeDir
			}
			rt, rerr := os.Readlink(rp)
			ft, ferr := os.Readlink(fp)
			if (rerr == nil) != (ferr == nil) || rt != ft {
				t.Errorf("%s link %q: real %q (%v), fake %q (%v)", a, l, rt, rerr, ft, ferr)
			}
			compared++
		}
		if drv := linkBase(filepath.Join(realDir, "driver")); drv != "" {
			back := "bus/pci/drivers/" + drv + "/" + a
			rt, _ := os.Readlink("/sys/" + back)
			ft, _ := os.Readlink(tr.S(back))
			if rt != ft {
				t.Errorf("%s: driver back link: real %q, fake %q", a, rt, ft)
			}
			compared++
		}
		for _, f := range []string{"vendor", "device", "class", "subsystem_vendor", "subsystem_device", "revision", "driver_override", "uevent", "modalias", "numa_node"} {
			rb, rerr := os.ReadFile(filepath.Join(realDir, f))
			fb, ferr := os.ReadFile(filepath.Join(fakeDir, f))
			if rerr != nil || ferr != nil || string(rb) != string(fb) {
				t.Errorf("%s/%s: real %q (%v), fake %q (%v)", a, f, rb, rerr, fb, ferr)
			}
			compared++
		}
	}
	t.Logf("%d PCI functions, %d links and files compared with the real /sys", len(addrs), compared)
}

// TestRealSysfs resolves requests against this machine's real /sys and
// /dev. On a host without an IOMMU (this one: no groups, CONFIG_VFIO off)
// every PCI device is iommu_unavailable; on any host, absent devices are
// device_not_found.
func TestRealSysfs(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	addrs := realPCI(t)
	h := &Host{}
	iommu := h.hasIOMMU()
	for _, a := range addrs {
		_, err := h.Resolve(ctx, vmA, &Spec{PCI: []PCI{{Address: a}}}, nil)
		d, rerr := h.readPCI(a)
		if rerr != nil {
			t.Fatal(rerr)
		}
		switch {
		case d.isBridge():
			if errcode.Of(err) != errcode.ValidationFailed {
				t.Errorf("%s (bridge): %v, want validation_failed", a, err)
			}
		case !iommu:
			if errcode.Of(err) != errcode.IOMMUUnavailable {
				t.Errorf("%s on a host without IOMMU: %v, want iommu_unavailable", a, err)
			}
		default:
			t.Logf("%s on a host with an IOMMU: %v", a, err)
		}
	}
	for _, tc := range []struct {
		name string
		spec Spec
		code errcode.Code
	}{
		{"absent pci", Spec{PCI: []PCI{{Address: "0000:fe:1f.7"}}}, errcode.DeviceNotFound},
		{"absent usb", Spec{USB: []USB{{Bus: ip(255), Dev: ip(127)}}}, errcode.DeviceNotFound},
		{"absent tpm", Spec{TPM: &TPM{Path: "/dev/tpm99"}}, errcode.DeviceNotFound},
		{"absent mdev type", Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "otherix-no-such-type"}}}, errcode.DeviceNotFound},
		{"absent gpu", Spec{GPU: []GPU{{Type: GPUPhysical, VendorID: "fffe"}}}, errcode.DeviceNotFound},
		{"bad address", Spec{PCI: []PCI{{Address: "00:01.0"}}}, errcode.ValidationFailed},
	} {
		if _, err := h.Resolve(ctx, vmA, &tc.spec, nil); errcode.Of(err) != tc.code {
			t.Errorf("%s: %v, want %s", tc.name, err, tc.code)
		}
	}
	t.Logf("host IOMMU groups: %v; USB bus: %v; mdev bus: %v", iommu, fileExists("/sys/bus/usb/devices"), fileExists("/sys/bus/mdev"))
}
