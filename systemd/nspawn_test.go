package systemd

// The real-systemd test: a Debian rootfs booted with systemd-nspawn, the
// repository's unit file running sdtestd (a stand-in agent built from
// ./internal/sdtestd on this package), checked from outside through
// `systemctl` (run inside with nsenter) and PID 1's D-Bus API.
//
// Needs root and the Debian packages systemd-container and debootstrap
// (the test fails, with that message, when they are missing). The rootfs
// is built once (about half a minute to a few minutes) and cached under
// ${OTHERIX_TEST_CACHE:-/var/cache/otherix-test}/nspawn-rootfs.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	godbus "github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"
)

// rootfsRecipe is how the cached rootfs is made; changing it rebuilds the
// cache. procps provides the unit's /bin/kill (ExecReload).
const rootfsRecipe = "debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps bookworm"

const (
	agentUnit = "otherix-agent.service"
	vmScope   = "otherix-vm-test1.scope" // ScopeName("test1") in sdtestd
)

// testDropIn adapts the repository's unit for the test only: the stand-in
// binary, a short watchdog, fast restarts and no start rate limit.
const testDropIn = `[Unit]
StartLimitIntervalSec=0

[Service]
ExecStart=
ExecStart=/usr/local/bin/sdtestd
WatchdogSec=2
RestartSec=100ms
`

func TestSystemdInContainer(t *testing.T) {
	began := time.Now()
	requireContainerTools(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	rootfs := cachedRootfs(ctx, t)
	bin := buildSdtestd(ctx, t)

	work, err := os.MkdirTemp("", "sdnspawn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	dropIn := filepath.Join(work, "dropin")
	if err := os.Mkdir(dropIn, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dropIn, "test.conf"), []byte(testDropIn), 0o644); err != nil {
		t.Fatal(err)
	}
	unit, err := filepath.Abs(unitFile)
	if err != nil {
		t.Fatal(err)
	}

	c := boot(ctx, t, rootfs, work,
		"--bind-ro="+bin+":/usr/local/bin/sdtestd",
		"--bind-ro="+unit+":/etc/systemd/system/"+agentUnit,
		"--bind-ro="+dropIn+":/etc/systemd/system/"+agentUnit+".d",
	)
	var vmPID int
	var mainPID uint32
	var restarts uint32
	step := func(name string, f func()) {
		t.Helper()
		if t.Failed() {
			return
		}
		start := time.Now()
		f()
		t.Logf("step %q: %v", name, time.Since(start).Round(time.Millisecond))
	}

	step("start: active (running) after READY=1", func() {
		// Type=notify: systemctl start returns once the daemon sent READY=1.
		c.systemctl(ctx, "start", agentUnit)
		p := c.service(ctx, agentUnit)
		if p.str("ActiveState") != "active" || p.str("SubState") != "running" {
			t.Fatalf("after start: %s", p)
		}
		vmPID = c.vmPIDFromStatus(p, "started")
		mainPID, restarts = p.u32("MainPID"), p.u32("NRestarts")
		c.nsenter(ctx, "journalctl", "--sync")
		journal := c.nsenter(ctx, "journalctl", "--no-pager", "-o", "cat", "-u", agentUnit)
		if !strings.Contains(journal, `"placement":"systemd-scope"`) {
			t.Errorf("the placement choice is not in the journal:\n%s", journal)
		}
		for line := range strings.SplitSeq(journal, "\n") {
			if strings.Contains(line, `"placement"`) {
				t.Logf("daemon log: %s", line)
			}
		}
		status := c.systemctl(ctx, "status", "--no-pager", "--lines=0", agentUnit)
		for _, want := range []string{"Active: active (running)", `Status: "1/1 VMs running; control plane disconnected; vm pid`} {
			if !strings.Contains(status, want) {
				t.Errorf("systemctl status lacks %q:\n%s", want, status)
			}
		}
	})

	step("vm in its own transient scope under the slice", func() {
		got := c.show(ctx, vmScope, "ActiveState", "Transient", "Slice", "ControlGroup", "CPUAccounting",
			"MemoryAccounting", "TasksAccounting", "MemoryMax", "CPUWeight", "CPUQuotaPerSecUSec")
		want := map[string]string{
			"ActiveState": "active", "Transient": "yes", "Slice": DefaultSlice,
			"ControlGroup":  "/" + DefaultSlice + "/" + vmScope,
			"CPUAccounting": "yes", "MemoryAccounting": "yes", "TasksAccounting": "yes",
			"MemoryMax": strconv.Itoa(256 << 20), "CPUWeight": "200", "CPUQuotaPerSecUSec": "500ms",
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("%s %s: got %q, want %q", vmScope, k, got[k], v)
			}
		}
		c.checkVM(ctx, vmPID)
		// The stand-in VM got ChildEnv, not the daemon's NOTIFY_SOCKET.
		env := c.nsenter(ctx, "cat", fmt.Sprintf("/proc/%d/environ", vmPID))
		if want := "PATH=" + DefaultPath + "\x00LANG=C\x00"; env != want {
			t.Errorf("vm environment: got %q, want %q", env, want)
		}
	})

	step("reload: RELOADING=1 then READY=1", func() {
		c.systemctl(ctx, "reload", agentUnit)
		p := c.waitService(ctx, agentUnit, "reloaded", func(p props) bool {
			return strings.Contains(p.str("StatusText"), "reloads 1") && p.str("SubState") == "running"
		})
		if p.u32("MainPID") != mainPID {
			t.Errorf("reload changed the main pid: %d -> %d", mainPID, p.u32("MainPID"))
		}
	})

	step("systemctl restart leaves the vm running", func() {
		c.systemctl(ctx, "restart", agentUnit)
		p := c.service(ctx, agentUnit)
		if p.str("SubState") != "running" || p.u32("MainPID") == mainPID {
			t.Fatalf("after restart (old main pid %d): %s", mainPID, p)
		}
		if got := c.vmPIDFromStatus(p, "adopted"); got != vmPID {
			t.Errorf("restarted daemon found vm pid %d, want %d", got, vmPID)
		}
		c.checkVM(ctx, vmPID)
		mainPID = p.u32("MainPID")
	})

	step("kill -9 of the daemon: Restart= brings it back, vm untouched", func() {
		c.nsenter(ctx, "kill", "-KILL", strconv.Itoa(int(mainPID)))
		p := c.waitService(ctx, agentUnit, "restarted after SIGKILL", func(p props) bool {
			return p.str("SubState") == "running" && p.u32("MainPID") != mainPID && p.u32("NRestarts") > restarts
		})
		if got := c.vmPIDFromStatus(p, "adopted"); got != vmPID {
			t.Errorf("daemon found vm pid %d, want %d", got, vmPID)
		}
		c.checkVM(ctx, vmPID)
		mainPID, restarts = p.u32("MainPID"), p.u32("NRestarts")
	})

	step("wedged daemon: the watchdog kills it, Restart= brings it back", func() {
		c.nsenter(ctx, "kill", "-USR1", strconv.Itoa(int(mainPID)))
		p := c.waitService(ctx, agentUnit, "restarted by the watchdog", func(p props) bool {
			return p.str("SubState") == "running" && p.u32("MainPID") != mainPID && p.u32("NRestarts") > restarts
		})
		c.nsenter(ctx, "journalctl", "--sync")
		journal := c.nsenter(ctx, "journalctl", "--no-pager", "-o", "cat", "-u", agentUnit)
		if !strings.Contains(journal, "Watchdog timeout") {
			t.Errorf("no watchdog timeout in the journal:\n%s", journal)
		}
		if got := c.vmPIDFromStatus(p, "adopted"); got != vmPID {
			t.Errorf("daemon found vm pid %d, want %d", got, vmPID)
		}
		c.checkVM(ctx, vmPID)
		mainPID = p.u32("MainPID")
	})

	step("stopping the vm through the daemon removes its scope", func() {
		c.nsenter(ctx, "kill", "-USR2", strconv.Itoa(int(mainPID)))
		c.waitService(ctx, agentUnit, "vm stopped", func(p props) bool {
			return strings.Contains(p.str("StatusText"), "no vm")
		})
		got := c.show(ctx, vmScope, "LoadState", "ActiveState")
		if got["LoadState"] != "not-found" || got["ActiveState"] != "inactive" {
			t.Errorf("scope after vm stop: %v, want not-found and inactive", got)
		}
		if out, err := c.try(ctx, "test", "-e", fmt.Sprintf("/proc/%d", vmPID)); err == nil {
			t.Errorf("vm process %d still exists %s", vmPID, out)
		}
	})

	step("systemctl stop: clean exit", func() {
		c.systemctl(ctx, "stop", agentUnit)
		p := c.service(ctx, agentUnit)
		if p.str("ActiveState") != "inactive" || p.str("Result") != "success" {
			t.Errorf("after stop: %s", p)
		}
	})
	t.Logf("whole test (setup included): %v", time.Since(began).Round(time.Millisecond))
}

func requireContainerTools(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the container test needs root (systemd-nspawn, nsenter)")
	}
	for tool, pkg := range map[string]string{
		"systemd-nspawn": "systemd-container",
		"debootstrap":    "debootstrap",
		"nsenter":        "util-linux",
	} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: install the Debian package %s (apt-get install -y %s); CI must install it", tool, pkg, pkg)
		}
	}
}

// cachedRootfs returns the cached Debian rootfs, building it first when it
// is missing or was made by another recipe. A lock file serialises
// builders; the tree is built beside its final name and renamed into place,
// so a half-built tree is never used.
func cachedRootfs(ctx context.Context, t *testing.T) string {
	t.Helper()
	dir := os.Getenv("OTHERIX_TEST_CACHE")
	if dir == "" {
		dir = "/var/cache/otherix-test"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "nspawn-rootfs.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatalf("lock rootfs cache: %v", err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)

	root := filepath.Join(dir, "nspawn-rootfs")
	stampFile := ".otherix-rootfs"
	if stamp, err := os.ReadFile(filepath.Join(root, stampFile)); err == nil && string(stamp) == rootfsRecipe+"\n" {
		return root
	}
	// Leftovers of an interrupted build, and an outdated tree.
	stale, _ := filepath.Glob(filepath.Join(dir, "nspawn-rootfs.tmp-*"))
	if _, err := os.Lstat(root); err == nil {
		old := filepath.Join(dir, fmt.Sprintf("nspawn-rootfs.tmp-old%d", os.Getpid()))
		if err := os.Rename(root, old); err != nil {
			t.Fatal(err)
		}
		stale = append(stale, old)
	}
	for _, s := range stale {
		removeTree(t, s)
	}

	start := time.Now()
	tmp, err := os.MkdirTemp(dir, "nspawn-rootfs.tmp-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	args := append(strings.Fields(rootfsRecipe)[1:], tmp)
	t.Logf("building the container rootfs once: debootstrap %s", strings.Join(args, " "))
	out, err := exec.CommandContext(ctx, "debootstrap", args...).CombinedOutput()
	if err != nil {
		removeTree(t, tmp)
		t.Fatalf("debootstrap: %v\n%s", err, tail(out, 4000))
	}
	if err := os.WriteFile(filepath.Join(tmp, stampFile), []byte(rootfsRecipe+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, root); err != nil {
		t.Fatal(err)
	}
	t.Logf("rootfs built in %v: %s", time.Since(start).Round(time.Second), root)
	return root
}

// removeTree unmounts whatever an interrupted debootstrap left mounted
// below path (proc, sys), then deletes it.
func removeTree(t *testing.T, path string) {
	t.Helper()
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		var mounts []string
		for line := range strings.SplitSeq(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], path+"/") {
				mounts = append(mounts, f[4])
			}
		}
		slices.Sort(mounts)
		for _, m := range slices.Backward(mounts) {
			_ = unix.Unmount(m, unix.MNT_DETACH)
		}
	}
	if err := os.RemoveAll(path); err != nil {
		t.Errorf("remove %s: %v", path, err)
	}
}

func buildSdtestd(ctx context.Context, t *testing.T) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out := filepath.Join(t.TempDir(), "sdtestd")
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, "./internal/sdtestd")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build sdtestd: %v\n%s", err, b)
	}
	return out
}

// container is a booted systemd-nspawn container.
type container struct {
	t       *testing.T
	leader  int // the container's PID 1, as seen from here
	nspawn  *exec.Cmd
	exited  chan struct{}
	console string // nspawn's output file

	sd   *sddbus.Conn        // PID 1's API, for queries
	wake chan *godbus.Signal // any signal from PID 1: something changed
}

// boot starts the container and returns once its systemd reported READY=1
// (nspawn --notify-ready relays it to our NOTIFY_SOCKET together with the
// leader's pid).
func boot(ctx context.Context, t *testing.T, rootfs, work string, extra ...string) *container {
	t.Helper()
	start := time.Now()
	sockPath := filepath.Join(work, "nspawn.sock")
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
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
			t.Fatalf("create cgroup: %v", err)
		}
		cgroups = append(cgroups, cg)
		if h == "/sys/fs/cgroup" {
			break // a pure cgroup v2 host
		}
	}

	console := filepath.Join(work, "console.log")
	out, err := os.Create(console)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	args := append([]string{"-c", `for cg in $OTHERIX_CGROUPS; do echo $$ > "$cg/cgroup.procs" || exit 1; done; exec "$@"`,
		"sh", "systemd-nspawn", "--quiet",
		"--directory=" + rootfs, "--boot", "--register=no", "--keep-unit", "--console=passive",
		"--volatile=overlay", // changes go to a tmpfs: the cached rootfs stays clean
		"--private-network", "--notify-ready=yes", "--machine=" + name,
	}, extra...)
	cmd := exec.Command("/bin/sh", args...)
	cmd.Env = []string{"PATH=" + DefaultPath, "LANG=C", "NOTIFY_SOCKET=" + sockPath, "OTHERIX_CGROUPS=" + strings.Join(cgroups, " ")}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start systemd-nspawn: %v", err)
	}
	c := &container{t: t, nspawn: cmd, exited: make(chan struct{}), console: console}
	go func() { _ = cmd.Wait(); close(c.exited) }()
	t.Cleanup(func() { c.shutdown(cgroups) })

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
				t.Fatal("nspawn notify socket closed")
			}
			for line := range strings.SplitSeq(m, "\n") {
				if v, ok := strings.CutPrefix(line, "X_NSPAWN_LEADER_PID="); ok {
					c.leader, _ = strconv.Atoi(v)
				}
				ready = ready || line == "READY=1"
			}
		case <-c.exited:
			t.Fatalf("systemd-nspawn exited during boot:\n%s", c.consoleTail())
		case <-ctx.Done():
			t.Fatalf("container did not boot: %v\n%s", ctx.Err(), c.consoleTail())
		}
	}
	t.Logf("container booted in %v (leader pid %d)", time.Since(start).Round(time.Millisecond), c.leader)
	c.connect(ctx)
	t.Cleanup(func() {
		if t.Failed() {
			// Before shutdown (cleanups run last-in first-out).
			out, _ := c.try(context.Background(), "journalctl", "--no-pager", "-n", "150")
			t.Logf("container journal:\n%s\nconsole:\n%s", out, c.consoleTail())
		}
	})
	return c
}

// connect opens PID 1's API through the container's system bus.
// (PID 1's private socket refuses a client from another PID namespace.)
func (c *container) connect(ctx context.Context) {
	c.t.Helper()
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
		c.t.Fatalf("connect to the container's systemd: %v", err)
	}
	c.sd = sd
	c.t.Cleanup(sd.Close)
	sig, err := dial()
	if err != nil {
		c.t.Fatalf("connect to the container's systemd: %v", err)
	}
	c.t.Cleanup(func() { sig.Close() })
	c.wake = make(chan *godbus.Signal, 256)
	sig.Signal(c.wake)
	if err := sig.BusObject().CallWithContext(ctx, "org.freedesktop.DBus.AddMatch", 0,
		"type='signal',sender='org.freedesktop.systemd1'").Store(); err != nil {
		c.t.Fatalf("add match: %v", err)
	}
	// Without a subscriber PID 1 does not emit unit changes.
	if err := sig.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1").
		CallWithContext(ctx, "org.freedesktop.systemd1.Manager.Subscribe", 0).Store(); err != nil {
		c.t.Fatalf("subscribe: %v", err)
	}
}

// shutdown kills the container's PID 1 (which ends every process in it),
// waits for nspawn and removes the cgroups made for it.
func (c *container) shutdown(cgroups []string) {
	start := time.Now()
	if c.leader > 0 {
		_ = syscall.Kill(c.leader, syscall.SIGKILL)
	} else {
		_ = syscall.Kill(-c.nspawn.Process.Pid, syscall.SIGKILL)
	}
	select {
	case <-c.exited:
	case <-time.After(30 * time.Second):
		c.t.Errorf("systemd-nspawn still running 30s after its container was killed; killing it")
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
				c.t.Errorf("remove cgroup: %v", err)
			}
		}
	}
	c.t.Logf("container stopped and cleaned up in %v", time.Since(start).Round(time.Millisecond))
}

func (c *container) consoleTail() string {
	b, _ := os.ReadFile(c.console)
	return tail(b, 3000)
}

// try runs a command inside the container.
func (c *container) try(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(c.leader), "-a", "--"}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "TERM=dumb"}
	cmd.Dir = "/"
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out), nil
}

func (c *container) nsenter(ctx context.Context, args ...string) string {
	c.t.Helper()
	out, err := c.try(ctx, args...)
	if err != nil {
		c.t.Fatal(err)
	}
	return out
}

func (c *container) systemctl(ctx context.Context, args ...string) string {
	c.t.Helper()
	return c.nsenter(ctx, append([]string{"systemctl"}, args...)...)
}

// show returns `systemctl show -p ...` as a map.
func (c *container) show(ctx context.Context, unit string, keys ...string) map[string]string {
	c.t.Helper()
	out := c.systemctl(ctx, "show", "-p", strings.Join(keys, ","), unit)
	m := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			m[k] = v
		}
	}
	return m
}

// props are a service's Unit and Service properties read over D-Bus.
type props map[string]any

func (p props) str(k string) string { s, _ := p[k].(string); return s }
func (p props) u32(k string) uint32 { u, _ := p[k].(uint32); return u }
func (p props) String() string {
	return fmt.Sprintf("ActiveState=%s SubState=%s Result=%s MainPID=%d NRestarts=%d StatusText=%q",
		p.str("ActiveState"), p.str("SubState"), p.str("Result"), p.u32("MainPID"), p.u32("NRestarts"), p.str("StatusText"))
}

func (c *container) service(ctx context.Context, unit string) props {
	c.t.Helper()
	p, err := c.sd.GetUnitPropertiesContext(ctx, unit)
	if err != nil {
		c.t.Fatalf("unit properties of %s: %v", unit, err)
	}
	s, err := c.sd.GetUnitTypePropertiesContext(ctx, unit, "Service")
	if err != nil {
		c.t.Fatalf("service properties of %s: %v", unit, err)
	}
	for k, v := range s {
		p[k] = v
	}
	return props(p)
}

// waitService returns the service's properties once ok accepts them. It
// re-reads them whenever PID 1 emits a signal (it was subscribed before
// the first read, so no change can slip between read and wait).
func (c *container) waitService(ctx context.Context, unit, what string, ok func(props) bool) props {
	c.t.Helper()
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		p := c.service(ctx, unit)
		if ok(p) {
			return p
		}
		select {
		case <-c.wake:
			for len(c.wake) > 0 {
				<-c.wake
			}
		case <-wctx.Done():
			c.t.Fatalf("%s: waiting for %s: %v; last state: %s", unit, what, wctx.Err(), p)
		}
	}
}

var vmPIDRe = regexp.MustCompile(`; vm pid (\d+) (started|adopted);`)

// vmPIDFromStatus reads the VM's pid from sdtestd's STATUS= line.
func (c *container) vmPIDFromStatus(p props, how string) int {
	c.t.Helper()
	m := vmPIDRe.FindStringSubmatch(p.str("StatusText"))
	if m == nil || m[2] != how {
		c.t.Fatalf("status %q: want a vm %s", p.str("StatusText"), how)
	}
	if !strings.Contains(p.str("StatusText"), "placement "+KindScope) {
		c.t.Errorf("status %q: want placement %s", p.str("StatusText"), KindScope)
	}
	pid, _ := strconv.Atoi(m[1])
	return pid
}

// checkVM asserts the stand-in VM runs, as the same process, in its scope.
func (c *container) checkVM(ctx context.Context, pid int) {
	c.t.Helper()
	cmdline, err := c.try(ctx, "cat", fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || cmdline != "/bin/sleep\x00infinity\x00" {
		c.t.Fatalf("vm process %d: cmdline %q, %v", pid, cmdline, err)
	}
	cg := c.nsenter(ctx, "cat", fmt.Sprintf("/proc/%d/cgroup", pid))
	if !strings.Contains(cg, ":/"+DefaultSlice+"/"+vmScope+"\n") {
		c.t.Errorf("vm process %d is not in %s/%s:\n%s", pid, DefaultSlice, vmScope, cg)
	}
	if unit, err := c.sd.GetUnitNameByPID(ctx, uint32(pid)); err != nil || unit != vmScope {
		c.t.Errorf("systemd says vm process %d is in %q (%v), want %s", pid, unit, err, vmScope)
	}
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
