package hostdev

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/hostdev/sysfstest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

const (
	vmA = "0f8fad5b-d9cb-469f-a165-70867728950e"
	vmB = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
)

// workstation is a host with an IOMMU and a bit of everything:
//
//	group 0  0000:00:00.0 host bridge
//	group 1  0000:00:01.0 root port (pcieport)
//	         0000:01:00.0 NVIDIA GPU (vfio-pci)       DRM card1
//	         0000:01:00.1 its HDMI audio (vfio-pci)
//	group 2  0000:00:02.0 Intel iGPU (i915), mdev parent: i915-GVTg_V5_4 ×2, i915-GVTg_V5_8 ×0; DRM card0
//	group 3  0000:00:14.0 xHCI (xhci_hcd): bus 1: 1-1 receiver 046d:c52b, 1-2 hub,
//	         1-2.1 YubiKey 1050:0407, 1-2.2 another receiver 046d:c52b
//	group 4  0000:00:1f.6 NIC (e1000e)
//	group 5  0000:02:00.0 NIC, no driver
//	group 6  0000:03:00.0 AMD GPU (vfio-pci) + 0000:03:00.1 its audio (snd_hda_intel)
//	group 7  0000:04:00.0 Intel Flex PF (i915), VFs: 04:00.1 vfio-pci (group 8),
//	         04:00.2 unbound (group 9), 04:00.3 i915 (group 10)
//	tpm0 (TPM 2.0), tpm1 (TPM 1.2)
func workstation(t *testing.T) (*sysfstest.Tree, *Host) {
	t.Helper()
	tr := sysfstest.New(t)
	tr.AddDriver("vfio-pci")
	for _, d := range []sysfstest.PCI{
		{Addr: "0000:00:00.0", Vendor: 0x8086, Device: 0x3e30, Class: 0x060000, Group: 0},
		{Addr: "0000:00:01.0", Vendor: 0x8086, Device: 0x1901, Class: 0x060400, Driver: "pcieport", Group: 1},
		{Addr: "0000:01:00.0", Parent: "0000:00:01.0", Vendor: 0x10de, Device: 0x1eb8, Class: 0x030000, Driver: "vfio-pci", Group: 1},
		{Addr: "0000:01:00.1", Parent: "0000:00:01.0", Vendor: 0x10de, Device: 0x10f8, Class: 0x040300, Driver: "vfio-pci", Group: 1},
		{Addr: "0000:00:02.0", Vendor: 0x8086, Device: 0x3e92, Class: 0x030000, Driver: "i915", Group: 2},
		{Addr: "0000:00:14.0", Vendor: 0x8086, Device: 0xa36d, Class: 0x0c0330, Driver: "xhci_hcd", Group: 3},
		{Addr: "0000:00:1f.6", Vendor: 0x8086, Device: 0x15bc, Class: 0x020000, Driver: "e1000e", Group: 4},
		{Addr: "0000:02:00.0", Vendor: 0x8086, Device: 0x1533, Class: 0x020000, Group: 5},
		{Addr: "0000:03:00.0", Vendor: 0x1002, Device: 0x67df, Class: 0x030000, Driver: "vfio-pci", Group: 6},
		{Addr: "0000:03:00.1", Vendor: 0x1002, Device: 0xaaf0, Class: 0x040300, Driver: "snd_hda_intel", Group: 6},
		{Addr: "0000:04:00.0", Vendor: 0x8086, Device: 0x56c0, Class: 0x038000, Driver: "i915", Group: 7},
	} {
		tr.AddPCI(d)
	}
	tr.SRIOV("0000:04:00.0",
		sysfstest.PCI{Addr: "0000:04:00.1", Vendor: 0x8086, Device: 0x56c0, Class: 0x038000, Driver: "vfio-pci", Group: 8},
		sysfstest.PCI{Addr: "0000:04:00.2", Vendor: 0x8086, Device: 0x56c0, Class: 0x038000, Group: 9},
		sysfstest.PCI{Addr: "0000:04:00.3", Vendor: 0x8086, Device: 0x56c0, Class: 0x038000, Driver: "i915", Group: 10},
	)
	tr.AddMdevParent("0000:00:02.0", sysfstest.MdevType{Name: "i915-GVTg_V5_4", Available: 2}, sysfstest.MdevType{Name: "i915-GVTg_V5_8", Available: 0})
	tr.AddDRM(0, "0000:00:02.0")
	tr.AddDRM(1, "0000:01:00.0")
	for _, u := range []sysfstest.USB{
		{Name: "1-1", Controller: "0000:00:14.0", Bus: 1, Dev: 2, Vendor: 0x046d, Product: 0xc52b, Manufacturer: "Logitech", ProductName: "USB Receiver"},
		{Name: "1-2", Controller: "0000:00:14.0", Bus: 1, Dev: 3, Vendor: 0x05e3, Product: 0x0610, Class: 0x09, ProductName: "USB2.0 Hub"},
		{Name: "1-2.1", Controller: "0000:00:14.0", Bus: 1, Dev: 4, Vendor: 0x1050, Product: 0x0407, Manufacturer: "Yubico", ProductName: "YubiKey OTP+FIDO+CCID"},
		{Name: "1-2.2", Controller: "0000:00:14.0", Bus: 1, Dev: 5, Vendor: 0x046d, Product: 0xc52b, Manufacturer: "Logitech", ProductName: "USB Receiver"},
	} {
		tr.AddUSB(u)
	}
	tr.AddTPM(0, 2)
	tr.AddTPM(1, 1)
	return tr, &Host{SysRoot: tr.Sys, DevRoot: tr.Dev, Write: tr.Write}
}

func ip(n int) *int { return &n }

func TestResolve(t *testing.T) {
	t.Parallel()
	// Resolve only reads: one tree for every case, no device held.
	tr, host := workstation(t)
	for _, tc := range []struct {
		name string
		spec Spec
		code errcode.Code // "" = success
		msg  string       // a piece of the error message
		want string       // success: the plan, summarized (see summary)
	}{
		{name: "pci vfio-bound, group with bridge and sibling", spec: Spec{PCI: []PCI{{Address: "0000:01:00.0"}}}, want: "pci 0000:01:00.0 g1 vfio-pci 10de:1eb8"},
		{name: "pci upper case", spec: Spec{PCI: []PCI{{Address: "0000:00:1F.6"}}}, code: errcode.DeviceBusy, msg: "pci device 0000:00:1f.6 is bound"},
		{name: "pci unbound: acquire binds", spec: Spec{PCI: []PCI{{Address: "0000:02:00.0"}}}, want: "pci 0000:02:00.0 g5 - 8086:1533"},
		{name: "pci bad syntax", spec: Spec{PCI: []PCI{{Address: "01:00.0"}}}, code: errcode.ValidationFailed, msg: "DDDD:BB:DD.F"},
		{name: "pci bad device number", spec: Spec{PCI: []PCI{{Address: "0000:01:20.0"}}}, code: errcode.ValidationFailed},
		{name: "pci bad function", spec: Spec{PCI: []PCI{{Address: "0000:01:00.8"}}}, code: errcode.ValidationFailed},
		{name: "pci missing", spec: Spec{PCI: []PCI{{Address: "0000:09:00.0"}}}, code: errcode.DeviceNotFound, msg: "no pci device 0000:09:00.0"},
		{name: "pci host driver", spec: Spec{PCI: []PCI{{Address: "0000:00:1f.6"}}}, code: errcode.DeviceBusy, msg: "host driver e1000e"},
		{name: "pci group not viable", spec: Spec{PCI: []PCI{{Address: "0000:03:00.0"}}}, code: errcode.DeviceBusy, msg: "group 6 also holds 0000:03:00.1, bound to the host driver snd_hda_intel"},
		{name: "pci bridge", spec: Spec{PCI: []PCI{{Address: "0000:00:01.0"}}}, code: errcode.ValidationFailed, msg: "bridge"},
		{name: "pci twice", spec: Spec{PCI: []PCI{{Address: "0000:01:00.0"}, {Address: "0000:01:00.0"}}}, code: errcode.ValidationFailed, msg: "twice"},
		{name: "pci and gpu on one function", spec: Spec{PCI: []PCI{{Address: "0000:01:00.0"}}, GPU: []GPU{{Type: GPUPhysical, VendorID: "10de"}}}, code: errcode.ValidationFailed, msg: "twice"},
		{name: "two functions of one group", spec: Spec{PCI: []PCI{{Address: "0000:01:00.0"}, {Address: "0000:01:00.1"}}}, want: "pci 0000:01:00.0 g1 vfio-pci 10de:1eb8; pci 0000:01:00.1 g1 vfio-pci 10de:10f8"},

		{name: "gpu physical by pci", spec: Spec{GPU: []GPU{{Type: GPUPhysical, PCI: "0000:01:00.0"}}}, want: "gpu 0000:01:00.0 g1 vfio-pci 10de:1eb8"},
		{name: "gpu physical by vendor", spec: Spec{GPU: []GPU{{Type: GPUPhysical, VendorID: "0x10DE"}}}, want: "gpu 0000:01:00.0 g1 vfio-pci 10de:1eb8"},
		{name: "gpu physical by vendor and product", spec: Spec{GPU: []GPU{{Type: GPUPhysical, VendorID: "1002", ProductID: "67df"}}}, code: errcode.DeviceBusy, msg: "snd_hda_intel"},
		{name: "gpu physical vendor ambiguous", spec: Spec{GPU: []GPU{{Type: GPUPhysical, VendorID: "8086"}}}, code: errcode.ValidationFailed, msg: "GPUs match 8086"},
		{name: "gpu physical vendor absent", spec: Spec{GPU: []GPU{{Type: GPUPhysical, VendorID: "1234"}}}, code: errcode.DeviceNotFound},
		{name: "gpu physical by drm id", spec: Spec{GPU: []GPU{{Type: GPUPhysical, ID: "1"}}}, want: "gpu 0000:01:00.0 g1 vfio-pci 10de:1eb8"},
		{name: "gpu physical drm id of the host's igpu", spec: Spec{GPU: []GPU{{Type: GPUPhysical, ID: "0"}}}, code: errcode.DeviceBusy, msg: "i915"},
		{name: "gpu physical drm id absent", spec: Spec{GPU: []GPU{{Type: GPUPhysical, ID: "7"}}}, code: errcode.DeviceNotFound},
		{name: "gpu physical not a gpu", spec: Spec{GPU: []GPU{{Type: GPUPhysical, PCI: "0000:02:00.0"}}}, code: errcode.ValidationFailed, msg: "not a display controller"},
		{name: "gpu physical nothing to find it by", spec: Spec{GPU: []GPU{{Type: GPUPhysical}}}, code: errcode.ValidationFailed},
		{name: "gpu container options", spec: Spec{GPU: []GPU{{Type: GPUPhysical, PCI: "0000:01:00.0", UID: ip(1000)}}}, code: errcode.ValidationFailed, msg: "containers only"},
		{name: "gpu mig", spec: Spec{GPU: []GPU{{Type: GPUMIG, MIGUUID: "MIG-7c9e6679-7425-40de-944b-e07fc1f90ae7"}}}, code: errcode.ValidationFailed, msg: "MIG-backed vGPU"},
		{name: "gpu type missing", spec: Spec{GPU: []GPU{{PCI: "0000:01:00.0"}}}, code: errcode.ValidationFailed},
		{name: "gpu type unknown", spec: Spec{GPU: []GPU{{Type: "VIRTIO", PCI: "0000:01:00.0"}}}, code: errcode.ValidationFailed},

		{name: "sriov first free vf", spec: Spec{GPU: []GPU{{Type: GPUSRIOV, PCI: "0000:04:00.0"}}}, want: "vf 0000:04:00.1 g8 vfio-pci 8086:56c0 pf=0000:04:00.0"},
		{name: "sriov two vfs", spec: Spec{GPU: []GPU{{Type: GPUSRIOV, PCI: "0000:04:00.0"}, {Type: GPUSRIOV, PCI: "0000:04:00.0"}}}, want: "vf 0000:04:00.1 g8 vfio-pci 8086:56c0 pf=0000:04:00.0; vf 0000:04:00.2 g9 - 8086:56c0 pf=0000:04:00.0"},
		{name: "sriov out of vfs", spec: Spec{GPU: []GPU{{Type: GPUSRIOV, PCI: "0000:04:00.0"}, {Type: GPUSRIOV, PCI: "0000:04:00.0"}, {Type: GPUSRIOV, PCI: "0000:04:00.0"}}}, code: errcode.DeviceBusy, msg: "host driver i915"},
		{name: "sriov not capable", spec: Spec{GPU: []GPU{{Type: GPUSRIOV, PCI: "0000:01:00.0"}}}, code: errcode.ValidationFailed, msg: "not SR-IOV capable"},
		{name: "sriov pf missing", spec: Spec{GPU: []GPU{{Type: GPUSRIOV, PCI: "0000:0a:00.0"}}}, code: errcode.DeviceNotFound},
		{name: "sriov without pci", spec: Spec{GPU: []GPU{{Type: GPUSRIOV}}}, code: errcode.ValidationFailed},

		{name: "mdev from type", spec: Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "i915-GVTg_V5_4"}}}, want: "mdev " + MdevUUID(mustUUID(vmA), 0) + " on 0000:00:02.0 type i915-GVTg_V5_4 create g-1"},
		{name: "mdev from type on parent", spec: Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "i915-GVTg_V5_4", PCI: "0000:00:02.0"}}}, want: "mdev " + MdevUUID(mustUUID(vmA), 0) + " on 0000:00:02.0 type i915-GVTg_V5_4 create g-1"},
		{name: "mdev two of a type", spec: Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "i915-GVTg_V5_4"}, {Type: GPUMdev, Mdev: "i915-GVTg_V5_4"}}}, want: "mdev " + MdevUUID(mustUUID(vmA), 0) + " on 0000:00:02.0 type i915-GVTg_V5_4 create g-1; mdev " + MdevUUID(mustUUID(vmA), 1) + " on 0000:00:02.0 type i915-GVTg_V5_4 create g-1"},
		{name: "mdev three of a type, two left", spec: Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "i915-GVTg_V5_4"}, {Type: GPUMdev, Mdev: "i915-GVTg_V5_4"}, {Type: GPUMdev, Mdev: "i915-GVTg_V5_4"}}}, code: errcode.DeviceBusy, msg: "no instance"},
		{name: "mdev type exhausted", spec: Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "i915-GVTg_V5_8"}}}, code: errcode.DeviceBusy},
		{name: "mdev type unknown", spec: Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "nvidia-63"}}}, code: errcode.DeviceNotFound, msg: "types offered: i915-GVTg_V5_4, i915-GVTg_V5_8"},
		{name: "mdev parent offers none", spec: Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "i915-GVTg_V5_4", PCI: "0000:01:00.0"}}}, code: errcode.ValidationFailed, msg: "offers no mediated devices"},
		{name: "mdev uuid absent", spec: Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "5b4c5e1a-3b7d-4c8e-9f1a-2b3c4d5e6f70"}}}, code: errcode.DeviceNotFound},
		{name: "mdev bad name", spec: Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "../../etc"}}}, code: errcode.ValidationFailed},

		{name: "usb by bus and dev", spec: Spec{USB: []USB{{Bus: ip(1), Dev: ip(2)}}}, want: "usb 1-1 1:2 046d:c52b node=dev/bus/usb/001/002"},
		{name: "usb by vendor", spec: Spec{USB: []USB{{VendorID: "1050"}}}, want: "usb 1-2.1 1:4 1050:0407 node=dev/bus/usb/001/004"},
		{name: "usb by vendor and product, ambiguous", spec: Spec{USB: []USB{{VendorID: "046d", ProductID: "c52b"}}}, code: errcode.ValidationFailed, msg: "1-1 at 1:2, 1-2.2 at 1:5"},
		{name: "usb ids and address agree", spec: Spec{USB: []USB{{Bus: ip(1), Dev: ip(5), VendorID: "046d", ProductID: "C52B"}}}, want: "usb 1-2.2 1:5 046d:c52b node=dev/bus/usb/001/005"},
		{name: "usb ids and address disagree", spec: Spec{USB: []USB{{Bus: ip(1), Dev: ip(5), VendorID: "1050"}}}, code: errcode.DeviceNotFound},
		{name: "usb hub", spec: Spec{USB: []USB{{Bus: ip(1), Dev: ip(3)}}}, code: errcode.ValidationFailed, msg: "hub"},
		{name: "usb root hub is not a device", spec: Spec{USB: []USB{{Bus: ip(1), Dev: ip(1)}}}, code: errcode.DeviceNotFound},
		{name: "usb absent", spec: Spec{USB: []USB{{Bus: ip(2), Dev: ip(9)}}}, code: errcode.DeviceNotFound},
		{name: "usb twice", spec: Spec{USB: []USB{{Bus: ip(1), Dev: ip(2)}, {VendorID: "046d", ProductID: "c52b", Bus: ip(1), Dev: ip(2)}}}, code: errcode.ValidationFailed, msg: "twice"},
		{name: "usb bus without dev", spec: Spec{USB: []USB{{Bus: ip(1)}}}, code: errcode.ValidationFailed},
		{name: "usb product without vendor", spec: Spec{USB: []USB{{ProductID: "c52b"}}}, code: errcode.ValidationFailed},
		{name: "usb bad id", spec: Spec{USB: []USB{{VendorID: "logitech"}}}, code: errcode.ValidationFailed},

		{name: "tpm 2.0", spec: Spec{TPM: &TPM{Path: "/dev/tpm0", PathRM: "/dev/tpmrm0"}}, want: "tpm dev/tpm0 v2 cancel=/dev/null"},
		{name: "tpm 1.2", spec: Spec{TPM: &TPM{Path: "/dev/tpm1"}}, want: "tpm dev/tpm1 v1 cancel=sys/class/tpm/tpm1/device/cancel"},
		{name: "tpm resource manager", spec: Spec{TPM: &TPM{Path: "/dev/tpmrm0"}}, code: errcode.ValidationFailed, msg: "resource manager"},
		{name: "tpm absent", spec: Spec{TPM: &TPM{Path: "/dev/tpm5"}}, code: errcode.DeviceNotFound},
		{name: "tpm not a tpm path", spec: Spec{TPM: &TPM{Path: "/dev/sda"}}, code: errcode.ValidationFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &Host{SysRoot: host.SysRoot, DevRoot: host.DevRoot}
			p, err := h.Resolve(context.Background(), vmA, &tc.spec, nil)
			if tc.code != "" {
				if errcode.Of(err) != tc.code || !strings.Contains(errcode.MessageOf(err), tc.msg) {
					t.Fatalf("err = %v, want %s containing %q", err, tc.code, tc.msg)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := summary(tr, p); got != tc.want {
				t.Errorf("plan:\n got %s\nwant %s", got, tc.want)
			}
		})
	}
}

// summary is a plan in one line, paths relative to the fake tree.
func summary(tr *sysfstest.Tree, p *Plan) string {
	root := strings.TrimSuffix(tr.Sys, "sys")
	var parts []string
	for _, d := range p.VFIO {
		drv := d.Driver
		if drv == "" {
			drv = "-"
		}
		if d.Mdev != nil {
			s := "mdev " + d.Mdev.UUID + " on " + d.Mdev.Parent + " type " + d.Mdev.Type
			if d.Mdev.Create {
				s += " create"
			}
			parts = append(parts, s+" g"+itoa(d.Group))
			continue
		}
		s := d.Kind + " " + d.Address + " g" + itoa(d.Group) + " " + drv + " " + d.Vendor + ":" + d.Device
		if d.PF != "" {
			s += " pf=" + d.PF
		}
		parts = append(parts, s)
	}
	for _, u := range p.USB {
		parts = append(parts, "usb "+u.Name+" "+itoa(u.Bus)+":"+itoa(u.Dev)+" "+u.Vendor+":"+u.Product+" node="+strings.TrimPrefix(u.Node, root))
	}
	if t := p.TPM; t != nil {
		parts = append(parts, "tpm "+strings.TrimPrefix(t.Path, root)+" v"+itoa(t.Version)+" cancel="+strings.TrimPrefix(t.Cancel, root))
	}
	return strings.Join(parts, "; ")
}

// TestResolveHeld: what Holders says other VMs hold is device_busy,
// naming the device and the VM; a VF is picked past the held ones; a
// VM's own devices are its to resolve again.
func TestResolveHeld(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, h := workstation(t)
	pa, err := h.Resolve(ctx, vmA, &Spec{PCI: []PCI{{Address: "0000:01:00.0"}}, GPU: []GPU{{Type: GPUSRIOV, PCI: "0000:04:00.0"}}, USB: []USB{{VendorID: "1050"}}, TPM: &TPM{Path: "/dev/tpm0"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	held := Holders{}
	held.Add(vmA, pa.Keys())
	for _, tc := range []struct {
		name string
		spec Spec
		msg  string
	}{
		{"same function", Spec{PCI: []PCI{{Address: "0000:01:00.0"}}}, "pci 0000:01:00.0 is in use by VM " + vmA},
		{"same iommu group", Spec{PCI: []PCI{{Address: "0000:01:00.1"}}}, "iommu group 1 is in use by VM " + vmA},
		{"same usb device", Spec{USB: []USB{{Bus: ip(1), Dev: ip(4)}}}, "usb 1-2.1 is in use"},
		{"same tpm", Spec{TPM: &TPM{Path: "/dev/tpm0"}}, "is in use by VM " + vmA},
	} {
		_, err := h.Resolve(ctx, vmB, &tc.spec, held)
		if errcode.Of(err) != errcode.DeviceBusy || !strings.Contains(errcode.MessageOf(err), tc.msg) {
			t.Errorf("%s: err = %v, want device_busy %q", tc.name, err, tc.msg)
		}
	}
	// The next VF goes to B; A resolving again gets the one it holds.
	pb, err := h.Resolve(ctx, vmB, &Spec{GPU: []GPU{{Type: GPUSRIOV, PCI: "0000:04:00.0"}}}, held)
	if err != nil {
		t.Fatal(err)
	}
	if got := pb.VFIO[0].Address; got != "0000:04:00.2" {
		t.Errorf("B's VF = %s, want 0000:04:00.2 (04:00.1 is A's)", got)
	}
	pa2, err := h.Resolve(ctx, vmA, &Spec{GPU: []GPU{{Type: GPUSRIOV, PCI: "0000:04:00.0"}}}, held)
	if err != nil {
		t.Fatal(err)
	}
	if got := pa2.VFIO[0].Address; got != "0000:04:00.1" {
		t.Errorf("A's VF on a second resolve = %s, want 0000:04:00.1", got)
	}
	if _, err := h.Resolve(ctx, vmB, &Spec{PCI: []PCI{{Address: "0000:01:00.1"}}}, nil); err != nil {
		t.Errorf("nothing held: %v", err)
	}
}

// TestPlanClone: a clone shares no memory with its plan (the engine
// records a clone as the VM's while Acquire fills in the original).
func TestPlanClone(t *testing.T) {
	p := &Plan{VM: vmA,
		VFIO:   []VFIODev{{Kind: KindPCI, Address: "0000:01:00.0", Group: 1}, {Kind: KindMdev, Mdev: &MdevDev{UUID: "u", Parent: "0000:00:02.0", Type: "t", Create: true}, Group: -1}},
		USB:    []USBDev{{Name: "1-1", Bus: 1, Dev: 2}},
		TPM:    &TPMDev{Path: "/dev/tpm0", Cancel: "/dev/null", Version: 2},
		Grants: []Grant{{Path: "/dev/vfio/1"}}, Bound: []string{"0000:01:00.0"}, Made: []MdevDev{{UUID: "u"}}}
	want, _ := json.Marshal(p)
	q := p.Clone()
	if got, _ := json.Marshal(q); string(got) != string(want) {
		t.Fatalf("clone %s, want %s", got, want)
	}
	q.VFIO[0].Group, q.VFIO[1].Mdev.UUID, q.USB[0].Dev, q.TPM.Version = 9, "x", 9, 1
	q.Grants[0].UID, q.Bound[0], q.Made[0].UUID = 9, "x", "x"
	if got, _ := json.Marshal(p); string(got) != string(want) {
		t.Errorf("changing the clone changed the plan: %s, want %s", got, want)
	}
	if (*Plan)(nil).Clone() != nil {
		t.Error("nil clone")
	}
}

func TestResolveNoIOMMU(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// A host like the one this was written on: PCI devices, no groups.
	tr := sysfstest.New(t)
	tr.AddPCI(sysfstest.PCI{Addr: "0000:00:01.0", Vendor: 0x1af4, Device: 0x1045, Class: 0xffff00, Driver: "virtio-pci", Group: -1})
	tr.AddPCI(sysfstest.PCI{Addr: "0000:00:02.0", Vendor: 0x10de, Device: 0x1eb8, Class: 0x030000, Group: -1})
	h := &Host{SysRoot: tr.Sys, DevRoot: tr.Dev, Write: tr.Write}
	_, err := h.Resolve(ctx, vmA, &Spec{GPU: []GPU{{Type: GPUPhysical, PCI: "0000:00:02.0"}}}, nil)
	if errcode.Of(err) != errcode.IOMMUUnavailable || !strings.Contains(errcode.MessageOf(err), "no IOMMU") {
		t.Errorf("no groups at all: %v, want iommu_unavailable", err)
	}
	// Groups exist, but not for this device.
	tr2, h2 := workstation(t)
	tr2.AddPCI(sysfstest.PCI{Addr: "0000:05:00.0", Vendor: 0x10de, Device: 0x1eb8, Class: 0x030000, Group: -1})
	_, err = h2.Resolve(ctx, vmA, &Spec{PCI: []PCI{{Address: "0000:05:00.0"}}}, nil)
	if errcode.Of(err) != errcode.IOMMUUnavailable || !strings.Contains(errcode.MessageOf(err), "has no IOMMU group") {
		t.Errorf("device without a group: %v, want iommu_unavailable", err)
	}
	// vfio-pci not loaded: an unbound device cannot be bound.
	tr3 := sysfstest.New(t)
	tr3.AddPCI(sysfstest.PCI{Addr: "0000:02:00.0", Vendor: 0x8086, Device: 0x1533, Class: 0x020000, Group: 5})
	h3 := &Host{SysRoot: tr3.Sys, DevRoot: tr3.Dev, Write: tr3.Write}
	_, err = h3.Resolve(ctx, vmA, &Spec{PCI: []PCI{{Address: "0000:02:00.0"}}}, nil)
	if errcode.Of(err) != errcode.IOMMUUnavailable || !strings.Contains(errcode.MessageOf(err), "modprobe vfio-pci") {
		t.Errorf("vfio-pci not loaded: %v, want iommu_unavailable", err)
	}
	// No mdev bus, no USB bus.
	_, err = h.Resolve(ctx, vmA, &Spec{GPU: []GPU{{Type: GPUMdev, Mdev: "nvidia-63"}}}, nil)
	if errcode.Of(err) != errcode.DeviceNotFound {
		t.Errorf("mdev without /sys/bus/mdev: %v, want device_not_found", err)
	}
	_, err = h.Resolve(ctx, vmA, &Spec{USB: []USB{{VendorID: "046d"}}}, nil)
	if errcode.Of(err) != errcode.DeviceNotFound {
		t.Errorf("usb without /sys/bus/usb: %v, want device_not_found", err)
	}
	if _, err := h.Resolve(ctx, "not-a-uuid", &Spec{}, nil); errcode.Of(err) != errcode.ValidationFailed {
		t.Errorf("bad vm uuid: %v", err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func mustUUID(s string) uuid.UUID { return uuid.MustParse(s) }
