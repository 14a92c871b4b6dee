package nspawntest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	godbus "github.com/godbus/dbus/v5"
)

// waitTimeout bounds each Wait* call.
const waitTimeout = time.Minute

// Container is a booted systemd-nspawn container.
type Container struct {
	tb      testing.TB
	leader  int // the container's PID 1, as seen from here
	nspawn  *exec.Cmd
	exited  chan struct{}
	console string // nspawn's output file

	sd   *sddbus.Conn        // PID 1's API, for queries
	wake chan *godbus.Signal // any signal from PID 1: something changed
}

// Boot starts a container on rootfs and returns once its systemd reported
// READY=1 (nspawn --notify-ready relays it, with the leader's pid). work
// is a folder of the test's for nspawn's socket and console log. extra are
// more systemd-nspawn options, such as --bind-ro=SRC:DST. The container
// has its own network (loopback only) and writes to a tmpfs overlay. A
// cleanup kills it, waits for nspawn and removes the cgroups made for it;
// when the test failed, it first logs the container's journal.
func Boot(ctx context.Context, tb testing.TB, rootfs, work string, extra ...string) *Container {
	tb.Helper()
	start := time.Now()
	sockPath := filepath.Join(work, "nspawn.sock")
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		tb.Fatal(err)
	}
	defer sock.Close()

	// nspawn on a host whose PID 1 is not systemd makes "payload" and
	// "supervisor" cgroups below its own: give it a cgroup of its own in
	// each writable hierarchy, removed at the end.
	name := fmt.Sprintf("otherix-test-%d", os.Getpid())
	var cgroups []string
	for _, h := range []string{"/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		if _, err := os.Stat(filepath.Join(h, "cgroup.procs")); err != nil {
			continue
		}
		cg := filepath.Join(h, name)
		if err := os.Mkdir(cg, 0o755); err != nil {
			tb.Fatalf("create cgroup: %v", err)
		}
		cgroups = append(cgroups, cg)
		if h == "/sys/fs/cgroup" {
			break // a pure cgroup v2 host
		}
	}

	console := filepath.Join(work, "console.log")
	out, err := os.Create(console)
	if err != nil {
		tb.Fatal(err)
	}
	defer out.Close()
	args := append([]string{"-c", `for cg in $OTHERIX_CGROUPS; do echo $$ > "$cg/cgroup.procs" || exit 1; done; exec "$@"`,
		"sh", "systemd-nspawn", "--quiet",
		"--directory=" + rootfs, "--boot", "--register=no", "--keep-unit", "--console=passive",
		"--volatile=overlay", // changes go to a tmpfs: the cached rootfs stays clean
		"--private-network", "--notify-ready=yes", "--machine=" + name,
	}, extra...)
	cmd := exec.Command("/bin/sh", args...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C", "NOTIFY_SOCKET=" + sockPath, "OTHERIX_CGROUPS=" + strings.Join(cgroups, " ")}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start systemd-nspawn: %v", err)
	}
	c := &Container{tb: tb, nspawn: cmd, exited: make(chan struct{}), console: console}
	go func() { _ = cmd.Wait(); close(c.exited) }()
	tb.Cleanup(func() { c.shutdown(cgroups) })

	msgs := make(chan string, 16)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := sock.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	for ready := false; !ready || c.leader == 0; {
		select {
		case m, ok := <-msgs:
			if !ok {
				tb.Fatal("nspawn notify socket closed")
			}
			for line := range strings.SplitSeq(m, "\n") {
				if v, ok := strings.CutPrefix(line, "X_NSPAWN_LEADER_PID="); ok {
					c.leader, _ = strconv.Atoi(v)
				}
				ready = ready || line == "READY=1"
			}
		case <-c.exited:
			tb.Fatalf("systemd-nspawn exited during boot:\n%s", c.consoleTail())
		case <-ctx.Done():
			tb.Fatalf("container did not boot: %v\n%s", ctx.Err(), c.consoleTail())
		}
	}
	tb.Logf("container booted in %v (leader pid %d)", time.Since(start).Round(time.Millisecond), c.leader)
	c.connect(ctx)
	tb.Cleanup(func() {
		if tb.Failed() {
			// Before shutdown (cleanups run last-in first-out).
			out, _ := c.Try(context.Background(), "journalctl", "--no-pager", "-n", "300")
			tb.Logf("container journal:\n%s\nconsole:\n%s", out, c.consoleTail())
		}
	})
	return c
}

// connect opens PID 1's API through the container's system bus.
// (PID 1's private socket refuses a client from another PID namespace.)
func (c *Container) connect(ctx context.Context) {
	c.tb.Helper()
	addr := fmt.Sprintf("unix:path=/proc/%d/root/run/dbus/system_bus_socket", c.leader)
	dial := func() (*godbus.Conn, error) {
		conn, err := godbus.Dial(addr, godbus.WithContext(ctx))
		if err != nil {
			return nil, err
		}
		if err := conn.Auth([]godbus.Auth{godbus.AuthExternal(strconv.Itoa(os.Getuid()))}); err != nil {
			conn.Close()
			return nil, err
		}
		if err := conn.Hello(); err != nil {
			conn.Close()
			return nil, err
		}
		return conn, nil
	}
	sd, err := sddbus.NewConnection(dial)
	if err != nil {
		c.tb.Fatalf("connect to the container's systemd: %v", err)
	}
	c.sd = sd
	c.tb.Cleanup(sd.Close)
	sig, err := dial()
	if err != nil {
		c.tb.Fatalf("connect to the container's systemd: %v", err)
	}
	c.tb.Cleanup(func() { sig.Close() })
	c.wake = make(chan *godbus.Signal, 256)
	sig.Signal(c.wake)
	if err := sig.BusObject().CallWithContext(ctx, "org.freedesktop.DBus.AddMatch", 0,
		"type='signal',sender='org.freedesktop.systemd1'").Store(); err != nil {
		c.tb.Fatalf("add match: %v", err)
	}
	// Without a subscriber PID 1 does not emit unit changes.
	if err := sig.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1").
		CallWithContext(ctx, "org.freedesktop.systemd1.Manager.Subscribe", 0).Store(); err != nil {
		c.tb.Fatalf("subscribe: %v", err)
	}
}

// shutdown kills the container's PID 1, which ends every process in it:
// the kernel reaps a PID namespace's processes before its init exits, so
// once nspawn has seen the leader go, the cgroups made for it are empty.
func (c *Container) shutdown(cgroups []string) {
	start := time.Now()
	if c.leader > 0 {
		_ = syscall.Kill(c.leader, syscall.SIGKILL)
	} else {
		_ = syscall.Kill(-c.nspawn.Process.Pid, syscall.SIGKILL)
	}
	select {
	case <-c.exited:
	case <-time.After(30 * time.Second):
		c.tb.Errorf("systemd-nspawn still running 30s after its container was killed; killing it")
		_ = syscall.Kill(-c.nspawn.Process.Pid, syscall.SIGKILL)
		<-c.exited
	}
	for _, cg := range cgroups {
		var dirs []string
		_ = filepath.WalkDir(cg, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for _, d := range slices.Backward(dirs) {
			if err := os.Remove(d); err != nil {
				c.tb.Errorf("remove cgroup: %v", err)
			}
		}
	}
	c.tb.Logf("container stopped and cleaned up in %v", time.Since(start).Round(time.Millisecond))
}

func (c *Container) consoleTail() string {
	b, _ := os.ReadFile(c.console)
	return tail(b, 3000)
}

// Bus is PID 1's D-Bus API (through the container's system bus).
func (c *Container) Bus() *sddbus.Conn { return c.sd }

// nsenter returns the command that runs args inside the container, in all
// its namespaces, with a minimal environment.
func (c *Container) nsenter(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(c.leader), "-a", "--"}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "TERM=dumb"}
	cmd.Dir = "/"
	return cmd
}

// Try runs a command inside the container and returns its stdout; the
// error carries its stderr.
func (c *Container) Try(ctx context.Context, args ...string) (string, error) {
	cmd := c.nsenter(ctx, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out), nil
}

// Run is Try that fails the test on an error.
func (c *Container) Run(ctx context.Context, args ...string) string {
	c.tb.Helper()
	out, err := c.Try(ctx, args...)
	if err != nil {
		c.tb.Fatal(err)
	}
	return out
}

// Systemctl runs systemctl inside the container.
func (c *Container) Systemctl(ctx context.Context, args ...string) string {
	c.tb.Helper()
	return c.Run(ctx, append([]string{"systemctl"}, args...)...)
}

// Show returns `systemctl show -p KEYS UNIT` as a map.
func (c *Container) Show(ctx context.Context, unit string, keys ...string) map[string]string {
	c.tb.Helper()
	out := c.Systemctl(ctx, "show", "-p", strings.Join(keys, ","), unit)
	m := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			m[k] = v
		}
	}
	return m
}

// Props are a unit's properties read over D-Bus.
type Props map[string]any

// Str returns a string property ("" if absent).
func (p Props) Str(k string) string { s, _ := p[k].(string); return s }

// U32 returns a uint32 property (0 if absent).
func (p Props) U32(k string) uint32 { u, _ := p[k].(uint32); return u }

// String shows the states a test usually waits on.
func (p Props) String() string {
	return fmt.Sprintf("LoadState=%s ActiveState=%s SubState=%s Result=%s MainPID=%d NRestarts=%d StatusText=%q",
		p.Str("LoadState"), p.Str("ActiveState"), p.Str("SubState"), p.Str("Result"), p.U32("MainPID"), p.U32("NRestarts"), p.Str("StatusText"))
}

// Unit returns the unit's Unit properties.
func (c *Container) Unit(ctx context.Context, unit string) Props {
	c.tb.Helper()
	p, err := c.sd.GetUnitPropertiesContext(ctx, unit)
	if err != nil {
		c.tb.Fatalf("unit properties of %s: %v", unit, err)
	}
	return p
}

// Service returns the service's Unit and Service properties.
func (c *Container) Service(ctx context.Context, unit string) Props {
	c.tb.Helper()
	p := c.Unit(ctx, unit)
	s, err := c.sd.GetUnitTypePropertiesContext(ctx, unit, "Service")
	if err != nil {
		c.tb.Fatalf("service properties of %s: %v", unit, err)
	}
	for k, v := range s {
		p[k] = v
	}
	return p
}

// WaitService returns the service's properties once ok accepts them.
func (c *Container) WaitService(ctx context.Context, unit, what string, ok func(Props) bool) Props {
	c.tb.Helper()
	var p Props
	c.WaitFor(ctx, unit+": waiting for "+what, func() (bool, string) {
		p = c.Service(ctx, unit)
		return ok(p), p.String()
	})
	return p
}

// WaitUnit returns the unit's Unit properties once ok accepts them.
func (c *Container) WaitUnit(ctx context.Context, unit, what string, ok func(Props) bool) Props {
	c.tb.Helper()
	var p Props
	c.WaitFor(ctx, unit+": waiting for "+what, func() (bool, string) {
		p = c.Unit(ctx, unit)
		return ok(p), p.String()
	})
	return p
}

// WaitFor runs check again whenever PID 1 emits a signal, until check
// reports done; it fails the test with check's last state after a minute.
// PID 1 was subscribed to at boot, so no change slips between a check and
// the wait.
func (c *Container) WaitFor(ctx context.Context, what string, check func() (done bool, state string)) {
	c.tb.Helper()
	wctx, cancel := context.WithTimeout(ctx, waitTimeout)
	defer cancel()
	for {
		done, state := check()
		if done {
			return
		}
		select {
		case <-c.wake:
			for len(c.wake) > 0 {
				<-c.wake
			}
		case <-wctx.Done():
			c.tb.Fatalf("%s: %v; last state: %s", what, wctx.Err(), state)
		}
	}
}

// Journal returns the messages of the journal entries that match
// (journalctl matches such as _PID=1 or options such as -u UNIT), once
// journald has written all it received.
func (c *Container) Journal(ctx context.Context, matches ...string) string {
	c.tb.Helper()
	c.Run(ctx, "journalctl", "--sync")
	return c.Run(ctx, append([]string{"journalctl", "--no-pager", "-o", "cat"}, matches...)...)
}

// WaitJournal follows the journal entries that match until a message
// contains substr, and returns that message.
func (c *Container) WaitJournal(ctx context.Context, substr string, matches ...string) string {
	c.tb.Helper()
	wctx, cancel := context.WithTimeout(ctx, waitTimeout)
	defer cancel()
	cmd := c.nsenter(context.Background(), append([]string{"journalctl", "--no-pager", "-o", "cat", "--follow", "--lines=all"}, matches...)...)
	// nsenter forks journalctl into the container's PID namespace: both
	// end through their process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		c.tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		c.tb.Fatalf("journalctl --follow: %v", err)
	}
	kill := func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	stop := context.AfterFunc(wctx, kill)
	defer func() {
		stop()
		kill()
		_ = cmd.Wait()
	}()
	var seen []string
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if strings.Contains(sc.Text(), substr) {
			return sc.Text()
		}
		seen = append(seen, sc.Text())
	}
	c.tb.Fatalf("journal %v: no message with %q (%v); messages:\n%s", matches, substr, wctx.Err(), strings.Join(seen, "\n"))
	return ""
}
