package runner_test

import (
	"net"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
	"github.com/otherix/otherix-agent/agent/runner"
)

// Backoff after failures grows with jitter up to RetryMax, honours
// Retry-After, and never spins: over ten minutes of a failing control
// plane the agent makes a bounded number of requests.
func TestBackoffWithJitterNoBusyLoop(t *testing.T) {
	clk := newFakeClock()
	h := newHarness(t, runner.Config{Clock: clk, RetryBase: time.Second, RetryMax: 60 * time.Second})
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Register, Kind: cptest.FaultStatus, Status: 503})
	h.start()

	var waits []time.Duration
	var elapsed time.Duration
	for elapsed < 10*time.Minute {
		ds := clk.waitTimers(t, h.ctx, 1)
		if len(ds) != 1 {
			t.Fatalf("%d timers while registering, want 1", len(ds))
		}
		waits = append(waits, ds[0])
		elapsed += clk.advanceToNext()
	}
	clk.waitTimers(t, h.ctx, 1) // the request after the last wait was made
	if got := h.cp.Count(cptest.Register); got != len(waits)+1 {
		t.Errorf("%d register requests for %d waits", got, len(waits))
	}
	distinct := map[float64]bool{}
	for i, w := range waits {
		d := min(time.Second<<i, 60*time.Second)
		if w < d/2 || w >= d {
			t.Errorf("wait %d = %v, want in [%v, %v)", i, w, d/2, d)
		}
		distinct[float64(w)/float64(d)] = true
	}
	if len(distinct) < len(waits)/2 {
		t.Errorf("waits %v show no jitter", waits)
	}
	// A busy loop would make thousands; doubling to 60s gives ~20.
	if n := h.cp.Count(cptest.Register); n > 30 {
		t.Errorf("%d register requests in %v", n, elapsed)
	}
	t.Logf("register requests over %v of 503s: %d; waits %v", elapsed.Round(time.Second), h.cp.Count(cptest.Register), waits)

	// 429 with Retry-After: the agent waits at least that long.
	h.cp.ClearFaults()
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Register, Kind: cptest.FaultStatus, Status: 429, RetryAfter: "120", Times: 1})
	clk.advanceToNext()
	if ds := clk.waitTimers(t, h.ctx, 1); ds[0] != 120*time.Second {
		t.Errorf("wait after 429 Retry-After: 120 = %v", ds[0])
	}

	// Registered, then leases drop and heartbeats fail: both loops back
	// off on their own, heartbeats clamped to the interval.
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Lease, Kind: cptest.FaultDrop})
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Heartbeat, Kind: cptest.FaultStatus, Status: 503})
	clk.advanceToNext()
	if err := h.cp.WaitCount(h.ctx, cptest.Register, len(waits)+2); err != nil {
		t.Fatal(err)
	}
	elapsed = 0
	for elapsed < 10*time.Minute {
		clk.waitTimers(t, h.ctx, 2)
		elapsed += clk.advanceToNext()
	}
	clk.waitTimers(t, h.ctx, 2)
	leases, beats := h.cp.Count(cptest.Lease), h.cp.Count(cptest.Heartbeat)
	t.Logf("over %v of failures: %d lease, %d heartbeat requests", elapsed.Round(time.Second), leases, beats)
	if leases > 30 || beats > 75 {
		t.Errorf("%d lease and %d heartbeat requests in %v", leases, beats, elapsed)
	}
	if h.r.Connected() {
		t.Error("Connected() while every request fails")
	}
	if !h.r.Healthy() {
		t.Error("unhealthy while merely unable to reach the control plane")
	}

	// Back: the next attempt of each loop succeeds.
	h.cp.ClearFaults()
	clk.advance(time.Minute)
	clk.waitTimers(t, h.ctx, 1) // the heartbeat loop's next wait: its answer is in
	if len(h.cp.Heartbeats()) != 1 || h.r.LastHeartbeat().IsZero() {
		t.Error("no heartbeat acknowledged")
	}
	if !h.r.Connected() {
		t.Error("not Connected() after a successful heartbeat")
	}
}

// The first request waits a random part of InitialStagger.
func TestInitialStagger(t *testing.T) {
	clk := newFakeClock()
	h := newHarness(t, runner.Config{Clock: clk, InitialStagger: 10 * time.Second})
	h.start()
	ds := clk.waitTimers(t, h.ctx, 1)
	if ds[0] < 0 || ds[0] >= 10*time.Second {
		t.Fatalf("stagger %v, want in [0, 10s)", ds[0])
	}
	if n := h.cp.TotalCount(); n != 0 {
		t.Fatalf("%d requests before the stagger ended", n)
	}
	if !h.r.Healthy() {
		t.Error("unhealthy while staggering")
	}
	clk.advance(ds[0])
	h.waitCP("the registration", func() bool { return len(h.cp.Registrations()) == 1 })
	reg := h.cp.Registrations()[0]
	if reg.ProtocolVersion != 1 || reg.Node.Name != "node-1" || reg.Node.QEMUVersion == "" || len(reg.Node.Pools) != 1 || len(reg.Node.Firmwares) == 0 {
		t.Errorf("registration: %+v", reg)
	}
}

// With the control plane unreachable, then failing, the agent leaves the
// VMs alone, queues the outcome and delivers it exactly once when the
// control plane answers again.
func TestOutcomesDeliveredWhenControlPlaneIsBack(t *testing.T) {
	h := newHarness(t, runner.Config{RetryBase: 2 * time.Millisecond, RetryMax: 20 * time.Millisecond},
		vm("a", "ua", api.StatusStopped), vm("other", "uo", api.StatusRunning))
	h.ts.Close() // nothing listens at first
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	h.url = "http://" + addr
	h.start()

	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port %s taken meanwhile: %v", addr, err)
	}
	ts := httptest.NewUnstartedServer(h.cp)
	ts.Listener = ln
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Lease, Kind: cptest.FaultStatus, Status: 502, Times: 1})
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Complete, Kind: cptest.FaultStatus, Status: 503, Times: 2})
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Complete, Kind: cptest.FaultDrop, Times: 1})
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Complete, Kind: cptest.FaultStatus, Status: 429, Times: 1})
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Complete, Kind: cptest.FaultDelay, Delay: 20 * time.Millisecond, Times: 1})
	h.enqueue("t1", api.TaskStart, "a", "ua")
	ts.Start()
	defer ts.Close()

	c := h.waitCompletion("t1")
	if c.Status != api.TaskSuccess || c.Duplicate {
		t.Errorf("completion: %+v", c)
	}
	if n := h.cp.Count(cptest.Complete); n != 5 {
		t.Errorf("%d completion requests, want 5 (4 failures, 1 slow success)", n)
	}
	if n := len(h.cp.CompletionsOf("t1")); n != 1 {
		t.Errorf("%d completions accepted, want 1", n)
	}
	if calls := h.ex.allCalls(); len(calls) != 1 {
		t.Errorf("executor calls %v, want only t1", calls)
	}
	if vm, _ := h.inv.get("uo"); vm.Status != api.StatusRunning {
		t.Errorf("untouched VM is %s", vm.Status)
	}
	h.shutdown() // before ts.Close, which waits for the long poll
}
