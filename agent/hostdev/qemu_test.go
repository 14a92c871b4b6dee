package hostdev

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/hostdev/sysfstest"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/qmp"
)

func need(t *testing.T, bin, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(bin)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is required in CI (apt-get install %s): %v", bin, pkg, err)
		}
		t.Skipf("%s not installed: %v", bin, err)
	}
	return p
}

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// qemuCmd is QEMU paused (-S), with no guest and no defaults, running as
// nobody when the test runs as root (as the engine runs it), inheriting
// files as fd 3, 4, ...
func qemuCmd(t *testing.T, args []string, files []*os.File) (*exec.Cmd, *lockedBuf) {
	t.Helper()
	bin := need(t, "qemu-system-x86_64", "qemu-system-x86")
	base := []string{"-nodefaults", "-no-user-config", "-machine", "q35,accel=tcg", "-m", "128", "-display", "none", "-S"}
	cmd := exec.Command(bin, append(base, args...)...)
	cmd.ExtraFiles = files
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	var stderr lockedBuf
	cmd.Stderr = &stderr
	if os.Geteuid() == 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
	}
	return cmd, &stderr
}

// qemuExit runs QEMU expecting it to refuse its options, and returns what
// it said.
func qemuExit(t *testing.T, args []string, files []*os.File) string {
	t.Helper()
	cmd, stderr := qemuCmd(t, args, files)
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatalf("qemu accepted %q", args)
		}
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("qemu still running after 60s; stderr: %s", stderr)
	}
	return stderr.String()
}

// qemuUp starts QEMU with a QMP socket we bind ourselves (passed as the
// last inherited fd), connects, and quits QEMU when the test ends.
func qemuUp(t *testing.T, args []string, files []*os.File) *qmp.Client {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "hdq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	lf := testguest.ListenUnix(t, sock)
	defer lf.Close()
	fd := 3 + len(files)
	args = append(args, "-chardev", fmt.Sprintf("socket,id=qmp,fd=%d,server=on,wait=off", fd), "-mon", "chardev=qmp,mode=control")
	cmd, stderr := qemuCmd(t, args, append(files, lf))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, sock)
	if err != nil {
		select {
		case <-exited:
			t.Fatalf("qemu exited: %s", stderr)
		default:
		}
		t.Fatalf("qmp: %v; stderr: %s", err, stderr)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// opener plays the engine's part for Args' fd sets: it opens each file
// (or takes a stand-in for it) and numbers it from fd 3.
type opener struct {
	t      *testing.T
	files  []*os.File
	args   []string
	stands map[string]*os.File // path → the file to pass instead
}

func (o *opener) fdset(path string, flags int) string {
	f := o.stands[path]
	if f == nil {
		var err error
		if f, err = os.OpenFile(path, flags, 0); err != nil {
			o.t.Fatal(OpenError(path, err))
		}
		o.t.Cleanup(func() { f.Close() })
	}
	o.files = append(o.files, f)
	set := len(o.files)
	o.args = append(o.args, "-add-fd", fmt.Sprintf("fd=%d,set=%d", 2+set, set))
	return fmt.Sprintf("/dev/fdset/%d", set)
}

// TestQEMUTPMPassthrough: the TPM options Args writes for a TPM 2.0
// resolved on a fake tree work in a real QEMU run unprivileged: the TPM
// and its cancel file reach QEMU only as fd sets, QEMU probes the TPM over
// the descriptor (tpm_util_test_tpmdev sends it a command) and query-tpm
// reports the passthrough TIS device. A swtpm in character-device mode on
// a socket pair stands in for /dev/tpm0, which this machine lacks. The
// CRB front end is then shown to refuse the same TPM (QEMU's CRB buffer is
// 3968 bytes, a TPM's 4096), which is why Args uses TIS.
func TestQEMUTPMPassthrough(t *testing.T) {
	t.Parallel()
	swtpm := need(t, "swtpm", "swtpm")
	tr := sysfstest.New(t)
	tr.AddTPM(0, 2)
	h := &Host{SysRoot: tr.Sys, DevRoot: tr.Dev}
	p, err := h.Resolve(context.Background(), vmA, &Spec{TPM: &TPM{Path: "/dev/tpm0"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if p.TPM.Cancel != "/dev/null" {
		t.Fatalf("cancel = %s, want /dev/null for a TPM 2.0", p.TPM.Cancel)
	}

	startTPM := func() *os.File {
		fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		ours, theirs := os.NewFile(uintptr(fds[0]), "tpm"), os.NewFile(uintptr(fds[1]), "swtpm")
		state := t.TempDir()
		sw := exec.Command(swtpm, "chardev", "--tpm2", "--fd", "3", "--tpmstate", "dir="+state, "--flags", "not-need-init,startup-clear")
		sw.ExtraFiles = []*os.File{theirs}
		var out lockedBuf
		sw.Stdout, sw.Stderr = &out, &out
		if err := sw.Start(); err != nil {
			t.Fatal(err)
		}
		theirs.Close()
		done := make(chan struct{})
		go func() { sw.Wait(); close(done) }()
		t.Cleanup(func() {
			sw.Process.Kill()
			<-done
			ours.Close()
		})
		return ours
	}

	o := &opener{t: t, stands: map[string]*os.File{p.TPM.Path: startTPM()}}
	args, err := p.Args(Layout{}, o.fdset)
	if err != nil {
		t.Fatal(err)
	}
	c := qemuUp(t, append(o.args, args...), o.files)
	var tpms []struct {
		Model   string `json:"model"`
		ID      string `json:"id"`
		Options struct {
			Type string `json:"type"`
			Data struct {
				Path       string `json:"path"`
				CancelPath string `json:"cancel-path"`
			} `json:"data"`
		} `json:"options"`
	}
	if err := c.Execute(context.Background(), "query-tpm", nil, &tpms); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(tpms)
	if len(tpms) != 1 || tpms[0].Model != "tpm-tis" || tpms[0].ID != TPMID || tpms[0].Options.Type != "passthrough" ||
		!strings.HasPrefix(tpms[0].Options.Data.Path, "/dev/fdset/") || !strings.HasPrefix(tpms[0].Options.Data.CancelPath, "/dev/fdset/") {
		t.Errorf("query-tpm = %s", b)
	}
	t.Logf("query-tpm: %s", b)

	// The same TPM behind tpm-crb.
	o2 := &opener{t: t, stands: map[string]*os.File{p.TPM.Path: startTPM()}}
	args, _ = p.Args(Layout{}, o2.fdset)
	args[len(args)-1] = "tpm-crb,tpmdev=" + TPMID
	msg := qemuExit(t, append(o2.args, args...), o2.files)
	if !strings.Contains(msg, "smaller than host TPM's fixed buffer size of 4096") {
		t.Errorf("tpm-crb: %s", msg)
	}
}

// TestQEMUUSBHostFD: usb-host takes the device as an fd set
// (hostdevice=/dev/fdset/N). This machine has no USB bus, so /dev/null
// stands in for /dev/bus/usb/001/002: QEMU opens the fd set (an open
// failure would read "failed to open /dev/fdset/1: <errno>") and fails
// only in libusb, the descriptor not being a usbfs node.
func TestQEMUUSBHostFD(t *testing.T) {
	t.Parallel()
	_, h := workstation(t)
	p, err := h.Resolve(context.Background(), vmA, &Spec{USB: []USB{{Bus: ip(1), Dev: ip(2)}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	null, err := os.OpenFile("/dev/null", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	o := &opener{t: t, stands: map[string]*os.File{p.USB[0].Node: null}}
	args, err := p.Args(Layout{}, o.fdset)
	if err != nil {
		t.Fatal(err)
	}
	msg := qemuExit(t, append(o.args, args...), o.files)
	if !strings.Contains(msg, "usbhost0") || !strings.Contains(msg, "failed to open host usb device /dev/fdset/1") {
		t.Errorf("qemu: %s", msg)
	}
	// And an fd set with the wrong access mode is refused at the open:
	// the engine must open usbfs nodes read-write.
	ro, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	msg = qemuExit(t, []string{"-add-fd", "fd=3,set=1", "-device", "qemu-xhci,id=xhci0", "-device", "usb-host,bus=xhci0.0,hostdevice=/dev/fdset/1"}, []*os.File{ro})
	if !strings.Contains(msg, "failed to open /dev/fdset/1") {
		t.Errorf("read-only fd: %s", msg)
	}
}

// TestQEMUVFIOArgs: the vfio-pci options parse and their root port is
// realized; QEMU fails only when vfio-pci itself looks for the device's
// IOMMU group, which this host does not have. Then the root-port topology
// is checked with e1000e endpoints in place of the VFIO devices: each
// device is plugged into its own root port, the ports eight to a slot of
// pcie.0 from 0x18.
func TestQEMUVFIOArgs(t *testing.T) {
	t.Parallel()
	addrs := realPCI(t)
	p := &Plan{VM: vmA, VFIO: []VFIODev{{Kind: KindPCI, Address: addrs[len(addrs)-1], Group: 0}}}
	args, err := p.Args(Layout{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	msg := qemuExit(t, args, nil)
	if !strings.Contains(msg, "vfio "+addrs[len(addrs)-1]+": ") {
		t.Errorf("qemu: %s", msg)
	}
	if !(&Host{}).hasIOMMU() && !strings.Contains(msg, "no iommu_group found") {
		t.Errorf("qemu on a host without IOMMU: %s", msg)
	}

	many := &Plan{VM: vmA}
	for i := 0; i < 10; i++ {
		many.VFIO = append(many.VFIO, VFIODev{Kind: KindPCI, Address: fmt.Sprintf("0000:04:%02x.%d", i/8, i%8)})
	}
	args, err = many.Args(Layout{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, a := range args {
		if strings.HasPrefix(a, "vfio-pci,") {
			_, rest, _ := strings.Cut(a, ",id=")
			args[i] = "e1000e,romfile=,id=" + rest
		}
	}
	c := qemuUp(t, args, nil)
	// Under -S no firmware numbers the bridges' buses, so query-pci cannot
	// see behind them: ask QOM where each device was plugged.
	ctx := context.Background()
	get := func(path, prop string, out any) {
		t.Helper()
		if err := c.Execute(ctx, "qom-get", map[string]string{"path": path, "property": prop}, out); err != nil {
			t.Fatalf("qom-get %s %s: %v", path, prop, err)
		}
	}
	for i := range many.VFIO {
		var devBus, portBus string
		var devfn int
		get("/machine/peripheral/"+DeviceID(i), "parent_bus", &devBus)
		get("/machine/peripheral/"+PortID(i), "parent_bus", &portBus)
		get("/machine/peripheral/"+PortID(i), "addr", &devfn)
		if want := "/machine/peripheral/" + PortID(i) + "/" + PortID(i); devBus != want {
			t.Errorf("%s on %s, want %s", DeviceID(i), devBus, want)
		}
		if portBus != "/machine/q35/pcie.0" || devfn != (0x18+i/8)<<3|i%8 {
			t.Errorf("%s on %s at %#x.%d", PortID(i), portBus, devfn>>3, devfn&7)
		}
	}
}
