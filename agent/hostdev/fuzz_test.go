package hostdev

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/otherix/otherix-agent/agent/hostdev/sysfstest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

const fuzzVM = "0f8fad5b-d9cb-469f-a165-70867728950e"

// fuzzHost is a host with an IOMMU and a device of each kind, for the
// fuzz targets (workstation in resolve_test.go is the same machine, made
// for a *testing.T):
//
//	group 0  0000:00:00.0 host bridge
//	group 1  0000:00:01.0 root port (pcieport)
//	         0000:01:00.0 NVIDIA GPU (vfio-pci), DRM card1; 0000:01:00.1 its audio (vfio-pci)
//	group 2  0000:00:02.0 Intel iGPU (i915), mdev parent: i915-GVTg_V5_4 ×2; DRM card0
//	group 3  0000:00:14.0 xHCI: 1-1 receiver 046d:c52b, 1-2 hub, 1-2.1 YubiKey 1050:0407
//	group 5  0000:02:00.0 NIC, no driver
//	group 7  0000:04:00.0 Intel Flex PF (i915), VFs 04:00.1 vfio-pci (group 8), 04:00.2 unbound (group 9)
//	tpm0 (TPM 2.0), tpm1 (TPM 1.2)
func fuzzHost(tb testing.TB) (*sysfstest.Tree, *Host) {
	tb.Helper()
	tr := sysfstest.New(tb)
	tr.AddDriver("vfio-pci")
	for _, d := range []sysfstest.PCI{
		{Addr: "0000:00:00.0", Vendor: 0x8086, Device: 0x3e30, Class: 0x060000, Group: 0},
		{Addr: "0000:00:01.0", Vendor: 0x8086, Device: 0x1901, Class: 0x060400, Driver: "pcieport", Group: 1},
		{Addr: "0000:01:00.0", Parent: "0000:00:01.0", Vendor: 0x10de, Device: 0x1eb8, Class: 0x030000, Driver: "vfio-pci", Group: 1},
		{Addr: "0000:01:00.1", Parent: "0000:00:01.0", Vendor: 0x10de, Device: 0x10f8, Class: 0x040300, Driver: "vfio-pci", Group: 1},
		{Addr: "0000:00:02.0", Vendor: 0x8086, Device: 0x3e92, Class: 0x030000, Driver: "i915", Group: 2},
		{Addr: "0000:00:14.0", Vendor: 0x8086, Device: 0xa36d, Class: 0x0c0330, Driver: "xhci_hcd", Group: 3},
		{Addr: "0000:02:00.0", Vendor: 0x8086, Device: 0x1533, Class: 0x020000, Group: 5},
		{Addr: "0000:04:00.0", Vendor: 0x8086, Device: 0x56c0, Class: 0x038000, Driver: "i915", Group: 7},
	} {
		tr.AddPCI(d)
	}
	tr.SRIOV("0000:04:00.0",
		sysfstest.PCI{Addr: "0000:04:00.1", Vendor: 0x8086, Device: 0x56c0, Class: 0x038000, Driver: "vfio-pci", Group: 8},
		sysfstest.PCI{Addr: "0000:04:00.2", Vendor: 0x8086, Device: 0x56c0, Class: 0x038000, Group: 9},
	)
	tr.AddMdevParent("0000:00:02.0", sysfstest.MdevType{Name: "i915-GVTg_V5_4", Available: 2})
	tr.AddDRM(0, "0000:00:02.0")
	tr.AddDRM(1, "0000:01:00.0")
	for _, u := range []sysfstest.USB{
		{Name: "1-1", Controller: "0000:00:14.0", Bus: 1, Dev: 2, Vendor: 0x046d, Product: 0xc52b, Manufacturer: "Logitech", ProductName: "USB Receiver"},
		{Name: "1-2", Controller: "0000:00:14.0", Bus: 1, Dev: 3, Vendor: 0x05e3, Product: 0x0610, Class: 0x09, ProductName: "USB2.0 Hub"},
		{Name: "1-2.1", Controller: "0000:00:14.0", Bus: 1, Dev: 4, Vendor: 0x1050, Product: 0x0407, Manufacturer: "Yubico", ProductName: "YubiKey OTP+FIDO+CCID"},
	} {
		tr.AddUSB(u)
	}
	tr.AddTPM(0, 2)
	tr.AddTPM(1, 1)
	return tr, &Host{SysRoot: tr.Sys, DevRoot: tr.Dev}
}

// isHex reports whether s is non-empty and all hex digits.
func isHex(s string) bool {
	for _, c := range []byte(s) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return s != ""
}

// cmdlineSafe reports whether s can sit in a QEMU option value: no comma
// (QEMU's separator), no '=' and no control character.
func cmdlineSafe(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if r == ',' || r == '=' || unicode.IsControl(r) {
			return false
		}
	}
	return true
}

// FuzzParsePCIAddress checks ParsePCIAddress against a parser written
// from its contract: DDDD:BB:DD.F in hex, device 00-1f, function 0-7. An
// accepted address is canonical (lower case, zero-padded, the same
// numbers), a fixed point, and safe on QEMU's command line; a refused one
// is validation_failed.
func FuzzParsePCIAddress(f *testing.F) {
	for _, s := range []string{"0000:01:00.0", "0000:00:1F.6", "0000:00:1f.7", "ffff:ff:1f.7", "0001:0a:02.3",
		"01:00.0", "0000:01:20.0", "0000:01:00.8", "0000:01:00.0\n", " 0000:01:00.0", "0000:01:00.0,x=y", "0x00:01:00.0", "0000:01:00.00", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParsePCIAddress(s)
		valid := len(s) == 12 && s[4] == ':' && s[7] == ':' && s[10] == '.' &&
			isHex(s[0:4]) && isHex(s[5:7]) && isHex(s[8:10]) && '0' <= s[11] && s[11] <= '7'
		var dom, bus, dev, fn uint64
		if valid {
			dom, _ = strconv.ParseUint(s[0:4], 16, 16)
			bus, _ = strconv.ParseUint(s[5:7], 16, 8)
			dev, _ = strconv.ParseUint(s[8:10], 16, 8)
			fn = uint64(s[11] - '0')
			valid = dev <= 0x1f
		}
		if valid != (err == nil) {
			t.Fatalf("ParsePCIAddress(%q) = %q, %v; valid: %v", s, a, err, valid)
		}
		if err != nil {
			if errcode.Of(err) != errcode.ValidationFailed {
				t.Fatalf("ParsePCIAddress(%q): %v, want validation_failed", s, err)
			}
			return
		}
		if want := fmt.Sprintf("%04x:%02x:%02x.%x", dom, bus, dev, fn); a != want {
			t.Fatalf("ParsePCIAddress(%q) = %q, want %q", s, a, want)
		}
		if again, err := ParsePCIAddress(a); err != nil || again != a {
			t.Fatalf("ParsePCIAddress(%q) = %q, %v: not a fixed point", a, again, err)
		}
		if !cmdlineSafe(a) || strings.ContainsAny(a, " /") {
			t.Fatalf("ParsePCIAddress(%q) = %q: unsafe", s, a)
		}
	})
}

// FuzzParseHexID checks parseHexID, which reads the vendor and product
// IDs of requests: 1-4 hex digits after an optional 0x, normalized to four
// lower-case digits of the same value; anything else validation_failed.
func FuzzParseHexID(f *testing.F) {
	for _, s := range []string{"10de", "10DE", "0x10de", "0X1050", "046d", "0x0", "1", "c52b", "0x", "10de0", "0x0x1", "-1", "+1", "10de\n", "１０de", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := parseHexID("vendor_id", s)
		digits := s
		if len(s) > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X') {
			digits = s[2:]
		}
		valid := len(digits) <= 4 && isHex(digits)
		if valid != (err == nil) {
			t.Fatalf("parseHexID(%q) = %q, %v; valid: %v", s, id, err, valid)
		}
		if err != nil {
			if errcode.Of(err) != errcode.ValidationFailed {
				t.Fatalf("parseHexID(%q): %v, want validation_failed", s, err)
			}
			return
		}
		v, _ := strconv.ParseUint(digits, 16, 16)
		if want := fmt.Sprintf("%04x", v); id != want {
			t.Fatalf("parseHexID(%q) = %q, want %q", s, id, want)
		}
		if again, err := parseHexID("vendor_id", id); err != nil || again != id {
			t.Fatalf("parseHexID(%q) = %q, %v: not a fixed point", id, again, err)
		}
	})
}

// specStrings lists every string of s, however deep.
func specStrings(v reflect.Value, out *[]string) {
	switch v.Kind() {
	case reflect.String:
		*out = append(*out, v.String())
	case reflect.Pointer:
		if !v.IsNil() {
			specStrings(v.Elem(), out)
		}
	case reflect.Slice:
		for i := 0; i < v.Len(); i++ {
			specStrings(v.Index(i), out)
		}
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			specStrings(v.Field(i), out)
		}
	}
}

// checkArgs checks QEMU options from Args: each option value is a
// comma-separated list whose first item is a driver or backend name and
// whose others are key=value with one '=', nothing empty, no control
// character: no string of the plan can add or change an option.
func checkArgs(t *testing.T, args []string) {
	t.Helper()
	if len(args)%2 != 0 {
		t.Fatalf("odd argv %q", args)
	}
	for i := 0; i < len(args); i += 2 {
		if args[i] != "-device" && args[i] != "-tpmdev" {
			t.Fatalf("option %q in %q", args[i], args)
		}
		v := args[i+1]
		if !utf8.ValidString(v) || strings.IndexFunc(v, unicode.IsControl) >= 0 {
			t.Fatalf("option %s %q has a control character", args[i], v)
		}
		parts := strings.Split(v, ",")
		if parts[0] == "" || strings.Contains(parts[0], "=") {
			t.Fatalf("option %s %q: driver %q", args[i], v, parts[0])
		}
		for _, p := range parts[1:] {
			k, val, ok := strings.Cut(p, "=")
			if !ok || k == "" || val == "" || strings.Contains(val, "=") {
				t.Fatalf("option %s %q: item %q is not key=value", args[i], v, p)
			}
		}
	}
}

// resolvedCodes are the codes Resolve documents (conflict: an mdev of the
// VM left with another type; internal: sysfs unreadable).
var resolvedCodes = map[errcode.Code]bool{
	errcode.ValidationFailed: true, errcode.DeviceNotFound: true, errcode.IOMMUUnavailable: true,
	errcode.DeviceBusy: true, errcode.Conflict: true, errcode.Internal: true,
}

// checkPlan resolves s on h and checks the plan and its QEMU options. It
// returns the plan, nil if s did not resolve.
func checkPlan(t *testing.T, h *Host, s *Spec) *Plan {
	t.Helper()
	p, err := h.Resolve(context.Background(), fuzzVM, s, nil)
	if err != nil {
		if !resolvedCodes[errcode.Of(err)] {
			t.Fatalf("Resolve(%+v): %v: undocumented code", s, err)
		}
		return nil
	}
	var files []string
	fdset := func(path string, flags int) string {
		if !strings.HasPrefix(path, h.DevRoot+"/") && path != "/dev/null" && !strings.HasPrefix(path, h.SysRoot+"/") {
			t.Fatalf("fd set for %q, outside /dev and /sys", path)
		}
		files = append(files, path)
		return "/dev/fdset/" + strconv.Itoa(len(files))
	}
	args, err := p.Args(Layout{}, fdset)
	if err != nil {
		t.Fatalf("Args of a resolved plan %+v: %v", p, err)
	}
	checkArgs(t, args)
	for _, d := range p.VFIO {
		if d.Mdev == nil {
			if a, err := ParsePCIAddress(d.Address); err != nil || a != d.Address {
				t.Fatalf("plan address %q is not canonical", d.Address)
			}
		}
	}
	// The plan is persisted: decoded again, it gives the same options.
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var back Plan
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	n := len(files)
	files = nil
	again, err := back.Args(Layout{}, fdset)
	if err != nil || !reflect.DeepEqual(again, args) || len(files) != n {
		t.Fatalf("plan %s decoded again gives %q, %v; want %q", b, again, err, args)
	}
	return p
}

// FuzzSpec checks Spec.Validate, then Resolve and Plan.Args on a fake
// host, for one device of each kind built from the fuzzed fields. Nothing
// panics; a refused spec is validation_failed; in an accepted one no
// string has a comma, '=' or control character; a resolved plan has
// canonical addresses, gives well-formed QEMU options (checkArgs), and
// gives the same ones once persisted and decoded again.
func FuzzSpec(f *testing.F) {
	type seed struct {
		pci                                               string
		gpuType, gpuPCI, gpuMdev, gpuVendor, gpuProd, gpu string
		usbBus, usbDev                                    int
		usbVendor, usbProd, tpm, tpmRM                    string
	}
	for _, s := range []seed{
		{pci: "0000:01:00.0"},
		{pci: "0000:02:00.0", usbBus: 1, usbDev: 2, tpm: "/dev/tpm0"},
		{gpuType: GPUPhysical, gpuVendor: "0x10DE", usbVendor: "1050", tpm: "/dev/tpm1"},
		{gpuType: GPUPhysical, gpu: "1", usbVendor: "046d", usbProd: "C52B"},
		{gpuType: GPUPhysical, gpuPCI: "0000:01:00.0", gpuProd: "1eb8"},
		{gpuType: GPUSRIOV, gpuPCI: "0000:04:00.0"},
		{pci: "0000:01:00.1", gpuType: GPUMdev, gpuMdev: "i915-GVTg_V5_4"},
		{gpuType: GPUMdev, gpuMdev: "i915-GVTg_V5_4", gpuPCI: "0000:00:02.0"},
		{gpuType: GPUMdev, gpuMdev: "5B4C5E1A-3B7D-4C8E-9F1A-2B3C4D5E6F70"},
		{gpuType: GPUMdev, gpuMdev: "../../etc"},
		{gpuType: GPUMIG, gpuMdev: "MIG-7c9e6679-7425-40de-944b-e07fc1f90ae7"},
		{pci: "0000:01:00.0,x-vga=on"},
		{usbBus: 1, usbDev: 3},
		{usbBus: 1, usbDev: 2, usbVendor: "046d", usbProd: "c52b"},
		{usbBus: 256, usbDev: 0},
		{tpm: "/dev/tpmrm0"},
		{tpm: "/dev/tpm0", tpmRM: "/dev/tpmrm0"},
		{tpm: "/dev/tpm0,cancel-path=/x"},
	} {
		f.Add(s.pci, s.gpuType, s.gpuPCI, s.gpuMdev, s.gpuVendor, s.gpuProd, s.gpu, s.usbBus, s.usbDev, s.usbVendor, s.usbProd, s.tpm, s.tpmRM)
	}
	_, h := fuzzHost(f)
	f.Fuzz(func(t *testing.T, pci, gpuType, gpuPCI, gpuMdev, gpuVendor, gpuProd, gpu string, usbBus, usbDev int, usbVendor, usbProd, tpm, tpmRM string) {
		s := &Spec{}
		if pci != "" {
			s.PCI = []PCI{{Address: pci}}
		}
		if gpuType+gpuPCI+gpuMdev+gpuVendor+gpuProd+gpu != "" {
			s.GPU = []GPU{{Type: gpuType, PCI: gpuPCI, Mdev: gpuMdev, VendorID: gpuVendor, ProductID: gpuProd, ID: gpu}}
		}
		if usbBus != 0 || usbDev != 0 || usbVendor != "" || usbProd != "" {
			u := USB{VendorID: usbVendor, ProductID: usbProd}
			if usbBus != 0 || usbDev != 0 {
				u.Bus, u.Dev = &usbBus, &usbDev
			}
			s.USB = []USB{u}
		}
		if tpm != "" || tpmRM != "" {
			s.TPM = &TPM{Path: tpm, PathRM: tpmRM}
		}
		if err := s.Validate(); err != nil {
			if errcode.Of(err) != errcode.ValidationFailed {
				t.Fatalf("Validate(%+v): %v, want validation_failed", s, err)
			}
			return
		}
		var strs []string
		specStrings(reflect.ValueOf(s), &strs)
		for _, x := range strs {
			if !cmdlineSafe(x) {
				t.Fatalf("Validate accepted %q", x)
			}
		}
		checkPlan(t, h, s)
	})
}

// FuzzSysfsAttrs rewrites the attribute files of a GPU (vendor, device,
// class) and of a USB device (busnum, devnum, idVendor, idProduct,
// bDeviceClass) with anything, then reads them and resolves a GPU by
// vendor and the USB device by vendor. Nothing panics; readPCI's errors
// are coded; a value read is the file's, trimmed; a resolved plan keeps
// FuzzSpec's invariants and its USB node is the one of the bus and device
// numbers read.
func FuzzSysfsAttrs(f *testing.F) {
	f.Add("0x10de\n", "0x1eb8\n", "0x030000\n", "1\n", "2\n", "046d\n", "c52b\n", "00\n")
	f.Add("0x10de\n", "0x1eb8\n", "0x040300\n", "1\n", "3\n", "046d\n", "c52b\n", "09\n")
	f.Add("0x10DE", "0x1EB8", "0X030000", "001", "002", "046D", "C52B", "0")
	f.Add("10de\n", "", "0x0300000000\n", "-1\n", "2\n", "046d\n", "", "ff\n")
	f.Add("", "", "", "", "", "", "", "")
	f.Add("0x10de\n", "0x1eb8\n", "0xzz\n", "1 2\n", "+2\n", "046d,x=y\n", "c52b\n", "00\n")
	tr, h := fuzzHost(f)
	gpu := tr.S("bus/pci/devices/0000:01:00.0")
	usb := tr.S("bus/usb/devices/1-1")
	write := func(t *testing.T, dir, name, content string) {
		p := filepath.Join(dir, name)
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	f.Fuzz(func(t *testing.T, vendor, device, class, busnum, devnum, idVendor, idProduct, devClass string) {
		for name, v := range map[string]string{"vendor": vendor, "device": device, "class": class} {
			write(t, gpu, name, v)
		}
		for name, v := range map[string]string{"busnum": busnum, "devnum": devnum, "idVendor": idVendor, "idProduct": idProduct, "bDeviceClass": devClass} {
			write(t, usb, name, v)
		}
		d, err := h.readPCI("0000:01:00.0")
		if err != nil {
			if errcode.Of(err) != errcode.Internal {
				t.Fatalf("readPCI: %v, want internal", err)
			}
		} else {
			if d.Vendor != strings.TrimPrefix(strings.TrimSpace(vendor), "0x") || d.Device != strings.TrimPrefix(strings.TrimSpace(device), "0x") {
				t.Fatalf("readPCI: vendor %q device %q from %q %q", d.Vendor, d.Device, vendor, device)
			}
			c, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(class), "0x"), 16, 32)
			if err != nil || uint32(c) != d.Class {
				t.Fatalf("readPCI: class %#x from %q", d.Class, class)
			}
		}
		if u, err := h.readUSB("1-1"); err == nil {
			bus, berr := strconv.Atoi(strings.TrimSpace(busnum))
			dev, derr := strconv.Atoi(strings.TrimSpace(devnum))
			if berr != nil || derr != nil || u.bus != bus || u.dev != dev || u.vendor != strings.TrimSpace(idVendor) || u.class != strings.TrimSpace(devClass) {
				t.Fatalf("readUSB: %+v from %q %q %q", u, busnum, idVendor, devClass)
			}
		}
		s := &Spec{GPU: []GPU{{Type: GPUPhysical, VendorID: "10de"}}, USB: []USB{{VendorID: "046d"}}}
		if p := checkPlan(t, h, s); p != nil {
			u := p.USB[0]
			if want := h.dev("bus/usb", fmt.Sprintf("%03d", u.Bus), fmt.Sprintf("%03d", u.Dev)); u.Node != want || u.Name != "1-1" {
				t.Fatalf("usb %+v, want node %s", u, want)
			}
		}
	})
}
