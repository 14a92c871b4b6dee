package systemd

// The real-systemd test: a Debian rootfs with QEMU, booted with
// systemd-nspawn (see internal/nspawntest); the repository's unit
// (dist/otherix-agent.service, as is, plus the drop-in
// testdata/nspawn/otherix-agent.service.d/test.conf) runs the real
// otherix-agent --standalone built from this checkout, with
// testdata/nspawn/agent.yaml as /etc/otherix/agent.yaml; a VM of the test
// guest is created and stopped with the real otherix CLI inside the
// container. Everything is checked from outside: systemctl and journalctl
// (run inside with nsenter), PID 1's D-Bus API, the CLI's JSON and the
// guest's serial console.
//
// Needs root and the Debian packages systemd-container and debootstrap
// (the test fails, with that message, when they are missing). The rootfs
// is built once (about five minutes: it downloads QEMU and its libraries)
// and cached under ${OTHERIX_TEST_CACHE:-/var/cache/otherix-test}.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/systemd/internal/nspawntest"
)

// rootfsRecipe is how the cached rootfs is made; changing it rebuilds the
// cache. procps provides the unit's /bin/kill (ExecReload), passwd the
// useradd that creates the QEMU user, qemu-system-x86 and qemu-utils what
// the agent runs (debootstrap pulls their dependencies, not their
// recommendations).
const rootfsRecipe = "debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,passwd,qemu-system-x86,qemu-utils bookworm"

const (
	agentUnit = "otherix-agent.service"
	qemuUser  = "otherix-qemu" // the default qemu.user
	// Where the container sees the test guest's folder.
	guestDir = "/srv/otherix-testguest"
	vmName   = "vm1"
)

// vmView is the part of `otherix vm get NAME -o json` the test reads.
type vmView struct {
	Name         string `json:"name"`
	UUID         string `json:"uuid"`
	Status       string `json:"status"`
	StatusReason string `json:"status_reason"`
	QEMUPID      int    `json:"qemu_pid"`
}

// scope is the VM's transient unit: ScopeName of the short id the agent
// uses (agent/vm.ShortID: the uuid's first 12 hex digits).
func (v vmView) scope() string {
	return ScopeName(strings.ReplaceAll(v.UUID, "-", "")[:12])
}

func TestAgentInSystemdContainer(t *testing.T) {
	began := time.Now()
	nspawntest.RequireTools(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	rootfs := nspawntest.Rootfs(ctx, t, rootfsRecipe)
	bin := buildAgent(ctx, t)
	guest := testguest.Dir(t)

	work, err := os.MkdirTemp("", "sdnspawn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	// The agent's state (image cache, VM disks, console logs) on disk, not
	// in the container's tmpfs: the pool's free-space floor is 1 GiB.
	state := filepath.Join(work, "state")
	if err := os.Mkdir(state, 0o755); err != nil {
		t.Fatal(err)
	}
	abs := func(p string) string {
		a, err := filepath.Abs(p)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	c := nspawntest.Boot(ctx, t, rootfs, work,
		"--bind-ro="+filepath.Join(bin, "otherix-agent")+":/usr/local/bin/otherix-agent",
		"--bind-ro="+filepath.Join(bin, "otherix")+":/usr/local/bin/otherix",
		"--bind-ro="+abs(unitFile)+":/etc/systemd/system/"+agentUnit,
		"--bind-ro="+abs("testdata/nspawn/"+agentUnit+".d")+":/etc/systemd/system/"+agentUnit+".d",
		"--bind-ro="+abs("testdata/nspawn/agent.yaml")+":/etc/otherix/agent.yaml",
		"--bind-ro="+guest+":"+guestDir,
		"--bind="+state+":/var/lib/otherix",
	)
	// What a package's postinst does.
	c.Run(ctx, "useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
		"--shell", "/usr/sbin/nologin", qemuUser)
	// The VM's QEMU runs as a uid of its own from qemu.uid_range, the
	// same across agent restarts (checkVM notes it the first time).
	qemuUID := ""

	var vm vmView
	var mainPID, restarts uint32
	step := func(name string, f func()) {
		t.Helper()
		if t.Failed() {
			return
		}
		start := time.Now()
		f()
		t.Logf("step %q: %v", name, time.Since(start).Round(time.Millisecond))
	}

	step("start: active (running) once READY=1, API serving", func() {
		// Type=notify: systemctl start returns once the agent sent READY=1.
		c.Systemctl(ctx, "start", agentUnit)
		p := c.Service(ctx, agentUnit)
		if p.Str("ActiveState") != "active" || p.Str("SubState") != "running" {
			t.Fatalf("after start: %s", p)
		}
		if !strings.HasPrefix(p.Str("StatusText"), "0/0 VMs running; control plane") {
			t.Errorf("status at READY: %q", p.Str("StatusText"))
		}
		mainPID, restarts = p.U32("MainPID"), p.U32("NRestarts")
		// The agent found WatchdogSec= (3s in the drop-in) in its
		// environment and pings at half of it.
		c.WaitJournal(ctx, `"msg":"systemd watchdog enabled","interval":1.5`, "_SYSTEMD_UNIT="+agentUnit, fmt.Sprintf("_PID=%d", mainPID))
		// READY=1 comes after the API listens: no retry needed.
		var list struct {
			VMs []json.RawMessage `json:"vms"`
		}
		out := otherix(ctx, t, c, "vm", "list", "-o", "json")
		if err := json.Unmarshal([]byte(out), &list); err != nil || list.VMs == nil || len(list.VMs) != 0 {
			t.Errorf("vm list right after READY: %q (%v)", out, err)
		}
		journal := c.Journal(ctx, "-u", agentUnit)
		for _, want := range []string{`"msg":"vm placement: one transient systemd scope per VM"`, `"msg":"ready","placement":"systemd-scope"`} {
			if !strings.Contains(journal, want) {
				t.Errorf("the journal lacks %s:\n%s", want, journal)
			}
		}
		status := c.Systemctl(ctx, "status", "--no-pager", "--lines=0", agentUnit)
		for _, want := range []string{"Active: active (running)", `Status: "0/0 VMs running; control plane `} {
			if !strings.Contains(status, want) {
				t.Errorf("systemctl status lacks %q:\n%s", want, status)
			}
		}
	})

	step("vm create with the CLI: QEMU in its own transient scope", func() {
		out := otherix(ctx, t, c, "vm", "create", vmName, "--image-url", "file://"+guestDir+"/guest.qcow2",
			"--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--wait")
		if !strings.Contains(out, "vm running task=") {
			t.Fatalf("vm create --wait: %q", out)
		}
		vm = vmGet(ctx, t, c)
		if vm.Status != "running" || vm.QEMUPID == 0 {
			t.Fatalf("after create: %+v", vm)
		}
		got := c.Show(ctx, vm.scope(), "ActiveState", "Transient", "Slice", "ControlGroup", "CPUAccounting",
			"MemoryAccounting", "TasksAccounting", "IOAccounting", "MemoryMax", "MemorySwapMax", "CPUWeight",
			"CPUQuotaPerSecUSec", "IOWeight", "TasksMax", "Description")
		want := map[string]string{
			"ActiveState": "active", "Transient": "yes", "Slice": DefaultSlice,
			"ControlGroup":  "/" + DefaultSlice + "/" + vm.scope(),
			"CPUAccounting": "yes", "MemoryAccounting": "yes", "TasksAccounting": "yes", "IOAccounting": "yes",
			// docs/config.md, "VM limits": guest RAM plus 512 MiB for
			// QEMU, no swap; a weight of 100 per vCPU; no cap without a
			// cpu_limit; the default IO weight and tasks limit.
			"MemoryMax": strconv.Itoa(256<<20 + 512<<20), "MemorySwapMax": "0", "CPUWeight": "100",
			"CPUQuotaPerSecUSec": "infinity", "IOWeight": "100", "TasksMax": "1024",
			"Description": fmt.Sprintf("otherix VM %s (%s)", vmName, vm.UUID),
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("%s %s: got %q, want %q", vm.scope(), k, got[k], v)
			}
		}
		status := c.Systemctl(ctx, "status", "--no-pager", "--lines=0", vm.scope())
		if !strings.Contains(status, "Active: active (running)") || !strings.Contains(status, strconv.Itoa(vm.QEMUPID)+" ") {
			t.Errorf("systemctl status %s:\n%s", vm.scope(), status)
		}
		checkVM(ctx, t, c, vm, &qemuUID)
		// QEMU got ChildEnv, not the agent's NOTIFY_SOCKET and WATCHDOG_*.
		env := c.Run(ctx, "cat", fmt.Sprintf("/proc/%d/environ", vm.QEMUPID))
		if want := "PATH=" + DefaultPath + "\x00LANG=C\x00"; env != want {
			t.Errorf("qemu environment: got %q, want %q", env, want)
		}
	})

	step("reload: SIGHUP through ExecReload, same process, vm untouched", func() {
		c.Systemctl(ctx, "reload", agentUnit)
		c.WaitJournal(ctx, `"msg":"reload: done"`, "_SYSTEMD_UNIT="+agentUnit, fmt.Sprintf("_PID=%d", mainPID))
		p := c.WaitService(ctx, agentUnit, "active again", func(p nspawntest.Props) bool { return p.Str("SubState") == "running" })
		if p.U32("MainPID") != mainPID {
			t.Errorf("reload changed the main pid: %d -> %d", mainPID, p.U32("MainPID"))
		}
		checkVM(ctx, t, c, vm, &qemuUID)
	})

	// readopted checks, after the agent came back as a new process, that
	// it re-adopted the same QEMU before READY=1 and reports it running.
	readopted := func(p nspawntest.Props, how string) {
		t.Helper()
		if p.U32("MainPID") == mainPID {
			t.Fatalf("%s: main pid %d did not change: %s", how, mainPID, p)
		}
		mainPID, restarts = p.U32("MainPID"), p.U32("NRestarts")
		if !strings.HasPrefix(p.Str("StatusText"), "1/1 VMs running;") {
			t.Errorf("%s: status at READY %q: the vm was not re-adopted before READY=1", how, p.Str("StatusText"))
		}
		journal := c.Journal(ctx, "_SYSTEMD_UNIT="+agentUnit, fmt.Sprintf("_PID=%d", mainPID))
		if !strings.Contains(journal, `"msg":"re-adopted qemu"`) {
			t.Errorf("%s: the new agent did not log the re-adoption:\n%s", how, journal)
		}
		got := vmGet(ctx, t, c)
		if got.Status != "running" || got.QEMUPID != vm.QEMUPID {
			t.Errorf("%s: the agent reports %+v, want running with qemu pid %d", how, got, vm.QEMUPID)
		}
		checkVM(ctx, t, c, vm, &qemuUID)
	}

	step("systemctl restart leaves the vm running; the agent re-adopts it", func() {
		c.Systemctl(ctx, "restart", agentUnit)
		p := c.Service(ctx, agentUnit)
		if p.Str("SubState") != "running" {
			t.Fatalf("after restart: %s", p)
		}
		readopted(p, "restart")
	})

	step("kill -9 of the agent: Restart= brings it back, vm untouched", func() {
		c.Run(ctx, "kill", "-KILL", strconv.Itoa(int(mainPID)))
		p := c.WaitService(ctx, agentUnit, "restarted after SIGKILL", func(p nspawntest.Props) bool {
			return p.Str("SubState") == "running" && p.U32("MainPID") != mainPID && p.U32("NRestarts") > restarts
		})
		readopted(p, "kill -9")
	})

	step("wedged agent (SIGSTOP): the watchdog kills it, Restart= brings it back", func() {
		wedged := mainPID
		c.Run(ctx, "kill", "-STOP", strconv.Itoa(int(wedged)))
		p := c.WaitService(ctx, agentUnit, "restarted by the watchdog", func(p nspawntest.Props) bool {
			return p.Str("SubState") == "running" && p.U32("MainPID") != wedged && p.U32("NRestarts") > restarts
		})
		// systemd sends WatchdogSignal= (SIGABRT) and SIGCONT: the Go
		// runtime dumps its goroutines and exits.
		journal := c.Journal(ctx, "UNIT="+agentUnit, "_PID=1")
		for _, want := range []string{"Watchdog timeout (limit 3s)!", fmt.Sprintf("Killing process %d (otherix-agent) with signal SIGABRT.", wedged)} {
			if !strings.Contains(journal, want) {
				t.Errorf("systemd did not log %q:\n%s", want, journal)
			}
		}
		readopted(p, "watchdog")
	})

	step("vm stop through the agent removes its scope", func() {
		// The guest handles the ACPI power button once it has booted; it
		// booted once: none of the agent's restarts touched it.
		con := testguest.OpenConsole(filepath.Join(state, "vms", vm.UUID, "console.log"))
		defer con.Close()
		wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		if _, err := con.WaitFor(wctx, "OTHERIX-GUEST ready"); err != nil {
			t.Fatal(err)
		}
		booted := 0
		for _, l := range con.Lines() {
			if strings.Contains(l, "OTHERIX-GUEST booted") {
				booted++
			}
		}
		if booted != 1 {
			t.Errorf("the guest booted %d times, want once", booted)
		}
		out := otherix(ctx, t, c, "vm", "stop", vmName, "--wait")
		if !strings.Contains(out, "vm stopped task=") {
			t.Fatalf("vm stop --wait: %q", out)
		}
		if got := vmGet(ctx, t, c); got.Status != "stopped" || got.QEMUPID != 0 {
			t.Errorf("after stop: %+v", got)
		}
		// A graceful stop, through QMP on the last agent's re-adopted
		// connection: the guest saw the power button.
		if _, err := con.WaitFor(wctx, "OTHERIX-GUEST powering off"); err != nil {
			t.Error(err)
		}
		if out, err := c.Try(ctx, "test", "-e", fmt.Sprintf("/proc/%d", vm.QEMUPID)); err == nil {
			t.Errorf("qemu process %d still exists %s", vm.QEMUPID, out)
		}
		// Remove waited for the stop job; the unit is then collected.
		c.WaitUnit(ctx, vm.scope(), "gone", func(p nspawntest.Props) bool {
			return p.Str("LoadState") == "not-found" && p.Str("ActiveState") == "inactive"
		})
	})

	step("systemctl stop: clean exit", func() {
		c.Systemctl(ctx, "stop", agentUnit)
		p := c.Service(ctx, agentUnit)
		if p.Str("ActiveState") != "inactive" || p.Str("Result") != "success" {
			t.Errorf("after stop: %s", p)
		}
	})

	// Placement failures are only logged (the VM runs on, in the agent's
	// cgroup): none may have happened.
	journal := c.Journal(ctx, "-u", agentUnit)
	for line := range strings.SplitSeq(journal, "\n") {
		if strings.Contains(line, `"level":"warn"`) || strings.Contains(line, `"level":"error"`) {
			t.Logf("agent log: %s", line)
		}
		for _, bad := range []string{`"msg":"place qemu"`, `"msg":"place re-adopted qemu"`, `"msg":"remove placement"`} {
			if strings.Contains(line, bad) {
				t.Errorf("placement failed: %s", line)
			}
		}
	}
	t.Logf("whole test (setup included): %v", time.Since(began).Round(time.Millisecond))
}

// buildAgent builds otherix-agent and otherix from this checkout into a
// folder and returns it. Static binaries run in any rootfs.
func buildAgent(ctx context.Context, t *testing.T) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = "/usr/local/go/bin/go"
	}
	dir := t.TempDir()
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", dir+"/",
		"github.com/otherix/otherix-agent/cmd/otherix-agent", "github.com/otherix/otherix-agent/cmd/otherix")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the agent: %v\n%s", err, b)
	}
	return dir
}

// otherix runs the otherix CLI inside the container, against the agent's
// default API address (127.0.0.1:7480 in the container's network).
func otherix(ctx context.Context, t *testing.T, c *nspawntest.Container, args ...string) string {
	t.Helper()
	return c.Run(ctx, append([]string{"env", "OTHERIX_POLL_INTERVAL=200ms", "/usr/local/bin/otherix"}, args...)...)
}

func vmGet(ctx context.Context, t *testing.T, c *nspawntest.Container) vmView {
	t.Helper()
	var v vmView
	if err := json.Unmarshal([]byte(otherix(ctx, t, c, "vm", "get", vmName, "-o", "json")), &v); err != nil {
		t.Fatalf("vm get -o json: %v", err)
	}
	return v
}

// checkVM asserts that the VM's QEMU runs, as the same process and as the
// QEMU user (uid), in its own scope.
func checkVM(ctx context.Context, t *testing.T, c *nspawntest.Container, v vmView, uid *string) {
	t.Helper()
	pid := v.QEMUPID
	cmdline, err := c.Try(ctx, "cat", fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(cmdline, "qemu-system-x86_64") || !strings.Contains(cmdline, "\x00-uuid\x00"+v.UUID+"\x00") {
		t.Fatalf("qemu process %d: cmdline %q, %v", pid, cmdline, err)
	}
	status := c.Run(ctx, "cat", fmt.Sprintf("/proc/%d/status", pid))
	first, count, _ := config.ParseUIDRange(config.DefaultUIDRange)
	got := ""
	for _, line := range strings.Split(status, "\n") {
		if f := strings.Fields(line); len(f) == 5 && f[0] == "Uid:" && f[1] == f[2] && f[1] == f[3] && f[1] == f[4] {
			got = f[1]
		}
	}
	n, err := strconv.ParseUint(got, 10, 32)
	switch {
	case err != nil || uint32(n) < first || uint32(n)-first >= count:
		t.Errorf("qemu process %d does not run as a uid of qemu.uid_range %s:\n%s", pid, config.DefaultUIDRange, status)
	case *uid == "":
		*uid = got
	case got != *uid:
		t.Errorf("qemu process %d runs as uid %s, before as %s", pid, got, *uid)
	}
	cg := c.Run(ctx, "cat", fmt.Sprintf("/proc/%d/cgroup", pid))
	if !strings.Contains(cg, ":/"+DefaultSlice+"/"+v.scope()+"\n") {
		t.Errorf("qemu process %d is not in %s/%s:\n%s", pid, DefaultSlice, v.scope(), cg)
	}
	if unit, err := c.Bus().GetUnitNameByPID(ctx, uint32(pid)); err != nil || unit != v.scope() {
		t.Errorf("systemd says qemu process %d is in %q (%v), want %s", pid, unit, err, v.scope())
	}
}
