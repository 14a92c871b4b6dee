package netdev_test

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

const shortA = "52a3f01c9d4e"

// oxLinks returns the namespace's links made by netdev.
func oxLinks(t *testing.T, ns *netdevtest.Netns) []string {
	t.Helper()
	var out []string
	for _, l := range ns.Links(t) {
		if strings.HasPrefix(l, netdev.TapPrefix) || strings.HasPrefix(l, netdev.MacvtapPrefix) {
			out = append(out, l)
		}
	}
	return out
}

// create runs netdev.Create inside ns; t.Cleanup closes the descriptor.
func create(t *testing.T, ns *netdevtest.Netns, short string, req netdev.NICRequest) (*netdev.Attached, error) {
	t.Helper()
	var a *netdev.Attached
	err := ns.Do(func() error {
		var err error
		a, err = netdev.Create(context.Background(), short, req)
		return err
	})
	if a != nil {
		t.Cleanup(func() { a.Close() })
	}
	return a, err
}

func TestCreateBadInputCreatesNothing(t *testing.T) {
	t.Parallel()
	ns := netdevtest.NewNetns(t)
	ns.Bridge(t, "br0", "10.77.1.1/24")
	ns.IP(t, "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1")
	good := netdev.GenerateMAC(uuidA, 0)
	for _, tc := range []struct {
		name  string
		short string
		req   netdev.NICRequest
		code  errcode.Code
	}{
		{"malformed mac", shortA, netdev.NICRequest{Type: netdev.TypeBridge, Bridge: "br0", MAC: "52:54:00:zz:00:01"}, errcode.ValidationFailed},
		{"multicast mac", shortA, netdev.NICRequest{Type: netdev.TypeBridge, Bridge: "br0", MAC: "01:00:5e:00:00:01"}, errcode.ValidationFailed},
		{"no mac", shortA, netdev.NICRequest{Type: netdev.TypeBridge, Bridge: "br0"}, errcode.ValidationFailed},
		{"multicast mac macvlan", shortA, netdev.NICRequest{Type: netdev.TypeMACVLAN, Parent: "dummy0", MAC: "ff:ff:ff:ff:ff:ff"}, errcode.ValidationFailed},
		{"bad type", shortA, netdev.NICRequest{Type: "user", MAC: good}, errcode.ValidationFailed},
		{"bad index", shortA, netdev.NICRequest{Index: 40, Type: netdev.TypeBridge, Bridge: "br0", MAC: good}, errcode.ValidationFailed},
		{"bad short id", "vm-name", netdev.NICRequest{Type: netdev.TypeBridge, Bridge: "br0", MAC: good}, errcode.ValidationFailed},
		{"bad bridge name", shortA, netdev.NICRequest{Type: netdev.TypeBridge, Bridge: "a/b", MAC: good}, errcode.ValidationFailed},
		{"missing bridge", shortA, netdev.NICRequest{Type: netdev.TypeBridge, Bridge: "nobr0", MAC: good}, errcode.NetworkUnavailable},
		{"not a bridge", shortA, netdev.NICRequest{Type: netdev.TypeBridge, Bridge: "dummy0", MAC: good}, errcode.NetworkUnavailable},
		{"missing parent", shortA, netdev.NICRequest{Type: netdev.TypeMACVLAN, Parent: "noeth0", MAC: good}, errcode.NetworkUnavailable},
	} {
		a, err := create(t, ns, tc.short, tc.req)
		if errcode.Of(err) != tc.code || a != nil {
			t.Errorf("%s: Create = %v, %v; want code %s", tc.name, a, err, tc.code)
		}
		if l := oxLinks(t, ns); len(l) > 0 {
			t.Errorf("%s: links left: %v", tc.name, l)
		}
	}
}

// TestTapLinkLifecycle checks the tap without QEMU: a bridge port, up,
// with the host-side MAC; gone as soon as its only descriptor closes.
func TestTapLinkLifecycle(t *testing.T) {
	t.Parallel()
	ns := netdevtest.NewNetns(t)
	ns.Bridge(t, "br0", "10.77.2.1/24")
	mac := netdev.GenerateMAC(uuidA, 0)
	a, err := create(t, ns, shortA, netdev.NICRequest{Index: 0, Type: netdev.TypeBridge, Bridge: "br0", MAC: mac})
	if err != nil {
		t.Fatal(err)
	}
	if a.Name != "oxt52a3f01c9d0" || a.MAC != mac || a.File == nil {
		t.Fatalf("Attached = %+v", a)
	}
	var link netlink.Link
	var brIndex int
	if err := ns.Do(func() error {
		var err error
		if link, err = netlink.LinkByName(a.Name); err != nil {
			return err
		}
		br, err := netlink.LinkByName("br0")
		brIndex = br.Attrs().Index
		return err
	}); err != nil {
		t.Fatal(err)
	}
	at := link.Attrs()
	if at.MasterIndex != brIndex {
		t.Errorf("tap master = %d, want br0 (%d)", at.MasterIndex, brIndex)
	}
	if at.Flags&(1<<0) == 0 { // net.FlagUp
		t.Errorf("tap not up: %v", at.Flags)
	}
	if got := at.HardwareAddr.String(); got != "fe"+mac[2:] {
		t.Errorf("tap mac = %s, want fe%s", got, mac[2:])
	}
	if tt, ok := link.(*netlink.Tuntap); !ok || tt.Mode != netlink.TUNTAP_MODE_TAP || !tt.NonPersist {
		t.Errorf("link = %#v, want a non-persistent tap", link)
	}
	// The same NIC again: conflict, and the first is untouched.
	if _, err := create(t, ns, shortA, netdev.NICRequest{Index: 0, Type: netdev.TypeBridge, Bridge: "br0", MAC: mac}); !errcode.Is(err, errcode.Conflict) {
		t.Errorf("second Create of the same NIC: %v, want conflict", err)
	}
	if !ns.HasLink(t, a.Name) {
		t.Fatalf("%s gone after a refused duplicate", a.Name)
	}
	// Closing the only descriptor removes the tap.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if ns.HasLink(t, a.Name) {
		t.Errorf("%s still there after its descriptor closed", a.Name)
	}
}

// TestMacvtapDeleteAndSweep checks the macvtap link (MAC, mode, TX queue)
// and that Delete and Sweep remove it while Sweep spares what it must.
func TestMacvtapDeleteAndSweep(t *testing.T) {
	t.Parallel()
	ns := netdevtest.NewNetns(t)
	ns.Bridge(t, "br0", "10.77.3.1/24")
	ns.Veth(t, "vp0", "vb0", "br0")
	mac0 := netdev.GenerateMAC(uuidA, 0)
	a, err := create(t, ns, shortA, netdev.NICRequest{Index: 0, Type: netdev.TypeMACVLAN, Parent: "vp0", MAC: mac0})
	if err != nil {
		t.Fatal(err)
	}
	if a.Name != "oxm52a3f01c9d0" || a.File == nil {
		t.Fatalf("Attached = %+v", a)
	}
	var mv *netlink.Macvtap
	if err := ns.Do(func() error {
		l, err := netlink.LinkByName(a.Name)
		if err != nil {
			return err
		}
		mv, _ = l.(*netlink.Macvtap)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if mv == nil || mv.Mode != netlink.MACVLAN_MODE_BRIDGE || mv.HardwareAddr.String() != mac0 || mv.TxQLen == 0 {
		t.Fatalf("macvtap = %#v; want mode bridge, mac %s, a TX queue", mv, mac0)
	}
	// The same MAC on the same parent: refused, nothing added.
	if _, err := create(t, ns, shortA, netdev.NICRequest{Index: 1, Type: netdev.TypeMACVLAN, Parent: "vp0", MAC: mac0}); !errcode.Is(err, errcode.Conflict) {
		t.Errorf("a second macvtap with MAC %s on vp0: %v, want conflict", mac0, err)
	}
	if l := oxLinks(t, ns); !slices.Equal(l, []string{a.Name}) {
		t.Errorf("links after a refused duplicate MAC: %v", l)
	}
	// A macvtap outlives its descriptor.
	a.Close()
	if !ns.HasLink(t, a.Name) {
		t.Fatalf("%s gone with its descriptor; a macvtap should stay until Delete", a.Name)
	}
	err = ns.Do(func() error { return netdev.Delete(a.Name) })
	if err != nil || ns.HasLink(t, a.Name) {
		t.Fatalf("Delete(%s) = %v; links %v", a.Name, err, ns.Links(t))
	}
	if err := ns.Do(func() error { return netdev.Delete(a.Name) }); err != nil {
		t.Errorf("Delete of a gone link = %v, want nil", err)
	}

	// Sweep: two macvtaps and a tap left over, one macvtap kept; host
	// links and a look-alike name are spared.
	ns.IP(t, "link", "add", "oxtbogus", "type", "veth", "peer", "name", "oxm52a3f01cxyz")
	m1, err := create(t, ns, shortA, netdev.NICRequest{Index: 1, Type: netdev.TypeMACVLAN, Parent: "vp0", MAC: netdev.GenerateMAC(uuidA, 1)})
	if err != nil {
		t.Fatal(err)
	}
	m2, err := create(t, ns, "0b9e1f227c3d", netdev.NICRequest{Index: 0, Type: netdev.TypeMACVLAN, Parent: "vp0", MAC: netdev.GenerateMAC(uuidB, 0)})
	if err != nil {
		t.Fatal(err)
	}
	tap, err := create(t, ns, "0b9e1f227c3d", netdev.NICRequest{Index: 1, Type: netdev.TypeBridge, Bridge: "br0", MAC: netdev.GenerateMAC(uuidB, 1)})
	if err != nil {
		t.Fatal(err)
	}
	before := ns.Links(t)
	var deleted []string
	err = ns.Do(func() error {
		var err error
		deleted, err = netdev.Sweep(map[string]bool{m2.Name: true})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(deleted)
	want := []string{m1.Name, tap.Name}
	slices.Sort(want)
	if !slices.Equal(deleted, want) {
		t.Errorf("Sweep deleted %v, want %v", deleted, want)
	}
	after := ns.Links(t)
	for _, l := range before {
		if slices.Contains(want, l) == slices.Contains(after, l) {
			t.Errorf("link %s: before %v, after %v", l, before, after)
		}
	}
}
