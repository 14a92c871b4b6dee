package vm

import (
	"context"
	"net/netip"
	"sync/atomic"
	"testing"

	"github.com/otherix/otherix-agent/agent/guestagent"
	"github.com/otherix/otherix-agent/internal/errcode"
)

type countCloser struct{ n atomic.Int32 }

func (c *countCloser) Close() error { c.n.Add(1); return nil }

// TestRuntimeFollowsQEMU: the guest's interfaces and what is attached
// live with the running QEMU: nothing attaches to a stopped VM, a report
// of the same addresses is no change, and when QEMU exits the engine
// closes what was attached and drops the interfaces.
func TestRuntimeFollowsQEMU(t *testing.T) {
	h := newHarness(t, nil)
	v := h.define("rt", "")
	id := v.Spec.UUID
	ctx := context.Background()
	c := &countCloser{}
	if h.e.Attach(id, "k", c) {
		t.Fatal("attached to a stopped VM")
	}
	ifs := []guestagent.Interface{{Name: "eth0", MAC: "52:54:00:00:00:01", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.2.15/24")}}}
	if changed, err := h.e.SetGuestInterfaces(id, ifs); changed || err != nil {
		t.Errorf("report for a stopped VM: %v %v", changed, err)
	}
	if _, err := h.e.SetGuestInterfaces("0f8fad5b-d9cb-469f-a165-70867728950e", ifs); errcode.Of(err) != errcode.NotFound {
		t.Errorf("report for an unknown VM: %v", err)
	}
	if _, err := h.e.Start(ctx, "rt"); err != nil {
		t.Fatal(err)
	}
	if !h.e.Attach(id, "k", c) {
		t.Fatal("Attach to a running VM failed")
	}
	if h.e.Attach(id, "k", &countCloser{}) {
		t.Error("a key attached twice")
	}
	if got := h.e.Attached(id, "k"); got != c {
		t.Errorf("Attached = %v", got)
	}
	other := &countCloser{}
	h.e.Attach(id, "other", other)
	if got := h.e.Detach(id, "other"); got != other {
		t.Errorf("Detach = %v", got)
	}
	if changed, err := h.e.SetGuestInterfaces(id, ifs); !changed || err != nil {
		t.Errorf("first report: %v %v", changed, err)
	}
	if changed, _ := h.e.SetGuestInterfaces(id, ifs); changed {
		t.Error("the same addresses reported as a change")
	}
	v, _ = h.e.Get("rt")
	if ips := GuestIPs(v.Guest); len(ips) != 1 || ips[0] != "10.0.2.15" {
		t.Errorf("view guest ips %v", ips)
	}
	if _, err := h.e.Poweroff(ctx, "rt"); err != nil {
		t.Fatal(err)
	}
	if n := c.n.Load(); n != 1 {
		t.Errorf("attached closer closed %d times at exit, want 1", n)
	}
	if n := other.n.Load(); n != 0 {
		t.Errorf("detached closer closed by the engine")
	}
	v, _ = h.e.Get("rt")
	if v.Guest != nil || h.e.Attached(id, "k") != nil {
		t.Errorf("after exit: guest %v, attached %v", v.Guest, h.e.Attached(id, "k"))
	}
}
