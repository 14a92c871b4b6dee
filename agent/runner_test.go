package agent

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
	"github.com/otherix/otherix-agent/agent/runner"
	"github.com/otherix/otherix-agent/agent/testguest"
)

// TestControlPlaneRealEngine runs the agent's runner against the fake
// control plane with the real Host, engine and QEMU: a create delivered
// twice and with its lease expiring mid-work runs once; a duplicated pause
// is not executed again; a QEMU killed behind the agent's back is started
// again because the control plane wants it running; a VM the control plane
// does not know is reported as an orphan and left alone; shutting the
// runner down leaves VMs running.
func TestControlPlaneRealEngine(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	rr := startRunner(t, hh, runner.Config{LeaseWait: 2 * time.Second, RestartBase: time.Second, RetryBase: 100 * time.Millisecond})
	cp := rr.cp
	wctx, wcancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer wcancel()

	// vm.create, duplicated, with its lease expired while it works.
	id := uuid.NewString()
	spec, _ := json.Marshal(api.CreateVM{Name: "cp-1", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256})
	cp.SetDesired(id, api.PhaseRunning)
	cp.Enqueue(protocol.Task{ID: "t-create", Type: api.TaskCreate, VMName: "cp-1", VMUUID: id, Spec: spec})
	cp.Duplicate("t-create")
	if err := cp.WaitFor(wctx, func() bool { return cp.Leased("t-create") }); err != nil {
		t.Fatal(err)
	}
	cp.Expire("t-create")
	c, err := cp.WaitCompletion(wctx, "t-create")
	if err != nil {
		t.Fatal(err)
	}
	if c.Status != api.TaskSuccess || c.VM == nil || c.VM.Status != api.StatusRunning || c.VM.UUID != id {
		t.Fatalf("create completion: %+v %+v", c, c.Error)
	}
	pid := c.VM.QEMUPID
	if n := len(hh.h.Engine().List()); n != 1 {
		t.Fatalf("%d VMs after a duplicated create", n)
	}
	if p := progressPhases(cp.ProgressOf("t-create")); !slices.Contains(p, "download") && !slices.Contains(p, "boot") {
		t.Logf("progress phases reported: %v", p)
	}

	// A duplicated pause runs once: a second execution would be a conflict.
	cp.Enqueue(protocol.Task{ID: "t-pause", Type: api.TaskPause, VMName: "cp-1", VMUUID: id})
	cp.Duplicate("t-pause")
	c, err = cp.WaitCompletion(wctx, "t-pause")
	if err != nil || c.Status != api.TaskSuccess {
		t.Fatalf("pause: %+v %v", c, err)
	}
	if err := cp.WaitFor(wctx, func() bool { return cp.Deliveries("t-pause") >= 2 }); err != nil {
		t.Fatal(err)
	}
	for _, c := range cp.CompletionsOf("t-pause") {
		if c.Status != api.TaskSuccess {
			t.Fatalf("a redelivered pause was executed again: %+v", c.Error)
		}
	}
	cp.Enqueue(protocol.Task{ID: "t-resume", Type: api.TaskResume, VMName: "cp-1", VMUUID: id})
	if c, err := cp.WaitCompletion(wctx, "t-resume"); err != nil || c.Status != api.TaskSuccess {
		t.Fatalf("resume: %+v %v", c, err)
	}

	// Reconcile: QEMU killed behind the agent's back is started again.
	syscall.Kill(pid, syscall.SIGKILL)
	if err := cp.WaitFor(wctx, func() bool {
		v, err := hh.h.VM("cp-1")
		return err == nil && v.Status == api.StatusRunning && v.QEMUPID != pid && v.QEMUPID != 0
	}); err != nil {
		v, _ := hh.h.VM("cp-1")
		t.Fatalf("crashed VM not restarted: %+v", v)
	}

	// An orphan: a VM the control plane does not know, reported, untouched.
	orphan := uuid.NewString()
	if _, err := hh.h.Create(wctx, orphan, api.CreateVM{Name: "stray", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, NoCloudInit: true}, nil, nil); err != nil {
		t.Fatal(err)
	}
	hb, err := cp.WaitHeartbeat(wctx, func(h protocol.HeartbeatRequest) bool { return slices.Contains(h.Orphans, orphan) })
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(hb.Orphans, id) {
		t.Fatalf("known VM reported as orphan: %v", hb.Orphans)
	}
	if v, err := hh.h.VM("stray"); err != nil || v.Status != api.StatusRunning {
		t.Fatalf("orphan touched: %+v %v", v, err)
	}

	// Shutdown: the runner returns, VMs keep running.
	v, _ := hh.h.VM("cp-1")
	if !rr.stop() {
		t.Fatal("runner did not shut down")
	}
	if err := syscall.Kill(v.QEMUPID, 0); err != nil {
		t.Fatalf("qemu died with the runner: %v", err)
	}
}

// TestGuestRebootReachesControlPlane: a guest that reboots itself keeps
// its QEMU and its desired phase; the control plane learns the reboot as
// one guest_reboot event in a heartbeat, sees the VM running in the same
// process, and reconcile, with the VM desired running, starts nothing.
func TestGuestRebootReachesControlPlane(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	rr := startRunner(t, hh, runner.Config{})
	cp := rr.cp
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	id := uuid.NewString()
	spec, _ := json.Marshal(api.CreateVM{Name: "rb-1", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		UserData: "#cloud-config\n#otherix-run: " + testguest.RebootOnce + "\n"})
	cp.SetDesired(id, api.PhaseRunning)
	cp.Enqueue(protocol.Task{ID: "t-create", Type: api.TaskCreate, VMName: "rb-1", VMUUID: id, Spec: spec})
	c, err := cp.WaitCompletion(ctx, "t-create")
	if err != nil {
		t.Fatal(err)
	}
	if c.Status != api.TaskSuccess || c.VM == nil || c.VM.QEMUPID == 0 {
		t.Fatalf("create: %+v", c)
	}
	pid := c.VM.QEMUPID
	con := hh.console("rb-1")
	defer con.Close()
	wait(t, con, "OTHERIX-GUEST rebooting itself")
	wait(t, con, "OTHERIX-GUEST run-exit 1 0") // up again
	guestReboot := func(h protocol.HeartbeatRequest) bool {
		return slices.ContainsFunc(h.Events, func(e api.VMEvent) bool { return e.VMUUID == id && e.Type == api.EventGuestReboot })
	}
	if _, err := cp.WaitHeartbeat(ctx, guestReboot); err != nil {
		t.Fatalf("no heartbeat carried the guest_reboot: %v", err)
	}
	// Three heartbeats (1 s apart) later, with the VM desired running:
	// still the same QEMU, nothing started, one reboot told.
	n := cp.Count(cptest.Heartbeat)
	if err := cp.WaitFor(ctx, func() bool { return cp.Count(cptest.Heartbeat) >= n+3 }); err != nil {
		t.Fatal(err)
	}
	hbs := cp.Heartbeats()
	var last *protocol.VMStatus
	for i, v := range hbs[len(hbs)-1].VMs {
		if v.UUID == id {
			last = &hbs[len(hbs)-1].VMs[i]
		}
	}
	if last == nil || last.Status != api.StatusRunning || last.QEMUPID != pid || last.DesiredPhase != api.PhaseRunning || last.RestartCount != 0 {
		t.Errorf("last heartbeat's VM %+v, want running in QEMU %d, desired running, no restart", last, pid)
	}
	var types []string
	seen := map[int64]bool{} // an event unacknowledged by a failed heartbeat comes again
	for _, h := range hbs {
		for _, e := range h.Events {
			if e.VMUUID == id && !seen[e.Seq] {
				seen[e.Seq] = true
				types = append(types, e.Type)
			}
		}
	}
	if strings.Join(types, " ") != "created guest_reboot" {
		t.Errorf("events the control plane received for the VM: %v, want created, guest_reboot", types)
	}
	if got := len(cp.Completions()); got != 1 {
		t.Errorf("%d task completions, want the create's only: %+v", got, cp.Completions())
	}
}

// cpRunner is the agent's runner heartbeating a test Host to a cptest
// control plane over real HTTP, as the daemon wires them.
type cpRunner struct {
	cp *cptest.Server
	// stop cancels the runner and reports whether it returned within a
	// minute; the test's cleanup calls it too.
	stop func() bool
}

// startRunner starts a runner for hh's Host with rc (InitialStagger off,
// the test's logger at warn level unless rc sets one), against a new
// cptest.Server whose heartbeat interval is 1 s.
func startRunner(t *testing.T, hh *hostHarness, rc runner.Config) *cpRunner {
	t.Helper()
	cp := &cptest.Server{Token: "s3cret", HeartbeatInterval: time.Second}
	srv := httptest.NewServer(cp)
	t.Cleanup(srv.Close)
	tok := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tok, []byte("s3cret\n"), 0o600)
	client, err := protocol.NewClient(protocol.ClientConfig{BaseURL: srv.URL, Node: "node-1", TokenFile: tok})
	if err != nil {
		t.Fatal(err)
	}
	j, err := journal.Open(filepath.Join(hh.cfg.DataDir, "journal"), journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	rc.InitialStagger = -1
	if rc.Logger == nil {
		rc.Logger = zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	}
	r := runner.New(client, j, hh.h, hh.h, rc)
	ctx, cancel := context.WithCancel(context.Background())
	finished := make(chan struct{})
	go func() { r.Run(ctx); close(finished) }()
	stop := func() bool {
		cancel()
		select {
		case <-finished:
			return true
		case <-time.After(time.Minute):
			return false
		}
	}
	// Stop the runner before the host's cleanup kills the VMs, even when
	// the test fails half-way: a live runner would reconcile them back.
	t.Cleanup(func() {
		if stop() {
			j.Close()
		}
	})
	return &cpRunner{cp: cp, stop: stop}
}

func progressPhases(ps []cptest.ProgressReport) []string {
	var out []string
	for _, p := range ps {
		if p.Progress != nil {
			out = append(out, p.Progress.Phase)
		}
	}
	return out
}
