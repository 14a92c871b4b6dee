package agent

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/hostdev/sysfstest"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// TestHostDevices: seed-000 PCI, GPU, USB and TPM devices at create, on a
// fake sysfs tree (this machine has no IOMMU, USB bus or TPM; the host TPM
// is a pty to swtpm, see sysfstest.BackTPM). Requests are refused with a
// code naming the device before anything is made; a VM with the host's
// TPM boots and its guest uses the TPM; the device is held against a
// second VM until the first is deleted; the view lists the device as
// asked. A device another create in progress holds is device_busy, and
// free again once that create is gone.
func TestHostDevices(t *testing.T) {
	t.Parallel()
	tr := sysfstest.New(t)
	tr.AddDriver("vfio-pci")
	tr.AddPCI(sysfstest.PCI{Addr: "0000:00:1c.0", Vendor: 0x8086, Device: 0xa110, Class: 0x060400, Driver: "pcieport", Group: 11})
	tr.AddPCI(sysfstest.PCI{Addr: "0000:01:00.0", Parent: "0000:00:1c.0", Vendor: 0x10de, Device: 0x1eb8, Class: 0x030200, Driver: "vfio-pci", Group: 12})
	tr.AddPCI(sysfstest.PCI{Addr: "0000:02:00.0", Vendor: 0x8086, Device: 0x1533, Class: 0x020000, Driver: "igb", Group: -1})
	tr.AddTPM(0, 2)
	tr.BackTPM(0)

	hh := newHost(t)
	hh.h.Close()
	hh.cfg.Images.AllowFileURLs = true
	hd := &hostdev.Host{SysRoot: tr.Sys, DevRoot: tr.Dev, Write: tr.Write}
	h, err := NewHost(context.Background(), hh.cfg, Options{Logger: zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)), HostDevices: hd})
	if err != nil {
		t.Fatal(err)
	}
	hh.h = h
	t.Cleanup(h.Close)
	image := "file://" + filepath.Join(testguest.PlatformDir(t, "amd64", testguest.VariantDefault), "guest.qcow2")
	create := func(devs ...api.Device) api.CreateVM {
		return api.CreateVM{Name: "pt", ImageURL: image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, Devices: devs}
	}
	other := uuid.NewString()
	res, err := h.engine.Reserve("pt-other", other, api.VM{Name: "pt-other", UUID: other})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.HoldDevices(context.Background(), &hostdev.Spec{PCI: []hostdev.PCI{{Address: "0000:01:00.0"}}}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		devs []api.Device
		code errcode.Code
		says string
	}{
		{"short pci address", []api.Device{{DevType: api.DevPCI, Address: "01:00.0"}}, errcode.ValidationFailed, "devices[0]"},
		{"absent pci", []api.Device{{DevType: api.DevPCI, Address: "0000:07:00.0"}}, errcode.DeviceNotFound, "0000:07:00.0"},
		{"no iommu group", []api.Device{{DevType: api.DevPCI, Address: "0000:02:00.0"}}, errcode.IOMMUUnavailable, "0000:02:00.0"},
		{"held by another vm", []api.Device{{DevType: api.DevGPU, GPUType: hostdev.GPUPhysical, PCI: "0000:01:00.0"}}, errcode.DeviceBusy, other},
		{"field of another type", []api.Device{{DevType: api.DevUSB, Address: "0000:01:00.0"}}, errcode.ValidationFailed, "devices[0].address is not a field of a USB device"},
		{"readonly usb", []api.Device{{DevType: api.DevUSB, VendorID: "0781", ProductID: "5583", Readonly: true}}, errcode.ValidationFailed, "devices[0].readonly"},
		{"usb absent", []api.Device{{DevType: api.DevUSB, VendorID: "0781", ProductID: "5583"}}, errcode.DeviceNotFound, "no USB bus"},
		{"mig", []api.Device{{DevType: api.DevGPU, GPUType: hostdev.GPUMIG, MIGUUID: "MIG-4b20d080-1b54-4048-85b3-a6a62d165c01"}}, errcode.ValidationFailed, "devices[0]"},
		{"container uid", []api.Device{{DevType: api.DevGPU, GPUType: hostdev.GPUPhysical, PCI: "0000:01:00.0", UID: new(1000)}}, errcode.ValidationFailed, "uid"},
		{"resource manager path", []api.Device{{DevType: api.DevTPM, Path: "/dev/tpmrm0"}}, errcode.ValidationFailed, "resource manager"},
		{"two tpms", []api.Device{{DevType: api.DevTPM}, {DevType: api.DevTPM, Path: "/dev/tpm0"}}, errcode.ValidationFailed, "devices[1]: a VM has at most one TPM"},
		{"same pci twice", []api.Device{{DevType: api.DevPCI, Address: "0000:02:00.0"}, {DevType: api.DevPCI, Address: "0000:02:00.0"}}, errcode.ValidationFailed, "devices[1]"},
		{"unknown type", []api.Device{{DevType: "SERIAL"}}, errcode.ValidationFailed, `devices[0].dev_type "SERIAL"`},
	} {
		c := create(tc.devs...)
		err := h.ValidateCreate(&c)
		if errcode.Of(err) != tc.code || !strings.Contains(errcode.MessageOf(err), tc.says) {
			t.Errorf("%s: %v, want %s saying %q", tc.name, err, tc.code, tc.says)
		}
	}
	res.Release()
	gpu := create(api.Device{DevType: api.DevGPU, GPUType: hostdev.GPUPhysical, PCI: "0000:01:00.0"})
	if err := h.ValidateCreate(&gpu); err != nil {
		t.Errorf("the gpu is free once the other create is gone: %v", err)
	}

	ctx := context.Background()
	v, err := h.Create(ctx, uuid.NewString(), create(api.Device{DevType: api.DevTPM, Path: "/dev/tpm0"}), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	wait(t, hh.console("pt"), "OTHERIX-GUEST tpm present=1 getrandom=ok")
	if v.TPM || len(v.Devices) != 1 || v.Devices[0].DevType != api.DevTPM || v.Devices[0].Path != "/dev/tpm0" {
		t.Errorf("view: tpm=%v devices=%+v, want the host TPM as asked", v.TPM, v.Devices)
	}
	second := create(api.Device{DevType: api.DevTPM, Path: "/dev/tpm0"})
	second.Name = "pt-2"
	if _, err := h.Create(ctx, uuid.NewString(), second, nil, nil); errcode.Of(err) != errcode.DeviceBusy {
		t.Errorf("second vm with the same tpm: %v, want device_busy", err)
	}
	if _, err := h.VM("pt-2"); errcode.Of(err) != errcode.NotFound {
		t.Errorf("the refused vm exists: %v", err)
	}
	if err := h.Delete(ctx, "pt"); err != nil {
		t.Fatal(err)
	}
	if held := h.engine.HeldDevices(v.UUID); len(held) != 0 {
		t.Errorf("after delete the vm holds %v", held)
	}
	c := second
	if err := h.ValidateCreate(&c); err != nil {
		t.Errorf("the tpm is free again: %v", err)
	}
}
