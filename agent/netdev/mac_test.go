package netdev_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/internal/errcode"
)

const (
	uuidA = "52a3f01c-9d4e-4b7a-8c21-0f3e5d6a7b8c"
	uuidB = "0b9e1f22-7c3d-4e5f-a617-28394a5b6c7d"
)

func TestNormalizeMAC(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		code     errcode.Code
	}{
		{"52:54:00:12:34:56", "52:54:00:12:34:56", ""},
		{"52:54:00:AB:CD:EF", "52:54:00:ab:cd:ef", ""},
		{"52-54-00-ab-cd-ef", "52:54:00:ab:cd:ef", ""},
		{"02:00:00:00:00:01", "02:00:00:00:00:01", ""},
		{"", "", errcode.ValidationFailed},
		{"52:54:00:12:34", "", errcode.ValidationFailed},
		{"52:54:00:12:34:5g", "", errcode.ValidationFailed},
		{"5254.0012.3456", "", errcode.ValidationFailed},
		{"52:54:00:12:34:56:78:9a", "", errcode.ValidationFailed},
		{" 52:54:00:12:34:56", "", errcode.ValidationFailed},
		{"01:00:5e:00:00:01", "", errcode.ValidationFailed}, // multicast
		{"33:33:00:00:00:01", "", errcode.ValidationFailed}, // IPv6 multicast
		{"ff:ff:ff:ff:ff:ff", "", errcode.ValidationFailed}, // broadcast
		{"00:00:00:00:00:00", "", errcode.ValidationFailed},
	} {
		got, err := netdev.NormalizeMAC(tc.in)
		if errcode.Of(err) != tc.code || got != tc.want {
			t.Errorf("NormalizeMAC(%q) = %q, %v; want %q, code %q", tc.in, got, err, tc.want, tc.code)
		}
		if (netdev.ValidateMAC(tc.in) == nil) != (tc.code == "") {
			t.Errorf("ValidateMAC(%q) disagrees with NormalizeMAC", tc.in)
		}
	}
}

func TestGenerateMAC(t *testing.T) {
	seen := map[string]string{}
	for _, u := range []string{uuidA, uuidB, strings.ToUpper(uuidA)} {
		for i := 0; i < 4; i++ {
			m := netdev.GenerateMAC(u, i)
			if m != netdev.GenerateMAC(u, i) {
				t.Fatalf("GenerateMAC(%s, %d) is not stable", u, i)
			}
			if !strings.HasPrefix(m, netdev.MACPrefix+":") {
				t.Errorf("GenerateMAC(%s, %d) = %s: not under %s", u, i, m, netdev.MACPrefix)
			}
			if n, err := netdev.NormalizeMAC(m); err != nil || n != m {
				t.Errorf("GenerateMAC(%s, %d) = %s: not a normalized unicast MAC: %v", u, i, m, err)
			}
			key := strings.ToLower(u) + fmt.Sprint(i)
			if prev, ok := seen[m]; ok && prev != key {
				t.Errorf("GenerateMAC gives %s for %s and %s", m, prev, key)
			}
			seen[m] = key
		}
	}
	if len(seen) != 8 {
		t.Errorf("%d distinct MACs for 2 uuids x 4 NICs (case ignored), want 8", len(seen))
	}
}

// macTable is a Holder over a map, as the engine's specs would answer.
type macTable map[string][2]any

func (m macTable) held(mac string) (string, int, bool) {
	r, ok := m[mac]
	if !ok {
		return "", 0, false
	}
	return r[0].(string), r[1].(int), true
}

func (m macTable) assign(t *testing.T, owner string, index int, mac string) (string, error) {
	t.Helper()
	got, err := netdev.AssignMAC(owner, index, mac, m.held)
	if err == nil {
		m[got] = [2]any{owner, index}
	}
	return got, err
}

func TestAssignMAC(t *testing.T) {
	r := macTable{}
	m0, err := r.assign(t, uuidA, 0, "")
	if err != nil || m0 != netdev.GenerateMAC(uuidA, 0) {
		t.Fatalf("Assign generated = %q, %v; want %s", m0, err, netdev.GenerateMAC(uuidA, 0))
	}
	// The same NIC again: its own MAC.
	if m, err := r.assign(t, uuidA, 0, ""); err != nil || m != m0 {
		t.Fatalf("replay = %q, %v", m, err)
	}
	if m, err := r.assign(t, uuidA, 0, strings.ToUpper(m0)); err != nil || m != m0 {
		t.Fatalf("replay given = %q, %v", m, err)
	}
	// Another NIC asking for that MAC: conflict.
	_, err = r.assign(t, uuidB, 0, m0)
	if !errcode.Is(err, errcode.Conflict) {
		t.Fatalf("duplicate MAC: %v, want conflict", err)
	}
	// A generated MAC already given to someone else: the next round.
	gB := netdev.GenerateMAC(uuidB, 1)
	if _, err := r.assign(t, uuidA, 1, gB); err != nil {
		t.Fatal(err)
	}
	mB, err := r.assign(t, uuidB, 1, "")
	if err != nil || mB == gB || !strings.HasPrefix(mB, netdev.MACPrefix) {
		t.Fatalf("generated after collision = %q, %v (taken: %s)", mB, err, gB)
	}
	if again, _ := (macTable{}).assign(t, uuidB, 1, ""); again != gB {
		t.Fatalf("generation without collision = %s, want %s", again, gB)
	}
	// Bad MACs are refused before any check.
	for _, bad := range []string{"nope", "01:00:5e:00:00:01"} {
		if _, err := r.assign(t, uuidB, 2, bad); !errcode.Is(err, errcode.ValidationFailed) {
			t.Errorf("Assign(%q): %v, want validation_failed", bad, err)
		}
	}
}

func TestLinkName(t *testing.T) {
	for _, tc := range []struct {
		typ, id string
		idx     int
		want    string
		code    errcode.Code
	}{
		{netdev.TypeBridge, "52a3f01c9d4e", 0, "oxt52a3f01c9d0", ""},
		{netdev.TypeMACVLAN, "52a3f01c9d4e", 31, "oxm52a3f01c9d31", ""},
		{netdev.TypeBridge, "52a3f01c9d4e", 32, "", errcode.ValidationFailed},
		{netdev.TypeBridge, "52a3f01c9d4e", -1, "", errcode.ValidationFailed},
		{netdev.TypeBridge, "52A3F01C9D4E", 0, "", errcode.ValidationFailed},
		{netdev.TypeBridge, "my-vm-name", 0, "", errcode.ValidationFailed},
		{"user", "52a3f01c9d4e", 0, "", errcode.ValidationFailed},
	} {
		got, err := netdev.LinkName(tc.typ, tc.id, tc.idx)
		if got != tc.want || errcode.Of(err) != tc.code {
			t.Errorf("LinkName(%s, %s, %d) = %q, %v; want %q, %q", tc.typ, tc.id, tc.idx, got, err, tc.want, tc.code)
		}
		if len(got) > 15 {
			t.Errorf("LinkName %q longer than IFNAMSIZ-1", got)
		}
	}
}

func TestQEMUArgs(t *testing.T) {
	a := &netdev.Attached{Index: 1, Name: "oxt52a3f01c9d1", MAC: "52:54:00:aa:bb:cc", Type: netdev.TypeBridge}
	got := strings.Join(netdev.QEMUArgs(1, a, 4, "0x11"), " ")
	want := "-netdev tap,id=net1,fd=4,vhost=off -device virtio-net-pci,id=net1-dev,netdev=net1,mac=52:54:00:aa:bb:cc,romfile=,bus=pcie.0,addr=0x11"
	if got != want {
		t.Errorf("QEMUArgs:\ngot  %s\nwant %s", got, want)
	}
	got = strings.Join(netdev.QEMUArgs(0, a, 3, ""), " ")
	want = "-netdev tap,id=net0,fd=3,vhost=off -device virtio-net-pci,id=net0-dev,netdev=net0,mac=52:54:00:aa:bb:cc,romfile="
	if got != want {
		t.Errorf("QEMUArgs without address:\ngot  %s\nwant %s", got, want)
	}
}

func TestDeleteRefusesForeignLinks(t *testing.T) {
	for _, name := range []string{"eth0", "lo", "br0", "oxt", "oxtzzzzzzzzzz0", "oxt52a3f01c9d4e0"} {
		if err := netdev.Delete(name); !errcode.Is(err, errcode.ValidationFailed) {
			t.Errorf("Delete(%q) = %v, want validation_failed", name, err)
		}
	}
}
