package guestagent_test

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/guestagent"
	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/qmp"
)

// TestRealGuestAgent boots the test guest with a SLIRP NIC and
// qemu-guest-agent: QMP's VSERPORT_CHANGE says when the agent opened its
// port, and the client then gets the guest's addresses.
func TestRealGuestAgent(t *testing.T) {
	t.Parallel()
	g := netdevtest.Boot(t, netdevtest.GuestOptions{
		GuestAgent: true,
		NetArgs:    []string{"-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"},
	})
	ctx, cancel := context.WithTimeout(context.Background(), netdevtest.BootTimeout)
	defer cancel()
	g.Expect(ctx, t, testguest.Prefix+"booted ")
	q, err := qmp.Dial(ctx, g.QMPPath())
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	events, unsubscribe := q.Subscribe(16)
	defer unsubscribe()
	// Subscribed at "booted": the agent starts after DHCP, well after.
	var up time.Duration
	for up == 0 {
		select {
		case ev := <-events:
			if ev.Name == "VSERPORT_CHANGE" && ev.Data["id"] == "qgaport" {
				if open, _ := ev.Data["open"].(bool); open {
					up = time.Since(g.Started)
				}
			}
		case <-ctx.Done():
			t.Fatalf("no VSERPORT_CHANGE open for qgaport: %v\n%s", ctx.Err(), g.Console.Text())
		}
	}
	if line := g.Expect(ctx, t, testguest.Prefix+"qga "); !strings.HasPrefix(line, testguest.Prefix+"qga dev=vport") {
		t.Errorf("qga marker %q, want qga dev=vport...", line)
	}

	c := guestagent.New(g.QGAPath())
	defer c.Close()
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	ifs, err := c.Interfaces(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ips := time.Since(g.Started)
	if len(ifs) != 1 || ifs[0].Name != "eth0" || ifs[0].MAC != "52:54:00:12:34:56" {
		t.Fatalf("interfaces = %+v, want eth0 only (lo dropped)", ifs)
	}
	v4 := netip.MustParsePrefix("10.0.2.15/24")
	if !slices.Contains(ifs[0].Addrs, v4) {
		t.Errorf("eth0 addresses %v lack %v", ifs[0].Addrs, v4)
	}
	for _, p := range ifs[0].Addrs {
		if p.Addr().IsLinkLocalUnicast() || p.Addr().IsLoopback() {
			t.Errorf("eth0 address %v should be filtered", p)
		}
	}
	t.Logf("QEMU start -> VSERPORT_CHANGE open %v, -> guest agent IPs %v (%v)",
		up.Round(10*time.Millisecond), ips.Round(10*time.Millisecond), ifs[0].Addrs)

	// A reboot closes the port (VSERPORT_CHANGE open=false) and a new
	// agent opens it again: on that event the engine calls Reset, and the
	// next call syncs on a fresh connection.
	if err := q.Execute(ctx, "system_reset", nil, nil); err != nil {
		t.Fatal(err)
	}
	for opened, closed := false, false; !opened; {
		select {
		case ev := <-events:
			if ev.Name == "VSERPORT_CHANGE" && ev.Data["id"] == "qgaport" {
				open, _ := ev.Data["open"].(bool)
				closed = closed || !open
				opened = closed && open
			}
		case <-ctx.Done():
			t.Fatalf("no VSERPORT_CHANGE close/open after reset: %v", ctx.Err())
		}
	}
	c.Reset()
	if _, err := c.Interfaces(ctx); err != nil {
		t.Fatalf("Interfaces after reboot: %v", err)
	}
}
