package testguest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The platform guest is built by testdata/guest/build-platform.sh: the
// guest of build.sh (same /init, same markers) for amd64 or arm64, whose
// initramfs adds /etc/otherix/platform.sh, run by /init right after
// "booted":
//
//	OTHERIX-GUEST firmware uefi secureboot=<0|1> lockdown=<none|integrity|...>
//	OTHERIX-GUEST firmware bios
//	OTHERIX-GUEST tpm present=0
//	OTHERIX-GUEST tpm present=1 getrandom=<ok|fail>
//
// and /etc/otherix/tpm2 (see [TPM2Tool]). On arm64 the console is
// ttyAMA0 (QEMU virt's PL011: -serial works as on amd64) and the disk boots
// with UEFI only (AAVMF).

// Variants of the platform guest.
const (
	// VariantDefault boots with SeaBIOS (amd64) and with UEFI through
	// systemd-boot (unsigned: refused under secure boot).
	VariantDefault = "default"
	// VariantSecureBoot (amd64) boots under UEFI secure boot with
	// Microsoft's keys: shim, Debian's signed grub and signed kernel.
	VariantSecureBoot = "secureboot"
)

// TPM2Tool is the guest's raw TPM 2.0 command tool, for "#otherix-run:"
// lines of user-data:
//
//	/etc/otherix/tpm2 getrandom <bytes>
//	/etc/otherix/tpm2 nvdefine <index> <size>    (owner hierarchy, empty auth)
//	/etc/otherix/tpm2 nvwrite <index> <hex>
//	/etc/otherix/tpm2 nvread <index> <size>
//	/etc/otherix/tpm2 nvundefine <index>
//
// Each prints "OTHERIX-GUEST tpm2 <command> rc=<8 hex digits>[ data=<hex>]"
// and exits 0 if rc is 0 (then run-exit <n> 0 follows).
const TPM2Tool = "/etc/otherix/tpm2"

var (
	platformMu     sync.Mutex
	platformBuilds = map[string]*buildResult{}
)

// PlatformDir returns the folder holding the platform guest's guest.raw,
// guest.qcow2 and build-info.txt for arch ("amd64", "arm64") and variant,
// building it on first use in this process. It fails the test if the
// build fails or the arch's QEMU is missing; it never skips.
func PlatformDir(tb testing.TB, arch, variant string) string {
	tb.Helper()
	key := arch + "/" + variant
	platformMu.Lock()
	b := platformBuilds[key]
	if b == nil {
		b = &buildResult{}
		platformBuilds[key] = b
	}
	platformMu.Unlock()
	b.once.Do(func() { b.dir, b.err = buildPlatform(arch, variant) })
	if b.err != nil {
		tb.Fatalf("testguest: %v", b.err)
	}
	return b.dir
}

// ImageArch returns the raw disk of the platform guest for arch (default
// variant). Read-only: boot an overlay ([OverlayOf] on [QCOW2Arch]).
func ImageArch(tb testing.TB, arch string) string {
	tb.Helper()
	return filepath.Join(PlatformDir(tb, arch, VariantDefault), "guest.raw")
}

// QCOW2Arch returns the qcow2 disk of the platform guest for arch
// (default variant), read-only.
func QCOW2Arch(tb testing.TB, arch string) string {
	tb.Helper()
	return filepath.Join(PlatformDir(tb, arch, VariantDefault), "guest.qcow2")
}

// SecureBootImage returns the qcow2 disk of the amd64 secure-boot variant,
// read-only.
func SecureBootImage(tb testing.TB) string {
	tb.Helper()
	return filepath.Join(PlatformDir(tb, "amd64", VariantSecureBoot), "guest.qcow2")
}

// OverlayOf creates a qcow2 overlay backed by the qcow2 base in dir
// (tb.TempDir() if empty) and returns its path.
func OverlayOf(tb testing.TB, base, dir string) string {
	tb.Helper()
	if dir == "" {
		dir = tb.TempDir()
	}
	path := filepath.Join(dir, "overlay.qcow2")
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2",
		"-F", "qcow2", "-b", base, path).CombinedOutput()
	if err != nil {
		tb.Fatalf("testguest: qemu-img create overlay: %v: %s", err, out)
	}
	return path
}

func buildPlatform(arch, variant string) (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	script := filepath.Join(root, "testdata", "guest", "build-platform.sh")
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", script, "--arch", arch, "--variant", variant)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s --arch %s --variant %s: %w\n%s", script, arch, variant, err, tail(stderr.String(), 40))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	dir := strings.TrimSpace(lines[len(lines)-1])
	if _, err := os.Stat(filepath.Join(dir, "guest.qcow2")); err != nil {
		return "", fmt.Errorf("%s printed %q, not an image folder: %w\n%s", script, dir, err, tail(stderr.String(), 40))
	}
	if bin := qemuBinary[arch]; bin != "" {
		if _, err := exec.LookPath(bin); err != nil {
			return "", fmt.Errorf("the guest is built but cannot boot: %w", err)
		}
	}
	return dir, nil
}

// SeedISO writes a NoCloud seed ISO (label cidata) holding meta-data and,
// if not empty, user-data into dir and returns its path.
func SeedISO(tb testing.TB, dir, metaData, userData string) string {
	tb.Helper()
	src := filepath.Join(dir, "seed")
	if err := os.MkdirAll(src, 0o755); err != nil {
		tb.Fatal(err)
	}
	files := map[string]string{"meta-data": metaData}
	if userData != "" {
		files["user-data"] = userData
	}
	var paths []string
	for _, name := range []string{"meta-data", "user-data"} {
		content, ok := files[name]
		if !ok {
			continue
		}
		p := filepath.Join(src, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			tb.Fatal(err)
		}
		paths = append(paths, p)
	}
	iso := filepath.Join(dir, "seed.iso")
	args := append([]string{"-quiet", "-V", "cidata", "-J", "-r", "-o", iso}, paths...)
	if out, err := exec.Command("genisoimage", args...).CombinedOutput(); err != nil {
		tb.Fatalf("testguest: genisoimage: %v: %s", err, out)
	}
	return iso
}

// MachineOptions is a bare QEMU for a test: what StartMachine adds to its
// fixed part (-nodefaults, TCG, serial to a file, QMP socket, no display).
type MachineOptions struct {
	Arch        string     // "amd64" (q35, the default) or "arm64" (virt, cortex-a57)
	MachineOpts string     // appended to "-machine q35,accel=tcg", e.g. ",smm=on"
	MemoryMB    int        // default 256
	Disk        string     // the qcow2 to boot (an overlay): virtio-blk, bootindex 1
	Seed        string     // optional seed ISO: virtio-scsi scsi-cd
	Args        []string   // more arguments: firmware, TPM...
	Files       []*os.File // inherited by QEMU as fd 4, 5...: fd 3 is QMP's
	Dir         string     // console.log, qmp.sock, qemu.log; default a new short folder
}

// Machine is a QEMU started by StartMachine. It is killed at the test's
// cleanup, which logs its console and stderr if the test failed.
type Machine struct {
	Dir     string
	Console *Console // follows console.log from the start
	QMPPath string
	Started time.Time // just before exec

	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
}

// StartMachine starts QEMU for o.
func StartMachine(tb testing.TB, o MachineOptions) *Machine {
	tb.Helper()
	dir := o.Dir
	if dir == "" {
		// Short: it holds the QMP socket (108-byte limit).
		d, err := os.MkdirTemp("/tmp", "m")
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { os.RemoveAll(d) })
		dir = d
	}
	arch := o.Arch
	if arch == "" {
		arch = "amd64"
	}
	mem := o.MemoryMB
	if mem == 0 {
		mem = 256
	}
	m := &Machine{
		Dir:     dir,
		QMPPath: filepath.Join(dir, "qmp.sock"),
		exited:  make(chan struct{}),
	}
	console := filepath.Join(dir, "console.log")
	var args []string
	switch arch {
	case "amd64":
		args = append(args, "-machine", "q35,accel=tcg"+o.MachineOpts)
	case "arm64":
		args = append(args, "-machine", "virt,accel=tcg"+o.MachineOpts, "-cpu", "cortex-a57")
	default:
		tb.Fatalf("testguest: arch %q", arch)
	}
	args = append(args, "-nodefaults", "-no-user-config", "-display", "none",
		"-m", strconv.Itoa(mem), "-smp", "1",
		"-chardev", "file,id=console,path="+console, "-serial", "chardev:console",
		// fd 3: the QMP socket, listening before QEMU starts, so that QMP
		// can be dialled at once.
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off", "-mon", "chardev=qmp,mode=control")
	if o.Disk != "" {
		args = append(args,
			"-blockdev", "driver=file,node-name=disk0-file,filename="+o.Disk,
			"-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
			"-device", "virtio-blk-pci,drive=disk0,bootindex=1")
	}
	if o.Seed != "" {
		args = append(args,
			"-device", "virtio-scsi-pci,id=scsi0",
			"-blockdev", "driver=file,node-name=cd0-file,filename="+o.Seed+",read-only=on",
			"-blockdev", "driver=raw,node-name=cd0,file=cd0-file,read-only=on",
			"-device", "scsi-cd,bus=scsi0.0,drive=cd0")
	}
	args = append(args, o.Args...)

	qmpFile := ListenUnix(tb, m.QMPPath)
	defer qmpFile.Close()
	logf, err := os.Create(filepath.Join(dir, "qemu.log"))
	if err != nil {
		tb.Fatal(err)
	}
	m.cmd = exec.Command(qemuBinary[arch], args...)
	m.cmd.ExtraFiles = append([]*os.File{qmpFile}, o.Files...)
	m.cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	m.cmd.Stdout = logf
	m.cmd.Stderr = logf
	m.Console = OpenConsole(console)
	m.Started = time.Now()
	if err := m.cmd.Start(); err != nil {
		logf.Close()
		tb.Fatalf("testguest: start qemu: %v", err)
	}
	logf.Close()
	go func() {
		m.waitErr = m.cmd.Wait()
		close(m.exited)
	}()
	tb.Cleanup(func() {
		m.Kill()
		m.Console.Close()
		if tb.Failed() {
			out, _ := os.ReadFile(filepath.Join(dir, "qemu.log"))
			tb.Logf("qemu %s\nqemu output: %s\nconsole:\n%s", strings.Join(args, " "), out, m.Console.Text())
		}
	})
	return m
}

// PID returns QEMU's pid.
func (m *Machine) PID() int { return m.cmd.Process.Pid }

// Exited is closed when QEMU has exited.
func (m *Machine) Exited() <-chan struct{} { return m.exited }

// WaitExit waits until QEMU exits and returns its Wait error.
func (m *Machine) WaitExit(ctx context.Context) error {
	select {
	case <-m.exited:
		return m.waitErr
	case <-ctx.Done():
		return fmt.Errorf("qemu still runs: %w", ctx.Err())
	}
}

// Kill kills QEMU (SIGKILL) if it runs and waits for its exit.
func (m *Machine) Kill() {
	select {
	case <-m.exited:
	default:
		_ = m.cmd.Process.Kill()
		<-m.exited
	}
}

// Expect waits for the next console line containing substr and returns
// it; it fails the test if none comes before ctx ends.
func (m *Machine) Expect(ctx context.Context, tb testing.TB, substr string) string {
	tb.Helper()
	line, err := m.Console.WaitFor(ctx, substr)
	if err != nil {
		tb.Fatal(err)
	}
	return line
}

// QMP runs one QMP command without arguments (system_powerdown, quit...)
// on a connection of its own.
func (m *Machine) QMP(ctx context.Context, command string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", m.QMPPath)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	r := bufio.NewReader(c)
	if _, err := r.ReadBytes('\n'); err != nil { // greeting
		return fmt.Errorf("qmp greeting: %w", err)
	}
	for _, cmd := range []string{"qmp_capabilities", command} {
		if _, err := fmt.Fprintf(c, `{"execute":%q}`+"\n", cmd); err != nil {
			return err
		}
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return fmt.Errorf("qmp %s: %w", cmd, err)
			}
			var reply struct {
				Return json.RawMessage `json:"return"`
				Error  *struct {
					Class string `json:"class"`
					Desc  string `json:"desc"`
				} `json:"error"`
			}
			if err := json.Unmarshal(line, &reply); err != nil {
				return fmt.Errorf("qmp %s: %w", cmd, err)
			}
			if reply.Error != nil {
				return fmt.Errorf("qmp %s: %s: %s", cmd, reply.Error.Class, reply.Error.Desc)
			}
			if reply.Return != nil {
				break
			}
			// an event: read on
		}
	}
	return nil
}

// ListenUnix binds and listens on a unix socket at path and returns the
// listener as a file, for QEMU to inherit (a chardev's server=on,fd=N).
// The socket file stays: the file's descriptor keeps listening.
func ListenUnix(tb testing.TB, path string) *os.File {
	tb.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		tb.Fatalf("testguest: listen on %s: %v", path, err)
	}
	ln.SetUnlinkOnClose(false)
	f, err := ln.File()
	ln.Close()
	if err != nil {
		tb.Fatal(err)
	}
	return f
}
