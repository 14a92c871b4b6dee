package runner_test

import (
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/protocol/cptest"
	"github.com/otherix/otherix-agent/agent/runner"
)

// TestHeartbeatsThroughOutage: a control plane answering 503 with a
// Retry-After shorter than the interval (cluster mode while etcd has no
// quorum) still gets a heartbeat at least every interval: the backoff
// never outgrows it, or the node would read lost for up to RetryMax after
// the store came back (its liveness lease is three intervals).
func TestHeartbeatsThroughOutage(t *testing.T) {
	clk := newFakeClock()
	h := newHarness(t, runner.Config{Clock: clk, RetryBase: time.Second, RetryMax: 60 * time.Second})
	h.cp.HeartbeatInterval = 10 * time.Second
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Heartbeat, Kind: cptest.FaultStatus, Status: 503, RetryAfter: "5"})
	h.cp.AddFault(cptest.Fault{Endpoint: cptest.Lease, Kind: cptest.FaultDrop})
	h.start()
	h.waitCP("the registration", func() bool { return len(h.cp.Registrations()) == 1 })
	var elapsed time.Duration
	for elapsed < 10*time.Minute {
		clk.waitTimers(t, h.ctx, 2) // the lease and heartbeat loops wait
		elapsed += clk.advanceToNext()
	}
	clk.waitTimers(t, h.ctx, 2)
	// Every wait within [Retry-After, interval]: 60 to 120 heartbeats.
	if n := h.cp.Count(cptest.Heartbeat); n < 60 || n > 121 {
		t.Errorf("%d heartbeats over %v of 503 with Retry-After 5, want one every 5 to 10 s", n, elapsed.Round(time.Second))
	}
}
