package vm

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/hostdev/sysfstest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// gatedDevices is hostdev.Host whose Acquire for VM vm, once armed, says
// it was called and waits to be let go: a start caught between its claim
// and QEMU.
type gatedDevices struct {
	*hostdev.Host
	vm      string
	entered chan struct{}
	proceed chan struct{}
}

func (g *gatedDevices) Acquire(ctx context.Context, p *hostdev.Plan, qemu *hostdev.Owner) error {
	if g.entered != nil && p.VM == g.vm {
		g.entered <- struct{}{}
		<-g.proceed
	}
	return g.Host.Acquire(ctx, p, qemu)
}

// devEngine is bareEngine passing host devices through hd.
func devEngine(t *testing.T, state string, hd HostDevices) *Engine {
	t.Helper()
	run, err := os.MkdirTemp("/tmp", "oxdev")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	e, err := New(Config{StateDir: state, RunDir: run, Logger: zap.NewNop(), HostDevices: hd})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

// TestDeviceAllocations: the host devices of VMs and creates in progress
// are derived from their plans and reservations, like MACs and ports
// (TestAllocations): two never hold one device, and nothing stays held
// after a failed create, a refused define, a failed start (the host's
// sysfs as it was), a delete, or an engine restart (a new engine on the
// same state: the plan of a QEMU that died meanwhile is released, the
// old engine's creates are gone).
func TestDeviceAllocations(t *testing.T) {
	ctx := context.Background()
	tr := sysfstest.New(t)
	tr.AddDriver("vfio-pci")
	tr.AddPCI(sysfstest.PCI{Addr: "0000:01:00.0", Vendor: 0x8086, Device: 0x1533, Class: 0x020000, Group: 12}) // unbound: a start binds it
	tr.AddTPM(0, 2)                                                                                            // no driver behind it: a start fails at its open
	pci, grp, tpm := "pci:0000:01:00.0", "iommu_group:12", "tpm:"+tr.D("tpm0")
	both := &hostdev.Spec{PCI: []hostdev.PCI{{Address: "0000:01:00.0"}}, TPM: &hostdev.TPM{Path: "/dev/tpm0"}}
	onlyTPM := &hostdev.Spec{TPM: &hostdev.TPM{Path: "/dev/tpm0"}}
	gd := &gatedDevices{Host: &hostdev.Host{SysRoot: tr.Sys, DevRoot: tr.Dev, Write: tr.Write}}
	state := t.TempDir()
	e := devEngine(t, state, gd)
	disks := t.TempDir()
	spec := func(name, id, mac string, hd *hostdev.Spec) Spec {
		s := allocSpec(name, id, mac, 0)
		s.Disks[0].Path = filepath.Join(disks, name+".raw")
		if err := os.WriteFile(s.Disks[0].Path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		s.HostDevices = hd
		return s
	}
	busy := func(what string, err error, holder string) {
		t.Helper()
		if errcode.Of(err) != errcode.DeviceBusy || !strings.Contains(errcode.MessageOf(err), holder) {
			t.Errorf("%s: %v, want device_busy naming %s", what, err, holder)
		}
	}
	free := func(what string, ids ...string) {
		t.Helper()
		for _, id := range ids {
			if got := e.HeldDevices(id); len(got) != 0 {
				t.Errorf("%s: %s still holds %v", what, id, got)
			}
		}
	}

	// Two creates in progress: the second cannot have the first's TPM.
	ra, err := e.Reserve("a", allocA, api.VM{Name: "a", UUID: allocA})
	if err != nil {
		t.Fatal(err)
	}
	if err := ra.HoldDevices(ctx, both); err != nil {
		t.Fatal(err)
	}
	if got, want := e.HeldDevices(allocA), []string{grp, pci, tpm}; !slices.Equal(got, want) {
		t.Errorf("a holds %v, want %v", got, want)
	}
	rb, err := e.Reserve("b", allocB, api.VM{Name: "b", UUID: allocB})
	if err != nil {
		t.Fatal(err)
	}
	busy("b asking for a's tpm", rb.HoldDevices(ctx, onlyTPM), allocA)

	// a's create fails: its reservation released, its devices free.
	ra.Release()
	free("after a's failed create", allocA)
	if err := rb.HoldDevices(ctx, onlyTPM); err != nil {
		t.Errorf("b after a's failed create: %v", err)
	}
	rb.Release()
	free("after b's release", allocB)

	// c's create defines its VM: a stopped VM holds no device, so its
	// reservation's are free from then on.
	rc, err := e.Reserve("c", allocC, api.VM{Name: "c", UUID: allocC})
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.HoldDevices(ctx, both); err != nil {
		t.Fatal(err)
	}
	const macC = "52:54:00:0c:0c:0c"
	if _, err := e.Define(ctx, spec("c", allocC, macC, both), nil); err != nil {
		t.Fatal(err)
	}
	rc.Release()
	free("defined c, stopped", allocC)

	// d's define is refused (c's MAC): its create unwinds, nothing held.
	rd, err := e.Reserve("d", allocD, api.VM{Name: "d", UUID: allocD})
	if err != nil {
		t.Fatal(err)
	}
	if err := rd.HoldDevices(ctx, both); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Define(ctx, spec("d", allocD, macC, both), nil); errcode.Of(err) != errcode.Conflict {
		t.Fatalf("define with c's MAC: %v", err)
	}
	if got := e.DeviceHolder(tpm); got != allocD {
		t.Errorf("after the refused define the create still holds the tpm: holder %q", got)
	}
	rd.Release()
	free("after d's refused define", allocD)

	// c starts: its devices are claimed before QEMU, in one step with the
	// check. Caught there, another VM's start and a create are refused.
	if _, err := e.Define(ctx, spec("d", allocD, "52:54:00:0d:0d:0d", onlyTPM), nil); err != nil {
		t.Fatal(err)
	}
	gd.vm, gd.entered, gd.proceed = allocC, make(chan struct{}), make(chan struct{})
	started := make(chan error, 1)
	go func() {
		_, err := e.Start(ctx, "c")
		started <- err
	}()
	<-gd.entered
	if got := e.DeviceHolder(pci); got != allocC {
		t.Errorf("starting c: pci held by %q", got)
	}
	_, err = e.Start(ctx, "d")
	busy("d starting while c starts", err, allocC)
	rb, err = e.Reserve("b", allocB, api.VM{Name: "b", UUID: allocB})
	if err != nil {
		t.Fatal(err)
	}
	busy("a create while c starts", rb.HoldDevices(ctx, both), allocC)
	rb.Release()
	close(gd.proceed)
	// Acquire binds the PCI function to vfio-pci; the TPM's open fails:
	// the start gives everything back.
	if err := <-started; errcode.Of(err) != errcode.DeviceNotFound {
		t.Errorf("c's start: %v, want device_not_found (a tpm node no driver backs)", err)
	}
	gd.entered, gd.proceed = nil, nil
	free("after c's failed start", allocC, allocD)
	if _, err := os.Lstat(tr.S("bus/pci/devices/0000:01:00.0/driver")); err == nil {
		t.Error("0000:01:00.0 is still bound after the failed start")
	}
	if st := readVMState(t, e, allocC); st.HostPlan != nil {
		t.Errorf("c's vm.json keeps a plan: %+v", st.HostPlan)
	}

	// An engine restart: c's QEMU died while the agent was down with its
	// devices acquired (vm.json says running, with the plan); the new
	// engine releases them. A create of the old engine holds nothing.
	rb, err = e.Reserve("b", allocB, api.VM{Name: "b", UUID: allocB})
	if err != nil {
		t.Fatal(err)
	}
	if err := rb.HoldDevices(ctx, onlyTPM); err != nil {
		t.Fatal(err)
	}
	e.Close()
	p, err := gd.Resolve(ctx, allocC, both, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := gd.Host.Acquire(ctx, p, nil); err != nil {
		t.Fatal(err)
	}
	st := readVMState(t, e, allocC)
	st.Status, st.HostPlan = "running", p
	writeVMState(t, e, st)
	e = devEngine(t, state, gd)
	free("after the restart", allocB, allocC, allocD)
	if got, _ := e.Get("c"); got.Status != "crashed" {
		t.Errorf("c after the restart: %s, want crashed", got.Status)
	}
	if _, err := os.Lstat(tr.S("bus/pci/devices/0000:01:00.0/driver")); err == nil {
		t.Error("0000:01:00.0 is still bound after the restart")
	}
	if st := readVMState(t, e, allocC); st.HostPlan != nil {
		t.Errorf("c's vm.json keeps a plan after the restart: %+v", st.HostPlan)
	}

	// Delete: c gone, its devices are anyone's.
	if err := e.Delete(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	free("after delete", allocC)
	rb, err = e.Reserve("b", allocB, api.VM{Name: "b", UUID: allocB})
	if err != nil {
		t.Fatal(err)
	}
	if err := rb.HoldDevices(ctx, both); err != nil {
		t.Errorf("a create after the delete: %v", err)
	}
	rb.Release()
}

func readVMState(t *testing.T, e *Engine, id string) state {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.vmDir(id), "vm.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func writeVMState(t *testing.T, e *Engine, st state) {
	t.Helper()
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.vmDir(st.Spec.UUID), "vm.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
}
