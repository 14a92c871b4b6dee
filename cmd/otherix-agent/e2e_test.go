package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/internal/leakcheck"
)

// These tests run the real binaries: otherix-agent --standalone and the
// otherix CLI, against the real test guest served over loopback.

var binDir string

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(func() int { return buildAndRun(m) })) }

// buildAndRun builds the binaries the tests run and runs the tests.
func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "otherix-bin")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	out, err := exec.Command("go", "build", "-buildvcs=auto", "-o", dir+"/", "github.com/otherix/otherix-agent/cmd/otherix-agent", "github.com/otherix/otherix-agent/cmd/otherix").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		return 1
	}
	binDir = dir
	return m.Run()
}

type standaloneAgent struct {
	t       testing.TB
	dir     string // data dir
	cfgPath string
	cmd     *exec.Cmd
	url     string
	token   string // the API token the agent keeps in <dir>/api.token
	socket  string // the API's unix socket, when served
	log     *syncBuffer
	image   string            // URL of the guest image
	ns      *netdevtest.Netns // when set, the agent and the CLI run in it
	env     []string          // extra environment of the agent process
	cluster bool              // cluster.etcd in its config: no --standalone
}

// startAgent writes a config and starts otherix-agent --standalone.
func startAgent(t testing.TB, extraYAML string) *standaloneAgent {
	t.Helper()
	return startAgentIn(t, nil, extraYAML)
}

// startAgentIn starts the agent in a network namespace (nil: the host's).
func startAgentIn(t testing.TB, ns *netdevtest.Netns, extraYAML string) *standaloneAgent {
	t.Helper()
	return startAgentSocket(t, ns, extraYAML, false)
}

// startAgentSocket is startAgentIn, serving the API on a unix socket too
// (a.socket) when socket is set.
func startAgentSocket(t testing.TB, ns *netdevtest.Netns, extraYAML string, socket bool) *standaloneAgent {
	t.Helper()
	return startAgentData(t, ns, t.TempDir(), extraYAML, socket)
}

// startAgentData is startAgentSocket with the data dir given.
func startAgentData(t testing.TB, ns *netdevtest.Netns, dataDir, extraYAML string, socket bool) *standaloneAgent {
	t.Helper()
	run, err := os.MkdirTemp("/tmp", "oxe")
	if err != nil {
		t.Fatal(err)
	}
	a := &standaloneAgent{t: t, dir: dataDir, ns: ns}
	t.Cleanup(func() { os.RemoveAll(run) })
	if socket {
		a.socket = filepath.Join(run, "api.sock")
	}
	a.cfgPath = filepath.Join(t.TempDir(), "agent.yaml")
	cfg := fmt.Sprintf("node_name: node-1\ndata_dir: %s\nrun_dir: %s\nlisten:\n  api: 127.0.0.1:0\n  socket: %q\n  metrics: \"\"\n  forwards: 127.0.0.1\nqemu:\n  stop_timeout: 30s\n%s", a.dir, run, a.socket, extraYAML)
	if err := os.WriteFile(a.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(testguest.Dir(t))))
	t.Cleanup(srv.Close)
	a.image = srv.URL + "/guest.qcow2"
	a.start()
	t.Cleanup(func() {
		a.kill()
		a.killVMs()
	})
	return a
}

func (a *standaloneAgent) start() {
	a.t.Helper()
	os.Remove(filepath.Join(a.dir, "standalone.addr"))
	a.log = &syncBuffer{}
	args := []string{"--standalone", "--config", a.cfgPath}
	if a.cluster {
		args = args[1:]
	}
	a.cmd = exec.Command(filepath.Join(binDir, "otherix-agent"), args...)
	if a.ns != nil {
		a.cmd = a.ns.Command(context.Background(), filepath.Join(binDir, "otherix-agent"), args...)
	}
	a.cmd.Stderr = a.log
	if len(a.env) > 0 {
		a.cmd.Env = append(os.Environ(), a.env...)
	}
	if err := a.cmd.Start(); err != nil {
		a.t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, err := os.ReadFile(filepath.Join(a.dir, "standalone.addr"))
		if err == nil && len(b) > 0 {
			a.url = "http://" + strings.TrimSpace(string(b))
			tok, err := os.ReadFile(filepath.Join(a.dir, "api.token"))
			if err != nil {
				a.t.Fatalf("the agent keeps no api.token: %v", err)
			}
			a.token = strings.TrimSpace(string(tok))
			apiTokens.Store(strings.TrimPrefix(a.url, "http://"), a.token)
			return
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("agent did not come up:\n%s", a.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// syncBuffer is a bytes.Buffer safe for the exec copier and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (a *standaloneAgent) logText() string { return a.log.String() }

func (a *standaloneAgent) kill() {
	if a.cmd != nil && a.cmd.Process != nil {
		a.cmd.Process.Kill()
		a.cmd.Wait()
	}
}

// killVMs ends every QEMU of this agent's VMs: found by the uuids of its
// data dir in QEMU command lines (-uuid), so a QEMU started by an agent
// killed before it recorded the PID is found too.
func (a *standaloneAgent) killVMs() {
	dirs, _ := os.ReadDir(filepath.Join(a.dir, "vms"))
	want := map[string]bool{}
	for _, d := range dirs {
		want[d.Name()] = true
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile("/proc/" + p.Name() + "/cmdline")
		args := strings.Split(string(b), "\x00")
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "-uuid" && want[args[i+1]] {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
}

type result struct {
	stdout, stderr string
	code           int
}

// cli runs the otherix binary against the agent.
func (a *standaloneAgent) cli(stdin string, args ...string) result {
	a.t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "otherix"), args...)
	if a.ns != nil {
		cmd = a.ns.Command(context.Background(), filepath.Join(binDir, "otherix"), args...)
	}
	cmd.Env = append(os.Environ(), "OTHERIX_URL="+a.url, "OTHERIX_TOKEN="+a.token, "OTHERIX_POLL_INTERVAL=200ms")
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		a.t.Fatal(err)
	}
	return result{out.String(), errb.String(), code}
}

// ok runs the CLI and fails the test on a non-zero exit.
func (a *standaloneAgent) ok(args ...string) result {
	a.t.Helper()
	r := a.cli("", args...)
	if r.code != 0 {
		a.t.Fatalf("otherix %s: exit %d\nstdout: %s\nstderr: %s\nagent log tail: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr, tail(a.log.String(), 3000))
	}
	return r
}

// fails runs the CLI, wants exit code and stderr containing want.
func (a *standaloneAgent) fails(code int, want string, args ...string) result {
	a.t.Helper()
	r := a.cli("", args...)
	if r.code != code || !strings.Contains(r.stderr, want) {
		a.t.Fatalf("otherix %s: exit %d, stderr %q; want exit %d and %q", strings.Join(args, " "), r.code, r.stderr, code, want)
	}
	return r
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func (a *standaloneAgent) getVM(name string) api.VM {
	a.t.Helper()
	var v api.VM
	if err := json.Unmarshal([]byte(a.ok("vm", "get", name, "-o", "json").stdout), &v); err != nil {
		a.t.Fatal(err)
	}
	return v
}

func (a *standaloneAgent) console(name string) *testguest.Console {
	v := a.getVM(name)
	return testguest.OpenConsole(filepath.Join(a.dir, "vms", v.UUID, "console.log"))
}

func waitConsole(t testing.TB, c *testguest.Console, substr string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	line, err := c.WaitFor(ctx, substr)
	if err != nil {
		t.Fatalf("console: waiting for %q: %v\n%s", substr, err, c.Text())
	}
	return line
}

// TestCLILifecycle drives one VM through every command of seed 004 with
// the CLI binary against the standalone agent.
func TestCLILifecycle(t *testing.T) {
	t.Parallel()
	a := startAgent(t, "")
	ud := filepath.Join(t.TempDir(), "user-data.yaml")
	os.WriteFile(ud, []byte("#cloud-config\n#otherix-run: echo cli-e2e-$(hostname)\n"), 0o600)

	r := a.ok("vm", "create", "web-1", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--user-data", ud, "--wait")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "created task=") || !strings.HasSuffix(lines[0], " status=pending") || !strings.HasPrefix(lines[1], "vm running task=") {
		t.Fatalf("create --wait stdout:\n%s", r.stdout)
	}
	if !strings.Contains(r.stderr, ".") {
		t.Errorf("create --wait printed no dot on stderr: %q", r.stderr)
	}
	con := a.console("web-1")
	waitConsole(t, con, "OTHERIX-GUEST cidata files=meta-data,user-data")
	waitConsole(t, con, "cli-e2e-web-1")

	// list, in every format
	r = a.ok("vm", "list")
	if !strings.Contains(r.stdout, "NAME") || !regexpLine(r.stdout, `^web-1\s+running\s+amd64\s+node-1\s+default\s+-$`) {
		t.Fatalf("vm list:\n%s", r.stdout)
	}
	r = a.ok("vm", "list", "--show-ids")
	v := a.getVM("web-1")
	if !strings.Contains(r.stdout, v.UUID) {
		t.Fatalf("vm list --show-ids has no uuid:\n%s", r.stdout)
	}
	r = a.ok("vm", "list", "-o", "json")
	if !strings.Contains(r.stdout, `"name": "web-1"`) && !strings.Contains(r.stdout, `"name":"web-1"`) {
		t.Fatalf("vm list -o json:\n%s", r.stdout)
	}
	r = a.ok("vm", "list", "-o", "yaml")
	if !strings.Contains(r.stdout, "name: web-1") {
		t.Fatalf("vm list -o yaml:\n%s", r.stdout)
	}
	r = a.ok("vm", "get", "web-1")
	if !strings.Contains(r.stdout, "status: running") || !strings.Contains(r.stdout, fmt.Sprintf("qemu_pid: %d", v.QEMUPID)) {
		t.Fatalf("vm get:\n%s", r.stdout)
	}
	if v.Status != "running" || v.VCPUs != 1 || v.MemoryMB != 256 || v.Pool != "default" || v.Node != "node-1" || v.ImageURL != a.image || len(v.ImageSHA256) != 64 || v.QEMUPID == 0 || v.LastTask == nil || v.CreatedAt.IsZero() {
		t.Fatalf("vm view: %+v", v)
	}

	// Metrics move during the VM's life.
	before := scrape(t, a.url)
	if before[`otherix_agent_vms{status="running"}`] != 1 || before[`otherix_agent_tasks_total{outcome="success",type="vm.create"}`] != 1 {
		t.Errorf("metrics after create: vms running %v, creates %v", before[`otherix_agent_vms{status="running"}`], before[`otherix_agent_tasks_total{outcome="success",type="vm.create"}`])
	}

	// sync ops: pause, pause again (409), resume, reset
	r = a.ok("vm", "pause", "web-1")
	if strings.TrimSpace(r.stdout) != "vm web-1 status=paused" {
		t.Fatalf("pause: %q", r.stdout)
	}
	a.fails(1, "conflict", "vm", "pause", "web-1")
	a.ok("vm", "resume", "web-1")
	a.fails(1, "conflict", "vm", "resume", "web-1")
	r = a.ok("vm", "reset", "web-1", "-o", "json")
	var rv api.VM
	json.Unmarshal([]byte(r.stdout), &rv)
	if rv.QEMUPID != v.QEMUPID {
		t.Fatalf("reset changed the pid: %d -> %d", v.QEMUPID, rv.QEMUPID)
	}
	waitConsole(t, con, "OTHERIX-GUEST booted")
	waitConsole(t, con, "OTHERIX-GUEST ready")

	after := scrape(t, a.url)
	for _, series := range []string{`otherix_agent_qmp_command_duration_seconds_count{command="stop"}`, `otherix_agent_tasks_total{outcome="success",type="vm.pause"}`, `otherix_agent_tasks_total{outcome="success",type="vm.resume"}`} {
		if after[series] <= before[series] {
			t.Errorf("%s did not move: %v -> %v", series, before[series], after[series])
		}
	}
	if after[`otherix_agent_control_plane_request_duration_seconds_count{path="/v1/agent/heartbeat"}`] == 0 {
		t.Errorf("no heartbeat observed in metrics")
	}

	// async ops without --wait print "<op> task=<id> status=<status>"
	r = a.ok("vm", "stop", "web-1")
	if !regexpLine(r.stdout, `^stop task=[0-9a-f-]{36} status=(pending|running)$`) {
		t.Fatalf("stop without --wait: %q", r.stdout)
	}
	waitConsole(t, con, "OTHERIX-GUEST powering off")
	r = a.ok("vm", "start", "web-1", "--wait")
	if !strings.Contains(r.stdout, "vm running task=") {
		t.Fatalf("start --wait: %q", r.stdout)
	}
	pid := a.getVM("web-1").QEMUPID
	waitConsole(t, con, "OTHERIX-GUEST ready")
	a.ok("vm", "reboot", "web-1", "--wait")
	if np := a.getVM("web-1").QEMUPID; np == pid || np == 0 {
		t.Fatalf("reboot kept pid %d (now %d)", pid, np)
	}
	waitConsole(t, con, "OTHERIX-GUEST ready")
	r = a.ok("vm", "stop", "web-1", "--force", "--wait")
	if !strings.Contains(r.stdout, "vm stopped task=") {
		t.Fatalf("stop --force --wait: %q", r.stdout)
	}
	if v := a.getVM("web-1"); v.Status != "stopped" || v.StatusReason != "powered off" {
		t.Fatalf("after stop --force: %+v", v)
	}
	// A stopped VM cannot be stopped again: the task fails with conflict.
	a.fails(1, "failed: conflict:", "vm", "poweroff", "web-1", "--wait")

	// console over the API
	r = a.ok("vm", "console", "web-1")
	if !strings.Contains(r.stdout, "OTHERIX-GUEST booted") {
		t.Fatalf("vm console: %q", tail(r.stdout, 500))
	}

	// delete asks for confirmation and fails cleanly with no terminal
	a.fails(1, "confirmation", "vm", "delete", "web-1")
	r = a.ok("vm", "delete", "web-1", "--force", "--wait")
	if !strings.Contains(r.stdout, "vm deleted task=") {
		t.Fatalf("delete: %q", r.stdout)
	}
	if _, err := os.Stat(filepath.Join(a.dir, "vms", v.UUID)); !os.IsNotExist(err) {
		t.Fatalf("vm state left after delete: %v", err)
	}
	if m, _ := filepath.Glob(filepath.Join(a.dir, "pools", "default", "vms", "*")); len(m) != 0 {
		t.Fatalf("vm disks left after delete: %v", m)
	}
	a.fails(1, "not_found", "vm", "get", "web-1")
}

func regexpLine(text, re string) bool {
	for _, l := range strings.Split(text, "\n") {
		if ok, _ := matchRE(re, strings.TrimRight(l, " ")); ok {
			return true
		}
	}
	return false
}
