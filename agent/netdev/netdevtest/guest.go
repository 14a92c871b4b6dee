package netdevtest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/cloudinit"
)

// BootTimeout bounds a guest's boot in these tests: TCG on a busy 2-core
// machine.
const BootTimeout = 3 * time.Minute

// GuestOptions say how to boot a test guest.
type GuestOptions struct {
	Hostname string // default "g"
	// UserData lines, e.g. "#otherix-run: httpd -p 80 -h /www" (the
	// "#cloud-config" header is added).
	Run []string
	// NetArgs are QEMU's NIC arguments (-netdev/-device); none means no NIC.
	NetArgs []string
	// ExtraFiles become QEMU's descriptors 3, 4, ...
	ExtraFiles []*os.File
	// GuestAgent adds the virtio-serial port of qemu-guest-agent on a unix
	// socket (Guest.QGAPath), with id "qgaport".
	GuestAgent bool
}

// Guest is a running test guest (QEMU under TCG).
type Guest struct {
	Dir     string
	Cmd     *exec.Cmd
	Console *testguest.Console
	Started time.Time // just before QEMU's start

	mu      sync.Mutex
	stderr  bytes.Buffer
	exited  chan struct{}
	waitErr error
}

// QMPPath is QEMU's QMP socket.
func (g *Guest) QMPPath() string { return filepath.Join(g.Dir, "qmp.sock") }

// QGAPath is the guest agent's socket (with GuestOptions.GuestAgent).
func (g *Guest) QGAPath() string { return filepath.Join(g.Dir, "qga.sock") }

// Exited is closed when QEMU has exited.
func (g *Guest) Exited() <-chan struct{} { return g.exited }

// WaitErr is QEMU's exit error, once Exited is closed.
func (g *Guest) WaitErr() error { <-g.exited; return g.waitErr }

// Boot starts QEMU on an overlay of the test guest. QEMU runs in the
// test's own network namespace (a tap's or macvtap's descriptor carries its
// link, wherever that is). t.Cleanup kills it.
func Boot(tb testing.TB, o GuestOptions) *Guest {
	tb.Helper()
	// A short folder: it holds unix sockets (108-byte limit).
	dir, err := os.MkdirTemp("/tmp", "oxn")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	g := &Guest{Dir: dir, exited: make(chan struct{})}
	overlay := testguest.Overlay(tb, dir)
	host := o.Hostname
	if host == "" {
		host = "g"
	}
	ud := "#cloud-config\n"
	for _, r := range o.Run {
		ud += "#otherix-run: " + r + "\n"
	}
	iso := filepath.Join(dir, "seed.iso")
	if err := cloudinit.WriteISO(iso, cloudinit.Seed{InstanceID: "iid-" + host, Hostname: host, UserData: []byte(ud)}); err != nil {
		tb.Fatal(err)
	}
	console := filepath.Join(dir, "console.log")
	args := []string{
		"-machine", "q35,accel=tcg", "-nodefaults", "-no-user-config", "-m", "256", "-smp", "1", "-display", "none",
		"-drive", "if=none,id=d0,file=" + overlay + ",format=qcow2",
		"-device", "virtio-blk-pci,drive=d0,bootindex=1",
		"-device", "virtio-scsi-pci,id=scsi0",
		"-drive", "if=none,id=cd0,file=" + iso + ",format=raw,readonly=on,media=cdrom",
		"-device", "scsi-cd,bus=scsi0.0,drive=cd0",
		"-chardev", "file,id=s0,path=" + console, "-serial", "chardev:s0",
		"-chardev", "socket,id=qmp,path=" + g.QMPPath() + ",server=on,wait=off", "-mon", "chardev=qmp,mode=control",
	}
	if o.GuestAgent {
		args = append(args,
			"-chardev", "socket,id=qga0,path="+g.QGAPath()+",server=on,wait=off",
			"-device", "virtio-serial-pci,id=vser0",
			"-device", "virtserialport,id=qgaport,chardev=qga0,name=org.qemu.guest_agent.0")
	}
	args = append(args, o.NetArgs...)
	g.Cmd = exec.Command("qemu-system-x86_64", args...)
	g.Cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	g.Cmd.Stderr = &lockedWriter{mu: &g.mu, w: &g.stderr}
	g.Cmd.ExtraFiles = o.ExtraFiles
	g.Console = testguest.OpenConsole(console)
	g.Started = time.Now()
	if err := g.Cmd.Start(); err != nil {
		tb.Fatalf("start qemu: %v", err)
	}
	go func() {
		g.waitErr = g.Cmd.Wait()
		close(g.exited)
	}()
	tb.Cleanup(func() {
		select {
		case <-g.exited:
		default:
			_ = g.Cmd.Process.Kill()
		}
		<-g.exited
		g.Console.Close()
		if tb.Failed() {
			g.mu.Lock()
			tb.Logf("qemu %s stderr: %s\nconsole:\n%s", host, g.stderr.String(), g.Console.Text())
			g.mu.Unlock()
		}
	})
	return g
}

// Expect waits for the next console line containing substr.
func (g *Guest) Expect(ctx context.Context, tb testing.TB, substr string) string {
	tb.Helper()
	line, err := g.Console.WaitFor(ctx, substr)
	if err != nil {
		tb.Fatal(err)
	}
	return line
}

// IP waits for the guest's "ip <nic> <addr>" marker and returns addr
// ("none" if DHCP gave nothing).
func (g *Guest) IP(ctx context.Context, tb testing.TB, nic string) string {
	tb.Helper()
	line := g.Expect(ctx, tb, testguest.Prefix+"ip "+nic+" ")
	m, _ := testguest.ParseMarker(line)
	_, addr, _ := strings.Cut(m.Value, " ")
	return addr
}

// Kill sends SIGKILL to QEMU and waits for it to exit.
func (g *Guest) Kill() {
	_ = g.Cmd.Process.Kill()
	<-g.exited
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
