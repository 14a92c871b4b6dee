package vnc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/agent/vnc/rfbtest"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/qmp"
)

// testPorts keeps this package's parallel QEMUs off each other's ports.
var testPorts struct {
	mu   sync.Mutex
	held map[int]bool
}

// pickTestPort is a free port from 5900 no other test of this package
// holds, until the test ends.
func pickTestPort(t *testing.T) int {
	t.Helper()
	testPorts.mu.Lock()
	defer testPorts.mu.Unlock()
	port, err := PickFree("127.0.0.1", BasePort, func(p int) bool { return testPorts.held[p] })
	if err != nil {
		t.Fatal(err)
	}
	if testPorts.held == nil {
		testPorts.held = map[int]bool{}
	}
	testPorts.held[port] = true
	t.Cleanup(func() {
		testPorts.mu.Lock()
		delete(testPorts.held, port)
		testPorts.mu.Unlock()
	})
	return port
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

var nobody = &Owner{UID: 65534, GID: 65534}

// console is a real QEMU, paused (-S, no guest), with a VGA adapter and a
// VNC console on 127.0.0.1:port as Args and DisplayArgs write them, run
// like the engine runs it: unprivileged (nobody, when the test is root),
// sandboxed, QMP on a socket we bind and pass as fd 3.
type console struct {
	pid    int
	port   int
	addr   string
	qmp    *qmp.Client
	stderr *lockedBuf
}

func (c *console) exec(ctx context.Context, cmd string, args any) error {
	return c.qmp.Execute(ctx, cmd, args, nil)
}

func startConsole(t *testing.T) *console {
	t.Helper()
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("qemu-system-x86_64 is required in CI (apt-get install qemu-system-x86): %v", err)
		}
		t.Skipf("qemu-system-x86_64 not installed: %v", err)
	}
	port := pickTestPort(t)
	vncArgs, err := Args("127.0.0.1", port)
	if err != nil {
		t.Fatal(err)
	}
	display, err := DisplayArgs("amd64", 1)
	if err != nil {
		t.Fatal(err)
	}

	dir, err := os.MkdirTemp("/tmp", "vncq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	lf := testguest.ListenUnix(t, sock)
	defer lf.Close()

	args := []string{"-name", "guest=vnc-test", "-nodefaults", "-no-user-config", "-machine", "q35,accel=tcg", "-m", "128",
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
		"-display", "none", "-S",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off", "-mon", "chardev=qmp,mode=control"}
	args = append(append(args, display...), vncArgs...)
	cmd := exec.Command(bin, args...)
	cmd.ExtraFiles = []*os.File{lf}
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	stderr := &lockedBuf{}
	cmd.Stdout, cmd.Stderr = stderr, stderr
	if os.Geteuid() == 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
	}
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
	// QEMU listens for VNC before its main loop accepts QMP: once QMP
	// answers, the VNC port is open.
	c, err := qmp.Dial(ctx, sock)
	if err != nil {
		select {
		case <-exited:
			t.Fatalf("qemu exited: %s", stderr)
		default:
		}
		t.Fatalf("qmp: %v; qemu: %s", err, stderr)
	}
	t.Cleanup(func() { c.Close() })
	return &console{pid: cmd.Process.Pid, port: port, addr: "127.0.0.1:" + strconv.Itoa(port), qmp: c, stderr: stderr}
}

func wantAuthFailed(t *testing.T, err error, what string) {
	t.Helper()
	var ae *rfbtest.AuthError
	if !errors.As(err, &ae) || ae.Reason != "Authentication failed" {
		t.Errorf("%s: %v, want QEMU's \"Authentication failed\"", what, err)
	}
}

// TestConsole drives a real QEMU's VNC console over RFB: every login fails
// until SetPassword; then the password opens it (ServerInit with the
// adapter's framebuffer, and a full update of it), a wrong one gets QEMU's
// "Authentication failed", bytes past the 8th are ignored (hence
// Validate's limit), a new SetPassword replaces the old; the
// password is nowhere in QEMU's command line, environment or output; and
// Screenshot gets a PNG, written by QEMU as nobody, with the very pixels
// VNC sent.
func TestConsole(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := startConsole(t)
	const pw, pw2 = "Sx9!kq2Z", "n3w-pass"

	for _, try := range []string{pw, "", "x"} {
		_, err := rfbtest.Dial(ctx, c.addr, try)
		if try == "" {
			if !errors.Is(err, rfbtest.ErrNoVNCAuth) {
				t.Errorf("no password before set_password: %v, want the server to insist on VNC auth", err)
			}
			continue
		}
		wantAuthFailed(t, err, fmt.Sprintf("login %q before set_password", try))
	}

	if err := SetPassword(ctx, c.exec, pw); err != nil {
		t.Fatal(err)
	}
	conn, err := rfbtest.Dial(ctx, c.addr, pw)
	if err != nil {
		t.Fatalf("login with the password: %v", err)
	}
	defer conn.Close()
	init := conn.Init
	t.Logf("ServerInit: %dx%d %d bpp, name %q", init.Width, init.Height, init.Format.BitsPerPixel, init.Name)
	if init.Width == 0 || init.Height == 0 || init.Name != "QEMU (vnc-test)" || init.Format.BitsPerPixel != 32 || !init.Format.TrueColour {
		t.Errorf("ServerInit %+v", init)
	}
	if err := conn.RequestUpdate(false, 0, 0, init.Width, init.Height); err != nil {
		t.Fatal(err)
	}
	upd, err := conn.ReadUpdate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if upd.Pixels() != int(init.Width)*int(init.Height) {
		t.Errorf("update covers %d pixels in %d rectangles, want %dx%d", upd.Pixels(), len(upd.Rects), init.Width, init.Height)
	}

	wantAuthFailed(t, func() error { _, err := rfbtest.Dial(ctx, c.addr, "wrong"); return err }(), "wrong password")
	// Only 8 bytes count: the password with anything after it opens the
	// console too. That is why Validate refuses passwords over 8 bytes
	// instead of letting QEMU cut them.
	if c9, err := rfbtest.Dial(ctx, c.addr, pw+"whatever"); err != nil {
		t.Errorf("password plus more bytes: %v, want QEMU to ignore bytes past the 8th", err)
	} else {
		c9.Close()
	}

	for _, f := range []string{"cmdline", "environ"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", c.pid, f))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte(pw)) {
			t.Errorf("/proc/%d/%s holds the password", c.pid, f)
		}
		if f == "cmdline" && !bytes.Contains(b, []byte("password=on")) {
			t.Errorf("cmdline lacks password=on: %q", b)
		}
	}

	// The screenshot, as the engine would take it: a 0711 root directory.
	dir, err := os.MkdirTemp("", "shots")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	owner := nobody
	if os.Geteuid() != 0 {
		owner = nil
	}
	shot, err := Screenshot(ctx, c.exec, dir, owner)
	if err != nil {
		t.Fatalf("%v; qemu: %s", err, c.stderr)
	}
	img, err := png.Decode(bytes.NewReader(shot))
	if err != nil {
		t.Fatal(err)
	}
	if b := img.Bounds(); b.Dx() != int(init.Width) || b.Dy() != int(init.Height) {
		t.Errorf("PNG is %v, framebuffer %dx%d", b, init.Width, init.Height)
	}
	// Same pixels through both paths.
	f := init.Format
	diff, lit := 0, 0
	for _, r := range upd.Rects {
		for y := 0; y < int(r.H); y++ {
			for x := 0; x < int(r.W); x++ {
				off := (y*int(r.W) + x) * 4
				var v uint32
				if f.BigEndian {
					v = binary.BigEndian.Uint32(r.Data[off:])
				} else {
					v = binary.LittleEndian.Uint32(r.Data[off:])
				}
				vr, vg, vb := uint8(v>>f.RedShift)&uint8(f.RedMax), uint8(v>>f.GreenShift)&uint8(f.GreenMax), uint8(v>>f.BlueShift)&uint8(f.BlueMax)
				pr, pg, pb, _ := img.At(int(r.X)+x, int(r.Y)+y).RGBA()
				if vr != uint8(pr>>8) || vg != uint8(pg>>8) || vb != uint8(pb>>8) {
					diff++
				}
				if vr|vg|vb != 0 {
					lit++
				}
			}
		}
	}
	t.Logf("screenshot %d bytes; %d of %d pixels lit; %d differ between VNC and the PNG", len(shot), lit, upd.Pixels(), diff)
	if diff != 0 || lit == 0 {
		t.Errorf("%d pixels differ, %d lit", diff, lit)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("screenshot dir not empty: %v", ents)
	}

	// A new password replaces the old one.
	if err := SetPassword(ctx, c.exec, pw2); err != nil {
		t.Fatal(err)
	}
	wantAuthFailed(t, func() error { _, err := rfbtest.Dial(ctx, c.addr, pw); return err }(), "old password")
	c2, err := rfbtest.Dial(ctx, c.addr, pw2)
	if err != nil {
		t.Fatalf("new password: %v", err)
	}
	c2.Close()

	if out := c.stderr.String(); strings.Contains(out, pw) || strings.Contains(out, pw2) {
		t.Errorf("qemu's output holds a password: %s", out)
	}
}

// TestPortTakenByQEMU: a port a running QEMU console holds is not picked
// again and is reported in use.
func TestPortTakenByQEMU(t *testing.T) {
	t.Parallel()
	c := startConsole(t)
	if err := CheckPort("127.0.0.1", c.port); !errorsIsPortInUse(err) {
		t.Errorf("CheckPort(QEMU's port) = %v, want port_in_use", err)
	}
	next, err := PickPort("127.0.0.1", c.port)
	if err != nil {
		t.Fatal(err)
	}
	if next == c.port {
		t.Errorf("PickPort returned QEMU's port %d", next)
	}
}

func errorsIsPortInUse(err error) bool { return errcode.Is(err, errcode.PortInUse) }
