package cptest_test

import (
	"context"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
)

func client(t *testing.T, url, token string) *protocol.Client {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := protocol.NewClient(protocol.ClientConfig{BaseURL: url, Node: "n1", TokenFile: p})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestLeaseLifecycle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var cp cptest.Server // zero value
	cp.LeaseTTL = 45 * time.Second
	ts := httptest.NewServer(&cp)
	defer ts.Close()
	c := client(t, ts.URL, "any") // no Token: any bearer passes

	// A long poll returns as soon as a task is queued.
	got := make(chan *protocol.LeaseResponse, 1)
	go func() {
		resp, err := c.Lease(ctx, 30*time.Second, 4)
		if err != nil {
			t.Error(err)
		}
		got <- resp
	}()
	if err := cp.WaitCount(ctx, cptest.Lease, 1); err != nil {
		t.Fatal(err)
	}
	cp.Enqueue(protocol.Task{ID: "a/b", Type: api.TaskStop, VMName: "v", VMUUID: "u", Spec: []byte(`{"force":true}`)})
	resp := <-got
	if len(resp.Tasks) != 1 {
		t.Fatalf("lease: %+v", resp)
	}
	tk := resp.Tasks[0]
	if tk.ID != "a/b" || tk.Attempt != 1 || tk.LeaseID == "" || tk.LeaseTTLSeconds != 45 || string(tk.Spec) != `{"force":true}` {
		t.Errorf("task %+v", tk)
	}

	// Nothing more: an empty answer after the wait.
	if resp, err := c.Lease(ctx, 0, 4); err != nil || len(resp.Tasks) != 0 {
		t.Errorf("second lease: %+v %v", resp, err)
	}
	// Duplicate: the same lease again.
	cp.Duplicate("a/b")
	if resp, _ := c.Lease(ctx, 0, 4); len(resp.Tasks) != 1 || resp.Tasks[0].LeaseID != tk.LeaseID {
		t.Errorf("duplicate: %+v", resp)
	}
	// Expire: a new lease, the next attempt; the old lease is refused.
	cp.Expire("a/b")
	resp, _ = c.Lease(ctx, 0, 4)
	if len(resp.Tasks) != 1 || resp.Tasks[0].LeaseID == tk.LeaseID || resp.Tasks[0].Attempt != 2 {
		t.Errorf("expired: %+v", resp)
	}
	if _, err := c.Progress(ctx, "a/b", tk.LeaseID, nil); err == nil {
		t.Error("progress on the expired lease accepted")
	}
	nl := resp.Tasks[0].LeaseID
	cp.Cancel("a/b")
	pr, err := c.Progress(ctx, "a/b", nl, &api.Progress{Done: 1, Total: 2})
	if err != nil || !pr.Cancelled || pr.LeaseTTLSeconds != 45 {
		t.Errorf("progress after cancel: %+v %v", pr, err)
	}
	if err := c.Complete(ctx, "a/b", protocol.CompleteRequest{LeaseID: nl, Status: api.TaskCancelled}); err != nil {
		t.Fatal(err)
	}
	if err := c.Complete(ctx, "a/b", protocol.CompleteRequest{LeaseID: nl, Status: api.TaskCancelled}); err != nil {
		t.Fatalf("a repeated completion must be acknowledged: %v", err)
	}
	cs := cp.CompletionsOf("a/b")
	if len(cs) != 2 || cs[0].Duplicate || !cs[1].Duplicate || cs[0].Node != "n1" {
		t.Errorf("completions %+v", cs)
	}
	if cp.Deliveries("a/b") != 3 || cp.Leased("a/b") {
		t.Errorf("deliveries %d, leased %v", cp.Deliveries("a/b"), cp.Leased("a/b"))
	}

	// A task cancelled before any lease is never offered.
	cp.Enqueue(protocol.Task{ID: "never", Type: api.TaskStart})
	cp.Cancel("never")
	if resp, _ := c.Lease(ctx, 0, 4); len(resp.Tasks) != 0 {
		t.Errorf("cancelled queued task offered: %+v", resp)
	}
}

func TestAuthFaultsAndDesired(t *testing.T) {
	ctx := context.Background()
	cp := &cptest.Server{Token: "good", HeartbeatInterval: 7 * time.Second}
	ts := httptest.NewServer(cp)
	defer ts.Close()
	if _, err := client(t, ts.URL, "bad").Heartbeat(ctx, protocol.HeartbeatRequest{}); !protocol.IsAuth(err) {
		t.Errorf("bad token: %v", err)
	}
	c := client(t, ts.URL, "good")
	resp, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{})
	if err != nil || resp.Desired != nil || resp.IntervalSeconds != 7 {
		t.Errorf("no opinion yet: %+v %v", resp, err)
	}
	cp.SetDesired("u1", api.PhaseRunning)
	cp.SetDesired("u2", api.PhaseStopped)
	cp.SetDesired("u2", "")
	resp, _ = c.Heartbeat(ctx, protocol.HeartbeatRequest{})
	if len(resp.Desired) != 1 || resp.Desired["u1"] != api.PhaseRunning {
		t.Errorf("desired %v", resp.Desired)
	}
	cp.AddFault(cptest.Fault{Endpoint: cptest.Heartbeat, Kind: cptest.FaultStatus, Status: 503, Times: 2})
	for i := range 2 {
		if _, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{}); !protocol.IsRetryable(err) {
			t.Errorf("fault %d: %v", i, err)
		}
	}
	if _, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{}); err != nil {
		t.Errorf("fault outlived its Times: %v", err)
	}
	if n := cp.Count(cptest.Heartbeat); n != 6 {
		t.Errorf("count %d, want 6", n)
	}
}

// TestOutageDroppedAckAndRotation: an outage drops every connection; a
// dropped acknowledgement records the completion but the agent sees an
// error and its retry is a duplicate; a rotated token refuses the old one.
func TestOutageDroppedAckAndRotation(t *testing.T) {
	ctx := context.Background()
	cp := &cptest.Server{Token: "t1"}
	ts := httptest.NewServer(cp)
	defer ts.Close()
	c := client(t, ts.URL, "t1")

	cp.SetOutage(true)
	if _, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{}); !protocol.IsRetryable(err) {
		t.Errorf("during an outage: %v", err)
	}
	cp.SetOutage(false)

	cp.Enqueue(protocol.Task{ID: "t", Type: api.TaskStart, VMName: "v", VMUUID: "u"})
	resp, err := c.Lease(ctx, 0, 1)
	if err != nil || len(resp.Tasks) != 1 {
		t.Fatalf("lease: %+v %v", resp, err)
	}
	cp.AddFault(cptest.Fault{Endpoint: cptest.Complete, Kind: cptest.FaultDropAnswer, Times: 1})
	done := protocol.CompleteRequest{LeaseID: resp.Tasks[0].LeaseID, Attempt: 1, Status: api.TaskSuccess}
	if err := c.Complete(ctx, "t", done); !protocol.IsRetryable(err) {
		t.Errorf("dropped acknowledgement: %v", err)
	}
	if err := c.Complete(ctx, "t", done); err != nil {
		t.Fatal(err)
	}
	if cs := cp.CompletionsOf("t"); len(cs) != 2 || cs[0].Duplicate || !cs[1].Duplicate {
		t.Errorf("completions %+v", cs)
	}

	cp.SetToken("t2")
	if _, err := c.Heartbeat(ctx, protocol.HeartbeatRequest{}); !protocol.IsAuth(err) {
		t.Errorf("old token after rotation: %v", err)
	}
	if _, err := client(t, ts.URL, "t2").Heartbeat(ctx, protocol.HeartbeatRequest{}); err != nil {
		t.Errorf("new token: %v", err)
	}
}
