package netdev_test

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/guestagent"
	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/qmp"
)

// bootWith boots the test guest with one NIC on a's descriptor, then
// closes the test's copy of it, as the engine does once QEMU started.
func bootWith(t *testing.T, a *netdev.Attached, o netdevtest.GuestOptions) *netdevtest.Guest {
	t.Helper()
	o.NetArgs = netdev.QEMUArgs(0, a, 3, "")
	o.ExtraFiles = []*os.File{a.File}
	g := netdevtest.Boot(t, o)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	return g
}

// TestTapGuests boots two guests on taps of one bridge: each gets its DHCP
// lease, the host pings both, one pings the other, the guest agent reports
// the leased address; after quit and kill -9 no tap is left.
func TestTapGuests(t *testing.T) {
	t.Parallel()
	ns := netdevtest.NewNetns(t)
	ns.Bridge(t, "br0", "10.77.0.1/24")
	macA, macB := netdev.GenerateMAC(uuidA, 0), netdev.GenerateMAC(uuidB, 0)
	const ipA, ipB = "10.77.0.11", "10.77.0.12"
	ns.DHCP(t, "br0", "10.77.0.100", "10.77.0.150",
		"--dhcp-host="+macA+","+ipA, "--dhcp-host="+macB+","+ipB)

	tapA, err := create(t, ns, shortA, netdev.NICRequest{Type: netdev.TypeBridge, Bridge: "br0", MAC: macA})
	if err != nil {
		t.Fatal(err)
	}
	tapB, err := create(t, ns, "0b9e1f227c3d", netdev.NICRequest{Type: netdev.TypeBridge, Bridge: "br0", MAC: macB})
	if err != nil {
		t.Fatal(err)
	}
	nameA, nameB := tapA.Name, tapB.Name
	gA := bootWith(t, tapA, netdevtest.GuestOptions{
		Hostname:   "a",
		GuestAgent: true,
		// B may still be booting: try for up to 60 s.
		Run: []string{"i=0; until ping -c1 -W1 " + ipB + " >/dev/null; do i=$((i+1)); [ $i -lt 60 ] || exit 1; done; echo reached-b"},
	})
	gB := bootWith(t, tapB, netdevtest.GuestOptions{Hostname: "b"})

	ctx, cancel := context.WithTimeout(context.Background(), netdevtest.BootTimeout)
	defer cancel()
	if got := gA.IP(ctx, t, "eth0"); got != ipA {
		t.Fatalf("guest a: ip eth0 %s, want %s", got, ipA)
	}
	leaseA := time.Since(gA.Started)
	if got := gB.IP(ctx, t, "eth0"); got != ipB {
		t.Fatalf("guest b: ip eth0 %s, want %s", got, ipB)
	}
	for _, ip := range []string{ipA, ipB} {
		pctx, pcancel := context.WithTimeout(ctx, 30*time.Second)
		if err := ns.Ping(pctx, ip); err != nil {
			t.Errorf("host -> guest: %v", err)
		}
		pcancel()
	}
	gA.Expect(ctx, t, "reached-b")
	if line := gA.Expect(ctx, t, testguest.Prefix+"run-exit 1 "); line != testguest.Prefix+"run-exit 1 0" {
		t.Errorf("guest a pinging b: %q", line)
	}

	// The guest agent: the first call waits until qemu-ga opened its port.
	qga := guestagent.New(gA.QGAPath())
	defer qga.Close()
	ifs, err := qga.Interfaces(ctx)
	if err != nil {
		t.Fatal(err)
	}
	agentIPs := time.Since(gA.Started)
	want := netip.MustParsePrefix(ipA + "/24")
	i := slices.IndexFunc(ifs, func(x guestagent.Interface) bool { return x.Name == "eth0" })
	if i < 0 || !slices.Contains(ifs[i].Addrs, want) || ifs[i].MAC != macA {
		t.Errorf("guest agent interfaces = %+v, want eth0 %s with %s", ifs, macA, want)
	}
	t.Logf("guest a: QEMU start -> DHCP lease %v, -> guest agent IPs %v",
		leaseA.Round(10*time.Millisecond), agentIPs.Round(10*time.Millisecond))

	// quit: QEMU exits and its tap goes with it.
	q, err := qmp.Dial(ctx, gA.QMPPath())
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if err := q.Execute(ctx, "quit", nil, nil); err != nil && !errors.Is(err, qmp.ErrClosed) {
		t.Fatal(err)
	}
	select {
	case <-gA.Exited():
	case <-ctx.Done():
		t.Fatal("qemu a still running after quit")
	}
	if ns.HasLink(t, nameA) {
		t.Errorf("%s still there after QEMU quit", nameA)
	}
	// kill -9: the same.
	gB.Kill()
	if ns.HasLink(t, nameB) {
		t.Errorf("%s still there after QEMU was killed", nameB)
	}
	if l := oxLinks(t, ns); len(l) > 0 {
		t.Errorf("links left: %v", l)
	}
}

// TestMacvtapGuest boots a guest on a macvtap whose parent is a veth with
// its peer on the bridge: it gets a lease and answers pings; the macvtap
// outlives QEMU until Delete.
func TestMacvtapGuest(t *testing.T) {
	t.Parallel()
	ns := netdevtest.NewNetns(t)
	ns.Bridge(t, "br0", "10.77.5.1/24")
	ns.Veth(t, "vp0", "vb0", "br0")
	ns.DHCP(t, "br0", "10.77.5.100", "10.77.5.150")
	mac := netdev.GenerateMAC(uuidA, 0)
	mv, err := create(t, ns, shortA, netdev.NICRequest{Type: netdev.TypeMACVLAN, Parent: "vp0", MAC: mac})
	if err != nil {
		t.Fatal(err)
	}
	name := mv.Name
	t.Cleanup(func() { _ = ns.Do(func() error { return netdev.Delete(name) }) })
	g := bootWith(t, mv, netdevtest.GuestOptions{Hostname: "m"})

	ctx, cancel := context.WithTimeout(context.Background(), netdevtest.BootTimeout)
	defer cancel()
	ip := g.IP(ctx, t, "eth0")
	addr, err := netip.ParseAddr(ip)
	if err != nil || !netip.MustParsePrefix("10.77.5.0/24").Contains(addr) {
		t.Fatalf("guest on macvtap: ip eth0 %q, want a lease in 10.77.5.0/24", ip)
	}
	t.Logf("macvtap guest: QEMU start -> DHCP lease %v", time.Since(g.Started).Round(10*time.Millisecond))
	pctx, pcancel := context.WithTimeout(ctx, 30*time.Second)
	defer pcancel()
	if err := ns.Ping(pctx, ip); err != nil {
		t.Errorf("host -> guest on macvtap: %v", err)
	}

	g.Kill()
	if !ns.HasLink(t, name) {
		t.Fatalf("%s gone with QEMU; a macvtap stays until Delete", name)
	}
	if err := ns.Do(func() error { return netdev.Delete(name) }); err != nil {
		t.Fatal(err)
	}
	if ns.HasLink(t, name) {
		t.Errorf("%s still there after Delete", name)
	}
}
