package testguest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// These tests boot the real guest with plain QEMU (no agent code) and check
// every marker of the console contract.

const bootTimeout = 3 * time.Minute // generous: TCG on a busy 2-core machine

type guest struct {
	dir     string
	cmd     *exec.Cmd
	exited  chan struct{} // closed when QEMU has exited; then waitErr is set
	waitErr error
	stderr  bytes.Buffer
	console *Console
	started time.Time
}

type bootOptions struct {
	metaData, userData string // the seed ISO's files; no seed ISO if both are empty
	noNIC              bool
	uefi               bool // OVMF instead of SeaBIOS
}

// bootGuest starts QEMU on an overlay of the guest, by default with a SLIRP
// NIC. QEMU is killed on cleanup.
func bootGuest(t *testing.T, o bootOptions) *guest {
	t.Helper()
	// A short folder: it holds the QMP socket (108-byte limit).
	dir, err := os.MkdirTemp("/tmp", "g")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	overlay := Overlay(t, dir)
	g := &guest{dir: dir, exited: make(chan struct{})}
	args := []string{
		"-machine", "q35,accel=tcg", "-nodefaults", "-m", "256", "-smp", "1", "-display", "none",
		"-drive", "if=none,id=d0,file=" + overlay + ",format=qcow2",
		"-device", "virtio-blk-pci,drive=d0,bootindex=1",
		"-chardev", "file,id=s0,path=" + g.consolePath(), "-serial", "chardev:s0",
		"-chardev", "socket,id=qmp,path=" + g.qmpPath() + ",server=on,wait=off", "-mon", "chardev=qmp,mode=control",
	}
	if !o.noNIC {
		args = append(args, "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0")
	}
	if o.metaData != "" || o.userData != "" {
		iso := g.seedISO(t, o.metaData, o.userData)
		args = append(args, "-device", "virtio-scsi-pci,id=scsi0",
			"-drive", "if=none,id=cd0,file="+iso+",format=raw,readonly=on,media=cdrom",
			"-device", "scsi-cd,bus=scsi0.0,drive=cd0")
	}
	if o.uefi {
		vars := filepath.Join(dir, "vars.fd")
		data, err := os.ReadFile("/usr/share/OVMF/OVMF_VARS_4M.fd")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(vars, data, 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args,
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
			"-drive", "if=pflash,format=raw,unit=1,file="+vars)
	}
	g.cmd = exec.Command("qemu-system-x86_64", args...)
	g.cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	g.cmd.Stderr = &g.stderr
	g.console = OpenConsole(g.consolePath())
	g.started = time.Now()
	if err := g.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() {
		g.waitErr = g.cmd.Wait()
		close(g.exited)
	}()
	t.Cleanup(func() {
		if !g.hasExited() {
			_ = g.cmd.Process.Kill()
		}
		<-g.exited
		g.console.Close()
		if t.Failed() {
			t.Logf("qemu stderr: %s\nconsole:\n%s", g.stderr.String(), g.console.Text())
		}
	})
	return g
}

// seedISO writes a cidata ISO holding meta-data and user-data.
func (g *guest) seedISO(t *testing.T, metaData, userData string) string {
	t.Helper()
	seed := filepath.Join(g.dir, "seed")
	if err := os.Mkdir(seed, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{"meta-data": metaData, "user-data": userData} {
		if err := os.WriteFile(filepath.Join(seed, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	iso := filepath.Join(g.dir, "seed.iso")
	if out, err := exec.Command("genisoimage", "-quiet", "-V", "cidata", "-J", "-r", "-o", iso,
		filepath.Join(seed, "meta-data"), filepath.Join(seed, "user-data")).CombinedOutput(); err != nil {
		t.Fatalf("genisoimage: %v: %s", err, out)
	}
	return iso
}

func (g *guest) consolePath() string { return filepath.Join(g.dir, "console.log") }
func (g *guest) qmpPath() string     { return filepath.Join(g.dir, "qmp.sock") }

func (g *guest) hasExited() bool {
	select {
	case <-g.exited:
		return true
	default:
		return false
	}
}

// expect waits for the next line containing substr, and fails the test if
// it does not come.
func (g *guest) expect(ctx context.Context, t *testing.T, substr string) string {
	t.Helper()
	line, err := g.console.WaitFor(ctx, substr)
	if err != nil {
		t.Fatal(err)
	}
	return line
}

// expectLine waits for the next marker of want's kind and checks it is want.
func (g *guest) expectLine(ctx context.Context, t *testing.T, want string) {
	t.Helper()
	m, _ := ParseMarker(want)
	if got := g.expect(ctx, t, Prefix+m.Kind); got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

const metaData = "instance-id: iid-test-1\nlocal-hostname: g1\n"

func TestBootMarkersAndPowerdown(t *testing.T) {
	t.Parallel()
	userData := "#cloud-config\n#otherix-run: echo hello-from-guest\n#otherix-run: exit 3\n"
	g := bootGuest(t, bootOptions{metaData: metaData, userData: userData})
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()

	booted := g.expect(ctx, t, Prefix+"booted ")
	tBooted := time.Since(g.started)
	m, _ := ParseMarker(booted)
	f := Fields(m.Value)
	if f["arch"] != "amd64" || !strings.HasPrefix(f["kernel"], "6.") || !strings.HasSuffix(f["kernel"], "-cloud-amd64") {
		t.Errorf("booted marker %q: want arch=amd64 kernel=6.*-cloud-amd64", booted)
	}
	g.expectLine(ctx, t, fmt.Sprintf("%sdisks sr0:%d:1 vda:%d:0", Prefix,
		fileSize(t, filepath.Join(g.dir, "seed.iso")), fileSize(t, Image(t))))
	for _, want := range []string{
		"label=cidata dev=sr0",
		"files=meta-data,user-data",
		"instance-id=iid-test-1",
		"local-hostname=g1",
		"user-data-sha256=" + sha256Hex(userData),
	} {
		g.expectLine(ctx, t, Prefix+"cidata "+want)
	}
	g.expectLine(ctx, t, Prefix+"ip eth0 10.0.2.15")
	g.expectLine(ctx, t, Prefix+"ready")
	tReady := time.Since(g.started)
	if got := g.expect(ctx, t, "hello-from-guest"); got != "hello-from-guest" {
		t.Errorf("command output line = %q", got)
	}
	g.expectLine(ctx, t, Prefix+"run-exit 1 0")
	g.expectLine(ctx, t, Prefix+"run-exit 2 3")
	g.expectLine(ctx, t, Prefix+"tick 1")
	g.expectLine(ctx, t, Prefix+"tick 2")
	t.Logf("boot to booted: %v, to ready: %v", tBooted.Round(10*time.Millisecond), tReady.Round(10*time.Millisecond))

	q := dialQMP(ctx, t, g.qmpPath())
	q.execute(ctx, t, "system_powerdown")
	g.expect(ctx, t, Prefix+"powering off")
	select {
	case <-g.exited:
	case <-ctx.Done():
		t.Fatalf("qemu still running after the guest powered off: %v", ctx.Err())
	}
	if g.waitErr != nil {
		t.Errorf("qemu exited with %v, want 0", g.waitErr)
	}
	if ticks := ParseMarkers(g.console.Text())["tick"]; len(ticks) < 2 {
		t.Errorf("ticks = %q, want at least 2", ticks)
	}
}

func TestBootIgnoreACPIThenReset(t *testing.T) {
	t.Parallel()
	userData := "#cloud-config\n#otherix-guest: ignore-acpi\n"
	g := bootGuest(t, bootOptions{metaData: metaData, userData: userData})
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()

	g.expect(ctx, t, Prefix+"ready")
	q := dialQMP(ctx, t, g.qmpPath())
	q.execute(ctx, t, "system_powerdown")
	g.expect(ctx, t, Prefix+"ignoring power button")
	// The guest goes on: a tick after the press, and QEMU is still there.
	g.expect(ctx, t, Prefix+"tick ")
	if g.hasExited() {
		t.Fatalf("qemu exited after an ignored power button: %v", g.waitErr)
	}
	if strings.Contains(g.console.Text(), Prefix+"powering off") {
		t.Errorf("the guest powered off despite ignore-acpi")
	}

	// system_reset: the guest boots again.
	q.execute(ctx, t, "system_reset")
	g.expect(ctx, t, Prefix+"booted ")
	g.expect(ctx, t, Prefix+"ready")
	g.expectLine(ctx, t, Prefix+"tick 1")

	q.execute(ctx, t, "quit")
	select {
	case <-g.exited:
	case <-ctx.Done():
		t.Fatalf("qemu still running after quit: %v", ctx.Err())
	}
}

// qmpConn is just enough QMP for these tests: commands without arguments,
// replies read in order, events skipped.
type qmpConn struct {
	conn net.Conn
	r    *bufio.Reader
}

func dialQMP(ctx context.Context, t *testing.T, path string) *qmpConn {
	t.Helper()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		t.Fatalf("dial qmp: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	q := &qmpConn{conn: conn, r: bufio.NewReader(conn)}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := q.r.ReadBytes('\n'); err != nil { // greeting
		t.Fatalf("qmp greeting: %v", err)
	}
	q.execute(ctx, t, "qmp_capabilities")
	return q
}

func (q *qmpConn) execute(ctx context.Context, t *testing.T, command string) {
	t.Helper()
	if dl, ok := ctx.Deadline(); ok {
		_ = q.conn.SetDeadline(dl)
	}
	if _, err := fmt.Fprintf(q.conn, "{\"execute\":%q}\n", command); err != nil {
		t.Fatalf("qmp %s: %v", command, err)
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			t.Fatalf("qmp %s: %v", command, err)
		}
		var reply struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
		}
		if err := json.Unmarshal(line, &reply); err != nil {
			t.Fatalf("qmp %s: %v in %q", command, err, line)
		}
		switch {
		case reply.Error != nil:
			t.Fatalf("qmp %s: %s: %s", command, reply.Error.Class, reply.Error.Desc)
		case reply.Return != nil:
			return
		}
		// an event: read on
	}
}

// TestBootUEFI boots the same disk with OVMF (systemd-boot), without seed
// or NIC.
func TestBootUEFI(t *testing.T) {
	t.Parallel()
	g := bootGuest(t, bootOptions{noNIC: true, uefi: true})
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()

	g.expect(ctx, t, Prefix+"booted ")
	g.expectLine(ctx, t, fmt.Sprintf("%sdisks vda:%d:0", Prefix, fileSize(t, Image(t))))
	g.expectLine(ctx, t, Prefix+"cidata none")
	g.expectLine(ctx, t, Prefix+"ready") // no NIC: no ip line before it
	t.Logf("UEFI boot to ready: %v", time.Since(g.started).Round(10*time.Millisecond))
	g.expectLine(ctx, t, Prefix+"tick 1")
	if ip := ParseMarkers(g.console.Text())["ip"]; ip != nil {
		t.Errorf("ip markers without a NIC: %q", ip)
	}
	q := dialQMP(ctx, t, g.qmpPath())
	q.execute(ctx, t, "quit")
	select {
	case <-g.exited:
	case <-ctx.Done():
		t.Fatalf("qemu still running after quit: %v", ctx.Err())
	}
}
