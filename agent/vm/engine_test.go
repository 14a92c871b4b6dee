package vm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/cloudinit"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/internal/leakcheck"
)

// The helper-process trick: the test binary re-executed with
// OTHERIX_ENGINE_HELPER set is a minimal agent that starts one VM, prints
// its PID and waits to be killed.
func TestMain(m *testing.M) {
	if os.Getenv("OTHERIX_ENGINE_HELPER") == "1" {
		helperAgent()
		return
	}
	os.Exit(leakcheck.Main(m))
}

func helperAgent() {
	e, err := New(Config{StateDir: os.Getenv("H_STATE"), RunDir: os.Getenv("H_RUN"), Logger: zap.NewNop(), Credential: nobody})
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	if err := e.Recover(context.Background()); err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	for _, name := range strings.Split(os.Getenv("H_VMS"), ",") {
		v, err := e.Start(context.Background(), name)
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
		fmt.Println("PID", name, v.PID)
	}
	select {}
}

type harness struct {
	t       testing.TB
	e       *Engine
	state   string
	run     string
	pool    string
	changes chan View
	cfg     Config
}

func newHarness(t *testing.T, mut func(*Config)) *harness {
	t.Helper()
	run, err := os.MkdirTemp("/tmp", "oxr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	h := &harness{t: t, state: t.TempDir(), run: run, pool: t.TempDir(), changes: make(chan View, 256)}
	h.cfg = Config{
		StateDir:          h.state,
		RunDir:            h.run,
		StopTimeout:       60 * time.Second,
		PowerdownInterval: time.Second,
		Credential:        nobody,
		Logger:            zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)),
		OnChange: func(v View) {
			select {
			case h.changes <- v:
			default:
			}
		},
	}
	if mut != nil {
		mut(&h.cfg)
	}
	h.open()
	return h
}

// open (re)creates the engine on the harness's directories.
func (h *harness) open() {
	h.t.Helper()
	e, err := New(h.cfg)
	if err != nil {
		h.t.Fatal(err)
	}
	if err := e.Recover(context.Background()); err != nil {
		h.t.Fatal(err)
	}
	h.e = e
	h.t.Cleanup(func() { h.killAll(e) })
}

// killAll makes sure no QEMU outlives the test.
func (h *harness) killAll(e *Engine) {
	var pids []int
	for _, v := range e.List() {
		if v.PID > 0 && isOurQEMU(v.PID, v.Spec.UUID) {
			pids = append(pids, v.PID)
		}
	}
	if err := leakcheck.Kill(pids...); err != nil {
		h.t.Error(err)
	}
	e.Close()
}

// define makes a VM of the test guest: a qcow2 overlay on the cached guest
// image and a NoCloud seed built by the cloudinit package.
func (h *harness) define(name, userData string) View {
	h.t.Helper()
	return h.defineWith(name, userData, nil)
}

// defineWith is define with host devices.
func (h *harness) defineWith(name, userData string, hd *hostdev.Spec) View {
	h.t.Helper()
	return h.defineOn(testguest.QCOW2(h.t), name, userData, hd)
}

// defineOn defines a VM whose root disk is a qcow2 overlay on base.
func (h *harness) defineOn(base, name, userData string, hd *hostdev.Spec) View {
	h.t.Helper()
	id := uuid.NewString()
	dir := filepath.Join(h.pool, "vms", id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		h.t.Fatal(err)
	}
	root := filepath.Join(dir, "root.qcow2")
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, root).CombinedOutput()
	if err != nil {
		h.t.Fatalf("qemu-img: %v: %s", err, out)
	}
	seed := filepath.Join(dir, "seed.iso")
	s := cloudinit.Seed{InstanceID: id, Hostname: name}
	if userData != "" {
		s.UserData = []byte(userData)
	}
	if err := cloudinit.WriteISO(seed, s); err != nil {
		h.t.Fatal(err)
	}
	v, err := h.e.Define(context.Background(), Spec{
		Name: name, UUID: id, Arch: ArchAMD64, VCPUs: 1, MemoryMB: 256,
		Disks:       []Disk{{Path: root, Format: "qcow2", Backing: &Backing{Path: base, Format: "qcow2"}}},
		CDROMs:      []CDROM{{Path: seed}},
		HostDevices: hd,
		OwnedPaths:  []string{dir},
	}, nil)
	if err != nil {
		h.t.Fatal(err)
	}
	return v
}

func (h *harness) console(v View) *testguest.Console { return testguest.OpenConsole(v.ConsolePath) }

func waitFor(t *testing.T, c *testguest.Console, substr string, d time.Duration) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	line, err := c.WaitFor(ctx, substr)
	if err != nil {
		t.Fatalf("waiting for %q on the console: %v\n%s", substr, err, strings.Join(c.Lines(), "\n"))
	}
	return line
}

// waitStatus waits until vm name has status, seen either now or in an
// OnChange notification (so short-lived statuses are not missed).
func (h *harness) waitStatus(name, status string, d time.Duration) View {
	h.t.Helper()
	deadline := time.After(d)
	if v, err := h.e.Get(name); err == nil && v.Status == status {
		return v
	}
	for {
		select {
		case v := <-h.changes:
			if v.Spec.Name == name && v.Status == status {
				return v
			}
		case <-deadline:
			v, _ := h.e.Get(name)
			h.t.Fatalf("vm %s: status %s (%s), want %s", name, v.Status, v.Reason, status)
		}
	}
}

// drain forgets past notifications.
func (h *harness) drain() {
	for {
		select {
		case <-h.changes:
		default:
			return
		}
	}
}

func wantCode(t *testing.T, err error, code errcode.Code) {
	t.Helper()
	if errcode.Of(err) != code {
		t.Fatalf("got error %v, want code %s", err, code)
	}
}

const bootWait = 90 * time.Second

// Every engine test runs QEMU as nobody, as production runs it as the
// unprivileged QEMU user.
var nobody = &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}

// TestLifecycle walks one VM through seed 004's whole life against the real
// test guest: create, pause, resume, reset, stop, start, reboot, poweroff,
// delete, with the conflict cases along the way.
func TestLifecycle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHarness(t, nil)
	v := h.define("life-1", "#cloud-config\n{}\n")
	con := h.console(v)

	_, err := h.e.Define(ctx, v.Spec, nil)
	wantCode(t, err, errcode.Conflict)
	_, err = h.e.Pause(ctx, "life-1")
	wantCode(t, err, errcode.Conflict) // stopped
	_, err = h.e.Stop(ctx, "life-1")
	wantCode(t, err, errcode.Conflict)
	_, err = h.e.Start(ctx, "nope")
	wantCode(t, err, errcode.NotFound)

	v, err = h.e.Start(ctx, "life-1")
	if err != nil {
		t.Fatal(err)
	}
	if v.Status != "running" || v.PID == 0 {
		t.Fatalf("after start: %+v", v)
	}
	pid := v.PID
	waitFor(t, con, "OTHERIX-GUEST booted", bootWait)
	waitFor(t, con, "OTHERIX-GUEST cidata instance-id="+v.Spec.UUID, bootWait)
	waitFor(t, con, "OTHERIX-GUEST tick", bootWait)

	// Start is idempotent.
	if v2, err := h.e.Start(ctx, "life-1"); err != nil || v2.PID != pid {
		t.Fatalf("second start: %v %+v", err, v2)
	}
	_, err = h.e.Resume(ctx, "life-1")
	wantCode(t, err, errcode.Conflict) // running

	// Pause: the guest is frozen, no tick while paused.
	v, err = h.e.Pause(ctx, "life-1")
	if err != nil || v.Status != "paused" {
		t.Fatalf("pause: %v %+v", err, v)
	}
	_, err = h.e.Pause(ctx, "life-1")
	wantCode(t, err, errcode.Conflict)
	before := len(con.Lines())
	waitForNothing(t, con, "OTHERIX-GUEST tick", 3*time.Second)
	if after := len(con.Lines()); after != before {
		t.Fatalf("guest printed %d lines while paused", after-before)
	}
	v, err = h.e.Resume(ctx, "life-1")
	if err != nil || v.Status != "running" {
		t.Fatalf("resume: %v %+v", err, v)
	}
	waitFor(t, con, "OTHERIX-GUEST tick", 30*time.Second)

	// Reset: boots again in the same QEMU.
	v, err = h.e.Reset(ctx, "life-1")
	if err != nil || v.PID != pid || v.Status != "running" {
		t.Fatalf("reset: %v %+v", err, v)
	}
	waitFor(t, con, "OTHERIX-GUEST booted", bootWait)
	waitFor(t, con, "OTHERIX-GUEST ready", bootWait)

	// Graceful stop: the guest sees the power button.
	v, err = h.e.Stop(ctx, "life-1")
	if err != nil || v.Status != "stopped" || v.PID != 0 {
		t.Fatalf("stop: %v %+v", err, v)
	}
	waitFor(t, con, "OTHERIX-GUEST powering off", 5*time.Second)
	if isOurQEMU(pid, v.Spec.UUID) {
		t.Fatalf("qemu %d still alive after stop", pid)
	}
	_, err = h.e.Reset(ctx, "life-1")
	wantCode(t, err, errcode.Conflict)

	// Start and reboot: a reboot gets a new PID.
	v, err = h.e.Start(ctx, "life-1")
	if err != nil {
		t.Fatal(err)
	}
	pid = v.PID
	waitFor(t, con, "OTHERIX-GUEST ready", bootWait)
	// Reboot in the background; an op arriving meanwhile is a conflict, not
	// a wait.
	type result struct {
		v   View
		err error
	}
	done := make(chan result, 1)
	h.drain()
	go func() { v, err := h.e.Reboot(ctx, "life-1"); done <- result{v, err} }()
	h.waitStatus("life-1", "stopping", 10*time.Second)
	_, err = h.e.Pause(ctx, "life-1")
	wantCode(t, err, errcode.Conflict)
	r := <-done
	if r.err != nil || r.v.Status != "running" || r.v.PID == pid || r.v.PID == 0 {
		t.Fatalf("reboot: %v %+v (old pid %d)", r.err, r.v, pid)
	}
	waitFor(t, con, "OTHERIX-GUEST booted", bootWait)

	if _, err := h.e.Poweroff(ctx, "life-1"); err != nil {
		t.Fatalf("poweroff: %v", err)
	}
	v, _ = h.e.Get("life-1")
	if v.Status != "stopped" || v.Reason != "powered off" {
		t.Fatalf("after poweroff: %+v", v)
	}

	// Delete leaves no file of the VM.
	files := append([]string{h.e.vmDir(v.Spec.UUID), filepath.Join(h.run, ShortID(v.Spec.UUID))}, v.Spec.OwnedPaths...)
	if err := h.e.Delete(ctx, "life-1"); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after delete (%v)", f, err)
		}
	}
	_, err = h.e.Get("life-1")
	wantCode(t, err, errcode.NotFound)
}

// waitForNothing asserts substr does not appear on the console within d.
func waitForNothing(t *testing.T, c *testguest.Console, substr string, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if line, err := c.WaitFor(ctx, substr); err == nil {
		t.Fatalf("unexpected console line %q", line)
	}
}

// TestStopTimeout: a guest that ignores the power button makes stop fail
// with stop_timeout, and the VM is left running.
func TestStopTimeout(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHarness(t, func(c *Config) { c.StopTimeout = 4 * time.Second })
	v := h.define("stubborn", "#cloud-config\n#otherix-guest: ignore-acpi\n{}\n")
	con := h.console(v)
	v, err := h.e.Start(ctx, "stubborn")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, con, "OTHERIX-GUEST ready", bootWait)
	_, err = h.e.Stop(ctx, "stubborn")
	wantCode(t, err, errcode.StopTimeout)
	waitFor(t, con, "OTHERIX-GUEST ignoring power button", 5*time.Second)
	v2, _ := h.e.Get("stubborn")
	if v2.Status != "running" || v2.PID != v.PID || !isOurQEMU(v.PID, v.Spec.UUID) {
		t.Fatalf("after stop_timeout: %+v", v2)
	}
	if _, err := h.e.Poweroff(ctx, "stubborn"); err != nil {
		t.Fatal(err)
	}
}

// TestAgentKilledReadopts: an agent killed with SIGKILL while VMs run is
// restarted and re-adopts them with the same PIDs; QEMU then killed behind
// the agent's back is recorded as crashed within a second.
func TestAgentKilledReadopts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHarness(t, nil)
	a := h.define("adopt-a", "")
	b := h.define("adopt-b", "")
	h.e.Close()

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "OTHERIX_ENGINE_HELPER=1", "H_STATE="+h.state, "H_RUN="+h.run, "H_VMS=adopt-a,adopt-b")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pids := map[string]int{}
	sc := bufio.NewScanner(out)
	for len(pids) < 2 && sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 3 && f[0] == "PID" {
			pids[f[1]], _ = strconv.Atoi(f[2])
			continue
		}
		t.Fatalf("helper agent: %s", sc.Text())
	}
	for _, v := range []View{a, b} {
		if !isOurQEMU(pids[v.Spec.Name], v.Spec.UUID) {
			t.Fatalf("helper did not start %s: %v", v.Spec.Name, pids)
		}
		t.Cleanup(func() { syscall.Kill(pids[v.Spec.Name], syscall.SIGKILL) })
	}
	waitFor(t, h.console(a), "OTHERIX-GUEST ready", bootWait)
	cmd.Process.Kill()
	cmd.Wait()

	h.open()
	for _, v := range []View{a, b} {
		got, err := h.e.Get(v.Spec.Name)
		if err != nil || got.Status != "running" || got.PID != pids[v.Spec.Name] {
			t.Fatalf("re-adopted %s: %v %+v, want pid %d", v.Spec.Name, err, got, pids[v.Spec.Name])
		}
	}
	// The adopted VM is fully controllable.
	if v, err := h.e.Pause(ctx, "adopt-a"); err != nil || v.Status != "paused" {
		t.Fatalf("pause adopted: %v %+v", err, v)
	}
	if _, err := h.e.Resume(ctx, "adopt-a"); err != nil {
		t.Fatal(err)
	}
	// No second QEMU: start is a no-op on the adopted VM.
	if v, err := h.e.Start(ctx, "adopt-a"); err != nil || v.PID != pids["adopt-a"] {
		t.Fatalf("start adopted: %v %+v", err, v)
	}

	// Kill QEMU behind the agent's back.
	killed := time.Now()
	syscall.Kill(pids["adopt-b"], syscall.SIGKILL)
	v := h.waitStatus("adopt-b", "crashed", time.Second)
	t.Logf("crash of an adopted qemu recorded after %s (%s)", time.Since(killed), v.Reason)

	if _, err := h.e.Stop(ctx, "adopt-a"); err != nil {
		t.Fatal(err)
	}
}

// TestCrashOfChildRecorded: QEMU started by this engine and killed behind
// its back is recorded as crashed within a second, with the signal.
func TestCrashOfChildRecorded(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHarness(t, nil)
	h.define("crashy", "")
	v, err := h.e.Start(ctx, "crashy")
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	syscall.Kill(v.PID, syscall.SIGKILL)
	v = h.waitStatus("crashy", "crashed", time.Second)
	t.Logf("crash recorded after %s: %s", time.Since(killed), v.Reason)
	if !strings.Contains(v.Reason, "killed") {
		t.Errorf("reason %q does not say it was killed", v.Reason)
	}
	// A crashed VM can be started again.
	if v, err = h.e.Start(ctx, "crashy"); err != nil || v.Status != "running" {
		t.Fatalf("restart after crash: %v %+v", err, v)
	}
	if _, err := h.e.Poweroff(ctx, "crashy"); err != nil {
		t.Fatal(err)
	}
}

// TestStartFailureSaysWhy: a QEMU that cannot start reports
// qemu_start_failed with its own words, and no process is left.
func TestStartFailureSaysWhy(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	v := h.define("broken", "")
	os.Remove(v.Spec.Disks[0].Path)
	_, err := h.e.Start(context.Background(), "broken")
	wantCode(t, err, errcode.QEMUStartFailed)
	if !strings.Contains(err.Error(), "root.qcow2") {
		t.Errorf("error does not carry QEMU's reason: %v", err)
	}
	v, _ = h.e.Get("broken")
	if v.Status != "stopped" || v.PID != 0 {
		t.Fatalf("after failed start: %+v", v)
	}
}
