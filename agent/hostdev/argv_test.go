package hostdev

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/internal/errcode"
)

var update = flag.Bool("update", false, "rewrite golden files")

// fakeFDs stands in for the engine: each file gets the next descriptor
// (3, 4, ...) in a new fd set.
type fakeFDs struct {
	args  []string
	files []string
}

func (f *fakeFDs) fdset(path string, flags int) string {
	fd := 3 + len(f.files)
	set := len(f.files) + 1
	mode := map[int]string{os.O_RDWR: "O_RDWR", os.O_WRONLY: "O_WRONLY", os.O_RDONLY: "O_RDONLY"}[flags]
	f.files = append(f.files, fmt.Sprintf("fd %d: %s %s", fd, path, mode))
	f.args = append(f.args, "-add-fd", fmt.Sprintf("fd=%d,set=%d", fd, set))
	return fmt.Sprintf("/dev/fdset/%d", set)
}

// goldenPlan has one device of each kind, as Resolve and Acquire leave it.
func goldenPlan() *Plan {
	return &Plan{
		VM: vmA,
		VFIO: []VFIODev{
			{Kind: KindPCI, Address: "0000:02:00.0", Group: 5, Vendor: "8086", Device: "1533", Driver: "vfio-pci"},
			{Kind: KindGPU, Address: "0000:01:00.0", Group: 1, Vendor: "10de", Device: "1eb8", Driver: "vfio-pci"},
			{Kind: KindVF, Address: "0000:04:00.1", PF: "0000:04:00.0", Group: 8, Vendor: "8086", Device: "56c0", Driver: "vfio-pci"},
			{Kind: KindMdev, Mdev: &MdevDev{UUID: "5b4c5e1a-3b7d-4c8e-9f1a-2b3c4d5e6f70", Parent: "0000:00:02.0", Type: "i915-GVTg_V5_4", Create: true}, Group: 100},
		},
		USB: []USBDev{
			{Name: "1-1", Bus: 1, Dev: 2, Vendor: "046d", Product: "c52b", Node: "/dev/bus/usb/001/002"},
			{Name: "1-2.1", Bus: 1, Dev: 4, Vendor: "1050", Product: "0407", Node: "/dev/bus/usb/001/004"},
		},
		TPM: &TPMDev{Path: "/dev/tpm0", Cancel: "/dev/null", Version: 2},
	}
}

func TestArgsGolden(t *testing.T) {
	many := &Plan{VM: vmA}
	for i := 0; i < 10; i++ {
		many.VFIO = append(many.VFIO, VFIODev{Kind: KindVF, Address: fmt.Sprintf("0000:04:%02x.%d", i/8, i%8), Group: 20 + i, Driver: "vfio-pci"})
	}
	tpm12 := &Plan{VM: vmA, TPM: &TPMDev{Path: "/dev/tpm1", Cancel: "/sys/class/tpm/tpm1/device/cancel", Version: 1}}
	for _, tc := range []struct {
		name   string
		plan   *Plan
		layout Layout
	}{
		{"all-kinds", goldenPlan(), Layout{}},
		{"arm64", goldenPlan(), Layout{Arch: "arm64"}},
		{"many-vfio", many, Layout{}},
		{"tpm12", tpm12, Layout{}},
		{"empty", &Plan{VM: vmA}, Layout{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var f fakeFDs
			args, err := tc.plan.Args(tc.layout, f.fdset)
			if err != nil {
				t.Fatal(err)
			}
			got := strings.Join(append(f.args, args...), "\n") + "\n-- files the engine opens and passes\n" + strings.Join(f.files, "\n") + "\n"
			path := filepath.Join("testdata", tc.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if got != string(want) {
				t.Errorf("argv differs from %s (go test -update to accept):\n%s", path, got)
			}
		})
	}
}

func TestArgsRefuses(t *testing.T) {
	var f fakeFDs
	huge := &Plan{VM: vmA}
	for i := 0; i < 57; i++ {
		huge.VFIO = append(huge.VFIO, VFIODev{Kind: KindPCI, Address: "0000:04:00.0"})
	}
	usb := &Plan{VM: vmA}
	for i := 0; i < MaxUSB+1; i++ {
		usb.USB = append(usb.USB, USBDev{Node: "/dev/bus/usb/001/002"})
	}
	for _, tc := range []struct {
		name   string
		plan   *Plan
		layout Layout
	}{
		{"arch", goldenPlan(), Layout{Arch: "riscv64"}},
		{"too many vfio", huge, Layout{}},
		{"too many usb", usb, Layout{}},
		{"bad address", &Plan{VFIO: []VFIODev{{Kind: KindPCI, Address: "0000:01:00.0,x-vga=on"}}}, Layout{}},
		{"bad mdev", &Plan{VFIO: []VFIODev{{Kind: KindMdev, Mdev: &MdevDev{UUID: "../../x"}}}}, Layout{}},
	} {
		if _, err := tc.plan.Args(tc.layout, f.fdset); errcode.Of(err) != errcode.ValidationFailed {
			t.Errorf("%s: %v, want validation_failed", tc.name, err)
		}
	}
}
