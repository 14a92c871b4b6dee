package runner_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
	"github.com/otherix/otherix-agent/agent/runner"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// fakeClock is a Clock whose time moves only when the test says so. Tests
// wait for the runner to block on a timer, then advance.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	timers  []*fakeTimer
	changed chan struct{}
}

type fakeTimer struct {
	c  *fakeClock
	at time.Time
	d  time.Duration
	ch chan time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC), changed: make(chan struct{})}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTimer(d time.Duration) runner.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, at: c.now.Add(d), d: d, ch: make(chan time.Time, 1)}
	if d <= 0 {
		t.ch <- c.now
		return t
	}
	c.timers = append(c.timers, t)
	c.notify()
	return t
}

func (t *fakeTimer) C() <-chan time.Time { return t.ch }

func (t *fakeTimer) Stop() bool {
	c := t.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.timers {
		if x == t {
			c.timers = append(c.timers[:i], c.timers[i+1:]...)
			c.notify()
			return true
		}
	}
	return false
}

func (c *fakeClock) notify() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// waitTimers blocks until at least n timers are pending and returns the
// durations they were made with, earliest deadline first.
func (c *fakeClock) waitTimers(t *testing.T, ctx context.Context, n int) []time.Duration {
	t.Helper()
	for {
		c.mu.Lock()
		ch := c.changed
		if len(c.timers) >= n {
			ts := append([]*fakeTimer(nil), c.timers...)
			c.mu.Unlock()
			sort.Slice(ts, func(a, b int) bool { return ts[a].at.Before(ts[b].at) })
			var ds []time.Duration
			for _, x := range ts {
				ds = append(ds, x.d)
			}
			return ds
		}
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatalf("waiting for %d timers: %v", n, ctx.Err())
		}
	}
}

// next returns the deadline of the earliest pending timer (zero if none).
func (c *fakeClock) next() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	var next time.Time
	for _, t := range c.timers {
		if next.IsZero() || t.at.Before(next) {
			next = t.at
		}
	}
	return next
}

// advanceToNext jumps to the earliest pending timer, fires every timer due
// then, and returns the jump.
func (c *fakeClock) advanceToNext() time.Duration {
	c.mu.Lock()
	var next time.Time
	for _, t := range c.timers {
		if next.IsZero() || t.at.Before(next) {
			next = t.at
		}
	}
	c.mu.Unlock()
	if next.IsZero() {
		return 0
	}
	d := next.Sub(c.Now())
	c.advance(d)
	return d
}

// advance moves time on by d and fires the timers due.
func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.timers[:0]
	for _, t := range c.timers {
		if !t.at.After(c.now) {
			t.ch <- c.now
		} else {
			kept = append(kept, t)
		}
	}
	c.timers = kept
	c.notify()
}

// call is one Execute call.
type call struct {
	task       protocol.Task
	start, end int   // event sequence numbers; end 0 while running
	ctxErr     error // the ctx's error when Execute returned
	cause      error // and its cause
}

// fakeExec is an Executor over a fakeInv. A task whose id was blocked
// waits until released (or its ctx ends); hooks override the effect.
type fakeExec struct {
	inv *fakeInv

	mu        sync.Mutex
	seq       int
	calls     []*call
	gates     map[string]chan struct{}
	running   int
	creates   int
	maxCreate int
	hook      func(ctx context.Context, t protocol.Task, progress func(api.Progress)) (*api.VM, error, bool)
	changed   chan struct{}
}

func newFakeExec(inv *fakeInv) *fakeExec {
	return &fakeExec{inv: inv, gates: map[string]chan struct{}{}, changed: make(chan struct{})}
}

func (x *fakeExec) notify() {
	close(x.changed)
	x.changed = make(chan struct{})
}

func (x *fakeExec) block(ids ...string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, id := range ids {
		x.gates[id] = make(chan struct{})
	}
}

func (x *fakeExec) release(id string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	close(x.gates[id])
}

func (x *fakeExec) Execute(ctx context.Context, t protocol.Task, progress func(api.Progress)) (protocol.Result, error) {
	vm, err := x.execute(ctx, t, progress)
	return protocol.Result{VM: vm}, err
}

func (x *fakeExec) execute(ctx context.Context, t protocol.Task, progress func(api.Progress)) (*api.VM, error) {
	x.mu.Lock()
	x.seq++
	c := &call{task: t, start: x.seq}
	x.calls = append(x.calls, c)
	x.running++
	if t.Type == api.TaskCreate {
		x.creates++
		x.maxCreate = max(x.maxCreate, x.creates)
	}
	gate := x.gates[t.ID]
	hook := x.hook
	x.notify()
	x.mu.Unlock()

	defer func() {
		x.mu.Lock()
		x.seq++
		c.end = x.seq
		c.ctxErr, c.cause = ctx.Err(), context.Cause(ctx)
		x.running--
		if t.Type == api.TaskCreate {
			x.creates--
		}
		x.notify()
		x.mu.Unlock()
	}()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, errcode.Wrap(errcode.Cancelled, context.Cause(ctx), "interrupted")
		}
	}
	if hook != nil {
		if vm, err, done := hook(ctx, t, progress); done {
			return vm, err
		}
	}
	return x.inv.apply(t)
}

// callsOf returns the calls for one task id.
func (x *fakeExec) callsOf(id string) []call {
	x.mu.Lock()
	defer x.mu.Unlock()
	var out []call
	for _, c := range x.calls {
		if c.task.ID == id {
			out = append(out, *c)
		}
	}
	return out
}

func (x *fakeExec) allCalls() []call {
	x.mu.Lock()
	defer x.mu.Unlock()
	var out []call
	for _, c := range x.calls {
		out = append(out, *c)
	}
	return out
}

func (x *fakeExec) waitFor(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for {
		x.mu.Lock()
		ch := x.changed
		x.mu.Unlock()
		if cond() {
			return
		}
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		}
	}
}

func (x *fakeExec) waitStarted(t *testing.T, ctx context.Context, id string) {
	t.Helper()
	x.waitFor(t, ctx, id+" to start", func() bool { return len(x.callsOf(id)) > 0 })
}

// fakeInv is the host: its VMs by uuid.
type fakeInv struct {
	mu  sync.Mutex
	vms map[string]api.VM
}

func newFakeInv(vms ...api.VM) *fakeInv {
	inv := &fakeInv{vms: map[string]api.VM{}}
	for _, vm := range vms {
		inv.vms[vm.UUID] = vm
	}
	return inv
}

func (f *fakeInv) Node(ctx context.Context) protocol.NodeInfo {
	return protocol.NodeInfo{
		Name: "node-1", AgentVersion: "test", QEMUVersion: "7.2.0", Arch: "amd64", CPUs: 2, MemoryMB: 24576,
		Pools:     []protocol.PoolInfo{{Name: "default", TotalBytes: 100 << 30, FreeBytes: 60 << 30}},
		Networks:  []protocol.NetworkInfo{{Name: "lan", Bridge: "br0", Type: "bridge"}},
		Arches:    []string{"amd64", "arm64"},
		Firmwares: []string{"bios", "uefi"},
	}
}

func (f *fakeInv) VMs(ctx context.Context) []api.VM {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]api.VM, 0, len(f.vms))
	for _, vm := range f.vms {
		out = append(out, vm)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].UUID < out[b].UUID })
	return out
}

func (f *fakeInv) get(uuid string) (api.VM, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	vm, ok := f.vms[uuid]
	return vm, ok
}

func (f *fakeInv) set(vm api.VM) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.vms[vm.UUID] = vm
}

// apply is what the engine would do.
func (f *fakeInv) apply(t protocol.Task) (*api.VM, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch t.Type {
	case api.TaskImagePull, api.TaskDeleteImage, api.TaskCreateVolume, api.TaskDeleteVolume:
		return nil, nil // on no VM
	}
	vm, ok := f.vms[t.VMUUID]
	if t.Type == api.TaskCreate {
		if ok {
			return nil, errcode.New(errcode.Conflict, "vm %s exists", t.VMName)
		}
		vm = api.VM{Name: t.VMName, UUID: t.VMUUID, Node: "node-1", Pool: "default"}
	} else if !ok {
		return nil, errcode.New(errcode.NotFound, "no vm %s", t.VMName)
	}
	switch t.Type {
	case api.TaskCreate, api.TaskStart, api.TaskResume, api.TaskReboot, api.TaskReset:
		vm.Status = api.StatusRunning
	case api.TaskStop, api.TaskPoweroff:
		vm.Status = api.StatusStopped
	case api.TaskPause:
		vm.Status = api.StatusPaused
	case api.TaskUpdate, api.TaskAttachDisk, api.TaskDetachDisk, api.TaskChangeMedium, api.TaskEjectMedium,
		api.TaskAddForward, api.TaskRemoveForward, api.TaskScreenshot, api.TaskConsoleTail:
		// a change (or a read) that keeps the VM's status
	case api.TaskDelete:
		delete(f.vms, t.VMUUID)
		return nil, nil
	default:
		return nil, errcode.New(errcode.ValidationFailed, "unknown task type %q", t.Type)
	}
	vm.LastTask = &api.TaskRef{ID: t.ID, Type: t.Type, Status: api.TaskSuccess}
	f.vms[t.VMUUID] = vm
	return &vm, nil
}

// harness wires a runner to a cptest control plane over loopback HTTP.
type harness struct {
	t    *testing.T
	ctx  context.Context
	cp   *cptest.Server
	ts   *httptest.Server
	url  string // overrides ts.URL
	dir  string
	j    *journal.Journal
	inv  *fakeInv
	ex   *fakeExec
	cfg  runner.Config
	r    *runner.Runner
	stop context.CancelFunc
	done chan error
}

const testToken = "test-token"

func newHarness(t *testing.T, cfg runner.Config, vms ...api.VM) *harness {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	h := &harness{t: t, ctx: ctx, cp: &cptest.Server{Token: testToken}, dir: filepath.Join(t.TempDir(), "journal"), inv: newFakeInv(vms...)}
	h.ex = newFakeExec(h.inv)
	h.ts = httptest.NewServer(h.cp)
	t.Cleanup(h.ts.Close)
	if cfg.InitialStagger == 0 {
		cfg.InitialStagger = -1
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.New(rand.NewPCG(1, 2))
	}
	if cfg.Logger == nil {
		cfg.Logger = zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	}
	h.cfg = cfg
	return h
}

func (h *harness) client() *protocol.Client {
	h.t.Helper()
	p := filepath.Join(h.t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(testToken), 0o600); err != nil {
		h.t.Fatal(err)
	}
	url := h.url
	if url == "" {
		url = h.ts.URL
	}
	c, err := protocol.NewClient(protocol.ClientConfig{BaseURL: url, Node: "node-1", TokenFile: p, AgentVersion: "test", Timeout: 10 * time.Second})
	if err != nil {
		h.t.Fatal(err)
	}
	return c
}

// start opens the journal and runs a runner.
func (h *harness) start() {
	h.t.Helper()
	j, err := journal.Open(h.dir, journal.Options{})
	if err != nil {
		h.t.Fatal(err)
	}
	h.j = j
	h.r = runner.New(h.client(), j, h.ex, h.inv, h.cfg)
	ctx, cancel := context.WithCancel(h.ctx)
	h.stop = cancel
	h.done = make(chan error, 1)
	go func() { h.done <- h.r.Run(ctx) }()
	h.t.Cleanup(func() {
		if h.stop != nil {
			h.shutdown()
		}
	})
}

// shutdown cancels Run, waits for its drain and closes the journal.
func (h *harness) shutdown() {
	h.t.Helper()
	h.stop()
	h.stop = nil
	select {
	case err := <-h.done:
		if err != nil {
			h.t.Errorf("Run: %v", err)
		}
	case <-h.ctx.Done():
		h.t.Fatal("Run did not return")
	}
	h.j.Close()
}

func (h *harness) enqueue(id, typ, vmName, vmUUID string) {
	h.cp.Enqueue(protocol.Task{ID: id, Type: typ, VMName: vmName, VMUUID: vmUUID})
}

func (h *harness) waitCompletion(id string) cptest.Completion {
	h.t.Helper()
	c, err := h.cp.WaitCompletion(h.ctx, id)
	if err != nil {
		h.t.Fatalf("completion of %s: %v", id, err)
	}
	return c
}

func (h *harness) waitCP(what string, cond func() bool) {
	h.t.Helper()
	if err := h.cp.WaitFor(h.ctx, cond); err != nil {
		h.t.Fatalf("waiting for %s: %v", what, err)
	}
}

func vm(name, uuid, status string) api.VM {
	return api.VM{Name: name, UUID: uuid, Status: status, Node: "node-1", Pool: "default"}
}

func describe(cs []cptest.Completion) string {
	s := ""
	for _, c := range cs {
		s += fmt.Sprintf("[%s %s lease=%s dup=%v] ", c.TaskID, c.Status, c.LeaseID, c.Duplicate)
	}
	return s
}
