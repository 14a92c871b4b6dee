package vm

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/hostdev/sysfstest"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// What is real and what stands in, in these tests: QEMU, the engine, the
// unprivileged QEMU user, the descriptors and the platform guest are real.
// The host's sysfs is a fake tree (package sysfstest; this machine has no
// IOMMU, USB bus or TPM), and so are its device nodes, except where a real
// character device can stand in: the host TPM is a pseudo-terminal whose
// other end is swtpm (sysfstest's BackTPM), so QEMU's passthrough backend
// talks to a TPM 2.0 through a real character device, as to /dev/tpm0.

// TestHostTPMPassthrough: a VM asking for the host's TPM (/dev/tpm0 of a
// fake tree, a pty to swtpm) boots and its guest uses the TPM. The device
// is held: another VM asking for it gets device_busy, also after an agent
// restart (the new engine derives it from the VM's plan in its vm.json,
// nothing claimed again), and powering off gives it back.
func TestHostTPMPassthrough(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tr := sysfstest.New(t)
	tr.AddTPM(0, 2)
	tr.BackTPM(0)
	node := tr.D("tpm0")
	h := newHarness(t, func(c *Config) {
		c.HostDevices = &hostdev.Host{SysRoot: tr.Sys, DevRoot: tr.Dev, Write: tr.Write}
	})
	want := &hostdev.Spec{TPM: &hostdev.TPM{Path: "/dev/tpm0"}}
	a := h.defineOn(testguest.QCOW2Arch(t, "amd64"), "tpm-host-a", "", want)
	h.defineOn(testguest.QCOW2Arch(t, "amd64"), "tpm-host-b", "", want)
	v, err := h.e.Start(ctx, "tpm-host-a")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, h.console(a), "OTHERIX-GUEST tpm present=1 getrandom=ok", bootWait)
	if got := h.e.DeviceHolder("tpm:" + node); got != a.Spec.UUID {
		t.Fatalf("tpm held by %q, want %s", got, a.Spec.UUID)
	}
	// The TPM reached QEMU as a descriptor: no host path on its command line.
	cmdline, _ := os.ReadFile("/proc/" + itoa(v.PID) + "/cmdline")
	if strings.Contains(string(cmdline), tr.Dev) || !strings.Contains(string(cmdline), "passthrough,id=hosttpm0,path=/dev/fdset/") {
		t.Errorf("qemu command line: %q", strings.ReplaceAll(string(cmdline), "\x00", " "))
	}
	_, err = h.e.Start(ctx, "tpm-host-b")
	wantCode(t, err, errcode.DeviceBusy)

	// An agent restart: the new engine knows a holds the TPM from its
	// vm.json.
	h.e.Close()
	h.cfg.HostDevices = &hostdev.Host{SysRoot: tr.Sys, DevRoot: tr.Dev, Write: tr.Write}
	h.open()
	if got, _ := h.e.Get("tpm-host-a"); got.PID != v.PID || got.Status != "running" {
		t.Fatalf("re-adopted: %+v", got)
	}
	if got := h.e.DeviceHolder("tpm:" + node); got != a.Spec.UUID {
		t.Fatalf("after the restart: tpm held by %q, want %s", got, a.Spec.UUID)
	}
	_, err = h.e.Start(ctx, "tpm-host-b")
	wantCode(t, err, errcode.DeviceBusy)
	if b, _ := h.e.Get("tpm-host-b"); b.Status != "stopped" || b.PID != 0 {
		t.Fatalf("vm b after a busy start: %+v", b)
	}

	if _, err := h.e.Poweroff(ctx, "tpm-host-a"); err != nil {
		t.Fatal(err)
	}
	if held := h.e.HeldDevices(a.Spec.UUID); len(held) != 0 {
		t.Errorf("after poweroff a still holds %v", held)
	}
	if st := readState(t, h, a); st.HostPlan != nil {
		t.Errorf("after poweroff vm.json keeps a host plan: %+v", st.HostPlan)
	}
}

func readState(t *testing.T, h *harness, v View) state {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(h.e.vmDir(v.Spec.UUID), "vm.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// recordingHost is hostdev.Host, noting the VFIO group nodes' owners right
// after Acquire (what QEMU found when it started).
type recordingHost struct {
	*hostdev.Host
	mu     sync.Mutex
	owners map[string]int // node → uid
}

func (r *recordingHost) Acquire(ctx context.Context, p *hostdev.Plan, qemu *hostdev.Owner) error {
	if err := r.Host.Acquire(ctx, p, qemu); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, g := range p.Grants {
		var st unix.Stat_t
		if unix.Stat(g.Path, &st) == nil {
			r.owners[g.Path] = int(st.Uid)
		}
	}
	return nil
}

// TestHostDevicesFailedStartGivesBack: starts QEMU cannot complete leave
// the host as they found it. A PCI function is bound to vfio-pci and its
// group node given to the QEMU user, then QEMU fails at vfio-pci's
// realize (this host has no IOMMU group for it): the function is unbound
// again, the node gets its owner back and the VM holds it no more. Then a USB
// device whose node is /dev/null's character device reaches QEMU as an fd
// set and libusb refuses it; a TPM whose node no driver backs fails at
// the open as device_not_found; a PCI function that does not exist is
// device_not_found before anything is touched. No failed start leaves a
// socket or pid file in the VM's runtime dir.
func TestHostDevicesFailedStartGivesBack(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tr := sysfstest.New(t)
	tr.AddDriver("vfio-pci")
	tr.AddPCI(sysfstest.PCI{Addr: "0000:00:1c.0", Vendor: 0x8086, Device: 0xa110, Class: 0x060400, Driver: "pcieport", Group: 11})
	tr.AddPCI(sysfstest.PCI{Addr: "0000:01:00.0", Parent: "0000:00:1c.0", Vendor: 0x8086, Device: 0x1533, Class: 0x020000, Group: 12})
	tr.AddPCI(sysfstest.PCI{Addr: "0000:00:14.0", Vendor: 0x8086, Device: 0xa12f, Class: 0x0c0330, Driver: "xhci_hcd", Group: 13})
	tr.AddUSB(sysfstest.USB{Controller: "0000:00:14.0", Name: "1-2", Bus: 1, Dev: 3, Vendor: 0x0781, Product: 0x5583, Class: 0})
	tr.AddTPM(0, 2) // 10:224: no driver behind it on this machine
	usbNode := tr.D("bus/usb/001/003")
	os.Remove(usbNode)
	if err := unix.Mknod(usbNode, unix.S_IFCHR|0o664, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	rec := &recordingHost{Host: &hostdev.Host{SysRoot: tr.Sys, DevRoot: tr.Dev, Write: tr.Write}, owners: map[string]int{}}
	h := newHarness(t, func(c *Config) { c.HostDevices = rec })

	check := func(v View) {
		t.Helper()
		got, _ := h.e.Get(v.Spec.Name)
		if got.Status != "stopped" || got.PID != 0 || !strings.HasPrefix(got.Reason, "start failed") {
			t.Errorf("%s after the failed start: %+v", v.Spec.Name, got)
		}
		if held := h.e.HeldDevices(v.Spec.UUID); len(held) != 0 {
			t.Errorf("%s: still holds %v", v.Spec.Name, held)
		}
		if st := readState(t, h, v); st.HostPlan != nil {
			t.Errorf("%s: vm.json keeps a host plan %+v", v.Spec.Name, st.HostPlan)
		}
		run := filepath.Join(h.run, ShortID(v.Spec.UUID))
		for _, f := range []string{"qemu.pid", "qmp.sock", "qga.sock"} {
			if _, err := os.Lstat(filepath.Join(run, f)); err == nil {
				t.Errorf("%s: %s is left in %s", v.Spec.Name, f, run)
			}
		}
	}

	nic := h.defineWith("vfio-nic", "", &hostdev.Spec{PCI: []hostdev.PCI{{Address: "0000:01:00.0"}}})
	_, err := h.e.Start(ctx, "vfio-nic")
	wantCode(t, err, errcode.QEMUStartFailed)
	// Where the agent may raise RLIMIT_MEMLOCK, QEMU starts and fails in
	// vfio-pci; where it may not (a container without CAP_SYS_RESOURCE and
	// a low hard limit), the start fails before QEMU, saying why.
	var lim unix.Rlimit
	unix.Prlimit(0, unix.RLIMIT_MEMLOCK, nil, &lim)
	if need := hostdev.MemlockBytes(nic.Spec.MemoryMB); lim.Max < need && !hasCap(unix.CAP_SYS_RESOURCE) {
		if !strings.Contains(err.Error(), "LimitMEMLOCK=infinity") {
			t.Errorf("memlock: %v", err)
		}
		t.Logf("hard RLIMIT_MEMLOCK %d < %d and no CAP_SYS_RESOURCE: failed before qemu: %v", lim.Max, need, err)
	} else if !strings.Contains(err.Error(), "vfio") {
		t.Errorf("error does not carry QEMU's vfio reason: %v", err)
	}
	group := tr.D("vfio/12")
	if uid, ok := rec.owners[group]; !ok || uid != int(nobody.Uid) {
		t.Errorf("during the start %s belonged to uid %d (recorded %v), want the qemu user %d", group, uid, ok, nobody.Uid)
	}
	var st unix.Stat_t
	if err := unix.Stat(group, &st); err != nil || st.Uid != 0 || st.Mode&0o777 != 0o600 {
		t.Errorf("%s after the failed start: uid %d mode %o (%v), want root 0600", group, st.Uid, st.Mode&0o777, err)
	}
	if _, err := os.Lstat(tr.S("bus/pci/devices/0000:01:00.0/driver")); err == nil {
		t.Errorf("0000:01:00.0 is still bound to a driver")
	}
	if b, _ := os.ReadFile(tr.S("bus/pci/devices/0000:01:00.0/driver_override")); strings.TrimSpace(string(b)) == "vfio-pci" {
		t.Errorf("driver_override still vfio-pci")
	}
	check(nic)

	usb := h.defineWith("usb-stick", "", &hostdev.Spec{USB: []hostdev.USB{{VendorID: "0781", ProductID: "5583"}}})
	_, err = h.e.Start(ctx, "usb-stick")
	wantCode(t, err, errcode.QEMUStartFailed)
	if !strings.Contains(err.Error(), "failed to open host usb device /dev/fdset/") {
		t.Errorf("usb: %v", err)
	}
	check(usb)

	tpmVM := h.defineWith("tpm-nodriver", "", &hostdev.Spec{TPM: &hostdev.TPM{Path: "/dev/tpm0"}})
	_, err = h.e.Start(ctx, "tpm-nodriver")
	wantCode(t, err, errcode.DeviceNotFound)
	check(tpmVM)

	gone := h.defineWith("no-such-pci", "", &hostdev.Spec{PCI: []hostdev.PCI{{Address: "0000:05:00.0"}}})
	_, err = h.e.Start(ctx, "no-such-pci")
	wantCode(t, err, errcode.DeviceNotFound)
	check(gone)

	// No QEMU of these VMs is left.
	for _, v := range h.e.List() {
		if out, _ := exec.Command("pgrep", "-f", v.Spec.UUID).Output(); len(out) > 0 {
			t.Errorf("a process of %s is left: %s", v.Spec.Name, out)
		}
	}
}

// hasCap reports whether this process has capability c in its effective set.
func hasCap(c int) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:\t"); ok {
			n, err := strconv.ParseUint(v, 16, 64)
			return err == nil && n&(1<<uint(c)) != 0
		}
	}
	return false
}

// TestStartMemlock: a child started through startMemlock inherits the
// raised RLIMIT_MEMLOCK, and the agent gets its own limit back. The soft
// limit is lowered first so that raising it needs no privilege.
func TestStartMemlock(t *testing.T) {
	var orig unix.Rlimit
	if err := unix.Prlimit(0, unix.RLIMIT_MEMLOCK, nil, &orig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Prlimit(0, unix.RLIMIT_MEMLOCK, &orig, nil) })
	low := unix.Rlimit{Cur: 64 << 10, Max: orig.Max}
	if err := unix.Prlimit(0, unix.RLIMIT_MEMLOCK, &low, nil); err != nil {
		t.Fatal(err)
	}
	want := min(uint64(4<<20), orig.Max)
	cmd := exec.Command("cat", "/proc/self/limits")
	var out strings.Builder
	cmd.Stdout = &out
	if err := startMemlock(want, cmd.Start); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	var got unix.Rlimit
	unix.Prlimit(0, unix.RLIMIT_MEMLOCK, nil, &got)
	if got != low {
		t.Errorf("agent's limit after: %+v, want %+v back", got, low)
	}
	for _, line := range strings.Split(out.String(), "\n") {
		if f := strings.Fields(line); strings.HasPrefix(line, "Max locked memory") && len(f) >= 5 {
			if f[3] != strconv.FormatUint(want, 10) {
				t.Errorf("child's soft limit %s, want %d", f[3], want)
			}
			return
		}
	}
	t.Errorf("no memlock line in %s", out.String())
}
