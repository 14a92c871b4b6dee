package runner_test

// The points of docs/protocol.md a control plane author must be able to
// count on, each held here: the retry schedule, the load of an outage,
// orphans, the progress cadence and the smallest lease, what `attempt`
// names, and malformed answers.

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
	"github.com/otherix/otherix-agent/agent/runner"
)

// "Retry with backoff" and "retry slowly" are one schedule: the n-th
// consecutive failed or refused request (n = 0 first) waits a random time
// in [d/2, d), d = min(60 s, 1 s·2ⁿ); a Retry-After, on any status, is
// waited at least, up to 10 min.
func TestRetrySchedule(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault cptest.Fault
	}{
		{"dropped connection", cptest.Fault{Kind: cptest.FaultDrop}},
		{"503", cptest.Fault{Kind: cptest.FaultStatus, Status: 503}},
		{"401", cptest.Fault{Kind: cptest.FaultStatus, Status: 401}},
		{"403", cptest.Fault{Kind: cptest.FaultStatus, Status: 403}},
		{"400", cptest.Fault{Kind: cptest.FaultStatus, Status: 400}},
		{"malformed 2xx", cptest.Fault{Kind: cptest.FaultBody, Body: []byte("<html>")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock()
			h := newHarness(t, runner.Config{Clock: clk})
			f := tc.fault
			f.Endpoint = cptest.Register
			h.cp.AddFault(f)
			h.start()
			var waits []time.Duration
			for n := range 9 {
				w := clk.waitTimers(t, h.ctx, 1)[0]
				waits = append(waits, w)
				if d := min(time.Second<<n, time.Minute); w < d/2 || w >= d {
					t.Errorf("wait after failure %d: %v, want in [%v, %v)", n, w, d/2, d)
				}
				clk.advanceToNext()
			}
			t.Logf("waits: %v", waits)
			if tc.fault.Kind != cptest.FaultStatus {
				return
			}
			clk.waitTimers(t, h.ctx, 1) // the last request made, its wait begun
			h.cp.ClearFaults()
			for _, ra := range []struct {
				header string
				want   time.Duration
			}{{"120", 2 * time.Minute}, {"3600", 10 * time.Minute}} {
				f.RetryAfter, f.Times = ra.header, 1
				h.cp.AddFault(f)
				clk.advanceToNext()
				if w := clk.waitTimers(t, h.ctx, 1)[0]; w != ra.want {
					t.Errorf("wait after a %d with Retry-After: %s = %v, want %v", f.Status, ra.header, w, ra.want)
				}
			}
			clk.advanceToNext()
			h.waitCP("the registration", func() bool { return len(h.cp.Registrations()) == 1 })
		})
	}
}

// During an outage, or while the control plane fails or refuses every
// request, an idle agent's load is its heartbeat rate, not an ever
// shrinking one: one heartbeat per interval (its backoff is clamped to
// the interval), a lease every 30-60 s and, while an outcome waits, a
// completion every 30-60 s. Two ten-minute windows count the same.
func TestOutageLoadIsHeartbeatRate(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault *cptest.Fault // nil: an outage (connections closed)
		// completes: the outcome waits and is retried; a completion
		// refused with another 4xx is dropped instead.
		completes bool
	}{
		{"outage", nil, true},
		{"503", &cptest.Fault{Kind: cptest.FaultStatus, Status: 503}, true},
		{"401", &cptest.Fault{Kind: cptest.FaultStatus, Status: 401}, true},
		{"400", &cptest.Fault{Kind: cptest.FaultStatus, Status: 400}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock()
			// A short long poll: the one in flight when the faults begin
			// ends soon.
			h := newHarness(t, runner.Config{Clock: clk, LeaseWait: time.Second}, vm("a", "ua", api.StatusStopped))
			f := cptest.Fault{Kind: cptest.FaultDrop}
			if tc.fault != nil {
				f = *tc.fault
			}
			f.Endpoint = cptest.Complete
			h.cp.AddFault(f) // the outcome of t1 cannot be delivered
			h.enqueue("t1", api.TaskStart, "a", "ua")
			h.start()
			h.waitCP("a completion attempt", func() bool { return h.cp.Count(cptest.Complete) >= 1 })
			if tc.fault == nil {
				h.cp.SetOutage(true)
			} else {
				f.Endpoint = ""
				h.cp.AddFault(f)
			}
			loops := 2 // heartbeat, lease
			if tc.completes {
				loops++ // and the completion sender
			}
			// run advances the clock by d, one timer at a time, letting
			// every loop make its request, and counts the requests.
			run := func(d time.Duration) (beats, leases, completes int) {
				b0, l0, c0 := h.cp.Count(cptest.Heartbeat), h.cp.Count(cptest.Lease), h.cp.Count(cptest.Complete)
				end := clk.Now().Add(d)
				for {
					clk.waitTimers(t, h.ctx, loops)
					if clk.next().After(end) {
						break
					}
					clk.advanceToNext()
				}
				return h.cp.Count(cptest.Heartbeat) - b0, h.cp.Count(cptest.Lease) - l0, h.cp.Count(cptest.Complete) - c0
			}
			run(3 * time.Minute) // every backoff reaches its cap
			for w := range 2 {
				beats, leases, completes := run(10 * time.Minute)
				t.Logf("window %d: %d heartbeats, %d leases, %d completions in 10 min: %.1f requests/min",
					w, beats, leases, completes, float64(beats+leases+completes)/10)
				if beats != 60 {
					t.Errorf("window %d: %d heartbeats in 10 min, want 60 (one per 10 s interval)", w, beats)
				}
				if leases < 10 || leases > 20 {
					t.Errorf("window %d: %d leases in 10 min, want one every 30-60 s: 10..20", w, leases)
				}
				if want := tc.completes; (completes >= 10 && completes <= 20) != want || (!want && completes != 0) {
					t.Errorf("window %d: %d completions in 10 min (outcome waiting: %v)", w, completes, want)
				}
			}
			if h.r.Connected() {
				t.Error("Connected() while every request fails")
			}
			// Back: a heartbeat within one interval is answered, the
			// waiting outcome delivered within the backoff's cap.
			if tc.fault == nil {
				h.cp.SetOutage(false)
			}
			h.cp.ClearFaults()
			clk.advance(10 * time.Second)
			h.waitCP("a heartbeat answered within the interval", func() bool { return len(h.cp.Heartbeats()) > 0 })
			if tc.completes {
				clk.waitTimers(t, h.ctx, loops)
				clk.advance(time.Minute)
				h.waitCP("the outcome delivered", func() bool { return len(h.cp.CompletionsOf("t1")) == 1 })
			}
		})
	}
}

// A VM whose task the control plane gave after answering the heartbeat
// whose map the agent holds (a vm.create leased just after that answer) is
// not an orphan: that map predates it. The map answering a heartbeat sent
// after the task is the truth again: a VM the control plane then forgets
// is reported.
func TestNoOrphanFromAMapOlderThanItsTask(t *testing.T) {
	clk := newFakeClock()
	h := newHarness(t, runner.Config{Clock: clk}, vm("a", "ua", api.StatusRunning))
	h.cp.SetDesired("ua", api.PhaseRunning)
	h.start()
	h.waitCP("the first heartbeat answered", func() bool { return len(h.cp.Heartbeats()) == 1 })
	// The control plane records VM b and its create after answering.
	h.enqueue("t-create", api.TaskCreate, "b", "ub")
	h.cp.SetDesired("ub", api.PhaseRunning)
	if c := h.waitCompletion("t-create"); c.Status != api.TaskSuccess {
		t.Fatalf("create: %+v", c)
	}
	beat := func() protocol.HeartbeatRequest {
		t.Helper()
		n := len(h.cp.Heartbeats())
		// The heartbeat loop's wait (the create's lease keeper may
		// still have one of 20 s pending), then its deadline.
		waitTimer(t, h.ctx, clk, 10*time.Second)
		clk.advanceToNext()
		h.waitCP("a heartbeat", func() bool { return len(h.cp.Heartbeats()) > n })
		hbs := h.cp.Heartbeats()
		return hbs[len(hbs)-1]
	}
	for i := range 2 { // sent with the map older than the create, then with a newer one
		hb := beat()
		if len(hb.VMs) != 2 || len(hb.Orphans) != 0 {
			t.Errorf("heartbeat %d after the create: %d VMs, orphans %v; want 2 VMs, no orphan", i, len(hb.VMs), hb.Orphans)
		}
	}
	h.cp.SetDesired("ub", "") // the control plane forgets b
	beat()                    // sent before that answer
	if hb := beat(); !slices.Equal(hb.Orphans, []string{"ub"}) {
		t.Errorf("orphans once the control plane forgot b: %v, want [ub]", hb.Orphans)
	}
}

// No progress is sent on acceptance: the first report comes a third of the
// lease TTL later (lease_ttl_seconds, else lease_expires_at by the agent's
// clock), or ProgressInterval (5 s) after acceptance when the executor
// reported progress; then every third of the TTL, which each progress
// answer may change. A TTL below 3 s is still renewed at most once a
// second.
func TestProgressCadenceAndSmallestLease(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ttl     string // lease_ttl_seconds ("" absent)
		expires string // lease_expires_at; the fake clock starts at 12:00:00
		reports bool   // the executor reports progress at once
		answer  string // the first progress answer; "": 404, ignored
		first   time.Duration
		then    time.Duration
	}{
		{"ttl 60s", "60", "12:01:00", false, "", 20 * time.Second, 20 * time.Second},
		{"ttl 60s, progress at once", "60", "12:01:00", true, "", 5 * time.Second, 20 * time.Second},
		{"ttl 60s, shortened to 30s by the progress answer", "60", "12:01:00", false,
			`{"lease_expires_at": "2026-11-01T12:00:50Z", "lease_ttl_seconds": 30}`, 20 * time.Second, 10 * time.Second},
		{"no ttl: expiry by the agent's clock, then the progress answer's", "", "12:01:30", false,
			`{"lease_expires_at": "2026-11-01T12:02:00Z"}`, 30 * time.Second, 30 * time.Second},
		{"ttl 3s, the smallest", "3", "12:00:03", false, "", time.Second, time.Second},
		{"ttl 1s, below the smallest", "1", "12:00:01", false, "", time.Second, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock()
			h := newHarness(t, runner.Config{Clock: clk}, vm("a", "ua", api.StatusStopped))
			h.cp.HeartbeatInterval = 7 * time.Second // apart from every renewal
			ttl := ""
			if tc.ttl != "" {
				ttl = `, "lease_ttl_seconds": ` + tc.ttl
			}
			// The lease answer as a control plane writes it; the fake
			// keeps no lease of its own that could expire meanwhile.
			lease := fmt.Sprintf(`{"tasks": [{"id": "t1", "type": "vm.start", "vm_name": "a", "vm_uuid": "ua", "attempt": 1, "lease_id": "lease-x", "lease_expires_at": "2026-11-01T%sZ"%s}]}`, tc.expires, ttl)
			h.cp.AddFault(cptest.Fault{Endpoint: cptest.Lease, Kind: cptest.FaultBody, Body: []byte(lease), Times: 1})
			if tc.answer != "" {
				h.cp.AddFault(cptest.Fault{Endpoint: cptest.Progress, Kind: cptest.FaultBody, Body: []byte(tc.answer), Times: 1})
			}
			release := make(chan struct{})
			h.ex.hook = func(ctx context.Context, tk protocol.Task, progress func(api.Progress)) (*api.VM, error, bool) {
				if tc.reports {
					progress(api.Progress{Phase: "boot", Done: 1, Total: -1})
				}
				select {
				case <-release:
				case <-ctx.Done():
				}
				return nil, nil, false
			}
			h.start()
			h.ex.waitStarted(t, h.ctx, "t1")
			waitTimer(t, h.ctx, clk, tc.first)
			if n := h.cp.Count(cptest.Progress); n != 0 {
				t.Fatalf("%d progress requests on acceptance, want none", n)
			}
			clk.advance(tc.first)
			h.waitCP("the first progress", func() bool { return h.cp.Count(cptest.Progress) == 1 })
			waitTimer(t, h.ctx, clk, tc.then)
			clk.advance(tc.then)
			h.waitCP("the second progress", func() bool { return h.cp.Count(cptest.Progress) == 2 })
			close(release)
		})
	}
}

// waitTimer waits until a timer of duration d is pending.
func waitTimer(t *testing.T, ctx context.Context, c *fakeClock, d time.Duration) {
	t.Helper()
	for {
		c.mu.Lock()
		ch := c.changed
		found := slices.ContainsFunc(c.timers, func(x *fakeTimer) bool { return x.d == d })
		c.mu.Unlock()
		if found {
			return
		}
		select {
		case <-ch:
		case <-ctx.Done():
			c.mu.Lock()
			var ds []time.Duration
			for _, x := range c.timers {
				ds = append(ds, x.d)
			}
			c.mu.Unlock()
			t.Fatalf("waiting for a %v timer (pending: %v): %v", d, ds, ctx.Err())
		}
	}
}

// A completion's attempt and lease_id name the delivery it answers: every
// resend of one outcome repeats them, and an outcome delivered again after
// it finished (the control plane re-offered the task) names the new
// delivery. They count neither executions (one) nor sends.
func TestCompletionAttemptNamesTheDelivery(t *testing.T) {
	h := newHarness(t, runner.Config{RetryBase: 2 * time.Millisecond, RetryMax: 10 * time.Millisecond},
		vm("a", "ua", api.StatusStopped), vm("b", "ub", api.StatusStopped))
	// Two acknowledgements lost: the outcome is sent three times.
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Complete, Kind: cptest.FaultDropAnswer, Times: 2})
	h.enqueue("t1", api.TaskStart, "a", "ua")
	h.start()
	h.waitCP("three sends of t1's outcome", func() bool { return len(h.cp.CompletionsOf("t1")) == 3 })
	t1, _ := h.cp.Task("t1")
	for i, c := range h.cp.CompletionsOf("t1") {
		if c.Attempt != 1 || c.LeaseID != t1.LeaseID || c.Duplicate != (i > 0) {
			t.Errorf("send %d of t1: attempt %d lease %s duplicate %v; want attempt 1 lease %s", i, c.Attempt, c.LeaseID, c.Duplicate, t1.LeaseID)
		}
	}

	// t2 finishes, its outcome is refused, the control plane re-offers it.
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Complete, Kind: cptest.FaultStatus, Status: 503})
	h.enqueue("t2", api.TaskStart, "b", "ub")
	h.waitCP("a refused completion of t2", func() bool { return h.cp.Count(cptest.Complete) > 3 })
	h.cp.Expire("t2")
	h.waitCP("t2 delivered again", func() bool { return h.cp.Deliveries("t2") == 2 })
	// The agent asks for its next lease once it took that answer's tasks;
	// the second completion sent after that is addressed to the new lease.
	leases := h.cp.Count(cptest.Lease)
	h.waitCP("the next lease request", func() bool { return h.cp.Count(cptest.Lease) > leases })
	sends := h.cp.Count(cptest.Complete)
	h.waitCP("two more sends", func() bool { return h.cp.Count(cptest.Complete) >= sends+2 })
	h.cp.ClearFaults()
	c := h.waitCompletion("t2")
	t2, _ := h.cp.Task("t2")
	if c.Attempt != 2 || c.LeaseID != t2.LeaseID || c.Status != api.TaskSuccess {
		t.Errorf("t2's outcome after its redelivery: attempt %d lease %s status %s; want attempt 2 lease %s", c.Attempt, c.LeaseID, c.Status, t2.LeaseID)
	}
	for _, id := range []string{"t1", "t2"} {
		if n := len(h.ex.callsOf(id)); n != 1 {
			t.Errorf("%s executed %d times, want 1", id, n)
		}
	}
}

// A 2xx answer the agent cannot use (cut JSON, larger than 16 MiB) is a
// failed request: logged as a warning naming the request, retried on the
// failure schedule, and nothing in it is acted on.
func TestMalformedAnswerIsAFailedRequest(t *testing.T) {
	clk := newFakeClock()
	core, logs := observer.New(zap.WarnLevel)
	h := newHarness(t, runner.Config{Clock: clk, Logger: zap.New(core)}, vm("a", "ua", api.StatusStopped))
	h.cp.SetDesired("ua", api.PhaseRunning)
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Heartbeat, Kind: cptest.FaultBody, Body: []byte(`{"desired": {"ua": "runn`), Times: 1})
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Lease, Kind: cptest.FaultBody, Body: bytes.Repeat([]byte(" "), protocol.MaxAnswerBytes+1), Times: 1})
	h.start()
	for _, w := range clk.waitTimers(t, h.ctx, 2) {
		if w < 500*time.Millisecond || w >= time.Second {
			t.Errorf("wait after a malformed answer %v, want the first failure's [0.5s, 1s)", w)
		}
	}
	for op, want := range map[string]string{"heartbeat": "unexpected end of JSON input", "lease": "larger than 16777216 bytes"} {
		got := logs.FilterMessage("control plane sent a malformed answer, will retry").FilterField(zap.String("op", op)).All()
		if len(got) != 1 || !bytes.Contains([]byte(fmt.Sprint(got[0].ContextMap()["error"])), []byte(want)) {
			t.Errorf("%s: logged %+v, want one warning saying %q", op, got, want)
		}
	}
	if h.r.Connected() {
		t.Error("Connected() after malformed answers")
	}
	if n := len(h.ex.allCalls()); n != 0 {
		t.Errorf("%d executions on a malformed answer", n)
	}
	clk.advance(time.Second)
	h.waitCP("a heartbeat answered", func() bool { return len(h.cp.Heartbeats()) == 1 })
	h.ex.waitFor(t, h.ctx, "the reconcile start of a", func() bool { return len(h.ex.allCalls()) == 1 })
}
