package hostdev

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/otherix/otherix-agent/agent/hostdev/sysfstest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

var nobody = &Owner{UID: 65534, GID: 65534}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("changing a node's owner needs root")
	}
}

// owner returns "uid:gid mode" of a path.
func owner(t *testing.T, p string) string {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		return "missing"
	}
	st := fi.Sys().(*syscall.Stat_t)
	return itoa(int(st.Uid)) + ":" + itoa(int(st.Gid)) + " " + fi.Mode().Perm().String()
}

func readTrim(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		return "missing"
	}
	return strings.TrimSpace(string(b))
}

// TestAcquireRelease runs a plan's life on the fake tree, with the
// simulated kernel answering the control-file writes: Acquire creates the
// mdev, binds the unbound NIC to vfio-pci and gives the three group nodes
// to the QEMU user; the plan goes through JSON (as persisted across an
// agent restart); Release from the decoded plan puts every node, binding
// and mdev back.
func TestAcquireRelease(t *testing.T) {
	needRoot(t)
	t.Parallel()
	ctx := context.Background()
	tr, h := workstation(t)
	p, err := h.Resolve(ctx, vmA, &Spec{
		PCI: []PCI{{Address: "0000:01:00.0"}, {Address: "0000:02:00.0"}},
		GPU: []GPU{{Type: GPUMdev, Mdev: "i915-GVTg_V5_4"}},
		USB: []USB{{VendorID: "1050"}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	mdev := MdevUUID(mustUUID(vmA), 0)
	avail := tr.S("devices/pci0000:00/0000:00:02.0/mdev_supported_types/i915-GVTg_V5_4/available_instances")
	if err := h.Acquire(ctx, p, nobody); err != nil {
		t.Fatal(err)
	}
	mg := p.VFIO[2].Group
	if mg < 0 {
		t.Fatalf("mdev group not set: %+v", p.VFIO[2])
	}
	for path, want := range map[string]string{
		tr.D("vfio/1"):           "65534:65534 -rw-------",
		tr.D("vfio/5"):           "65534:65534 -rw-------",
		tr.D("vfio/" + itoa(mg)): "65534:65534 -rw-------",
		tr.D("vfio/vfio"):        "0:0 -rw-rw-rw-",
		tr.D("vfio/6"):           "0:0 -rw-------", // another VM's business
	} {
		if got := owner(t, path); got != want {
			t.Errorf("%s: %s, want %s", path, got, want)
		}
	}
	if got := linkBase(tr.S("bus/pci/devices/0000:02:00.0/driver")); got != "vfio-pci" {
		t.Errorf("0000:02:00.0 driver %q, want vfio-pci", got)
	}
	if got := readTrim(t, tr.S("bus/pci/devices/0000:02:00.0/driver_override")); got != "vfio-pci" {
		t.Errorf("driver_override %q", got)
	}
	if !fileExists(tr.S("bus/mdev/devices/" + mdev)) {
		t.Errorf("mdev %s not created", mdev)
	}
	if got := readTrim(t, avail); got != "1" {
		t.Errorf("available_instances %s, want 1", got)
	}

	// Persist, forget, release from the decoded plan (an agent restart).
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var q Plan
	if err := json.Unmarshal(b, &q); err != nil {
		t.Fatal(err)
	}
	if err := h.Release(&q); err != nil {
		t.Fatal(err)
	}
	for _, g := range []string{"1", "5"} {
		if got := owner(t, tr.D("vfio/"+g)); got != "0:0 -rw-------" {
			t.Errorf("/dev/vfio/%s after release: %s", g, got)
		}
	}
	if got := owner(t, tr.D("vfio/"+itoa(mg))); got != "missing" {
		t.Errorf("mdev group node after release: %s, want gone with the mdev", got)
	}
	if got := linkBase(tr.S("bus/pci/devices/0000:02:00.0/driver")); got != "" {
		t.Errorf("0000:02:00.0 still bound to %q", got)
	}
	if got := readTrim(t, tr.S("bus/pci/devices/0000:02:00.0/driver_override")); got != "(null)" {
		t.Errorf("driver_override %q after release", got)
	}
	if got := linkBase(tr.S("bus/pci/devices/0000:01:00.0/driver")); got != "vfio-pci" {
		t.Errorf("0000:01:00.0 (bound by the admin) lost its driver: %q", got)
	}
	if fileExists(tr.S("bus/mdev/devices/" + mdev)) {
		t.Errorf("mdev %s not removed", mdev)
	}
	if got := readTrim(t, avail); got != "2" {
		t.Errorf("available_instances %s, want 2", got)
	}
	if err := h.Release(&q); err != nil {
		t.Errorf("second release: %v", err)
	}
}

// TestAcquireUndo: when the second mdev cannot be made (its type ran out
// between Resolve and Acquire), nothing Acquire did stays.
func TestAcquireUndo(t *testing.T) {
	needRoot(t)
	t.Parallel()
	ctx := context.Background()
	tr, h := workstation(t)
	p, err := h.Resolve(ctx, vmA, &Spec{
		PCI: []PCI{{Address: "0000:02:00.0"}},
		GPU: []GPU{{Type: GPUMdev, Mdev: "i915-GVTg_V5_4"}, {Type: GPUMdev, Mdev: "i915-GVTg_V5_4"}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr.AddMdev("0000:00:02.0", "i915-GVTg_V5_4", "11111111-2222-4333-8444-555555555555") // someone else takes one
	err = h.Acquire(ctx, p, nobody)
	if errcode.Of(err) != errcode.DeviceBusy {
		t.Fatalf("acquire = %v, want device_busy", err)
	}
	if got := owner(t, tr.D("vfio/5")); !strings.HasPrefix(got, "0:0 ") {
		t.Errorf("/dev/vfio/5: %s", got)
	}
	if got := linkBase(tr.S("bus/pci/devices/0000:02:00.0/driver")); got != "" {
		t.Errorf("0000:02:00.0 left bound to %q", got)
	}
	if fileExists(tr.S("bus/mdev/devices/" + MdevUUID(mustUUID(vmA), 0))) {
		t.Error("first mdev left behind")
	}
}

// TestGrantNodeStale: a node left with the QEMU user by an agent that died
// is restored to root's, not to the QEMU user.
func TestGrantNodeStale(t *testing.T) {
	needRoot(t)
	t.Parallel()
	tr := sysfstest.New(t)
	tr.AddDriver("vfio-pci")
	tr.AddPCI(sysfstest.PCI{Addr: "0000:01:00.0", Vendor: 0x10de, Device: 0x1eb8, Class: 0x030000, Driver: "vfio-pci", Group: 3})
	node := tr.D("vfio/3")
	if err := os.Lchown(node, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	g, err := GrantNode(node, *nobody)
	if err != nil {
		t.Fatal(err)
	}
	if g.UID != 0 || g.GID != 0 || g.Mode != 0o600 {
		t.Errorf("grant recorded %+v, want root 0600", g)
	}
	if err := RestoreNode(g); err != nil {
		t.Fatal(err)
	}
	if got := owner(t, node); !strings.HasPrefix(got, "0:0 ") {
		t.Errorf("after restore: %s", got)
	}
	if _, err := GrantNode(tr.D("vfio/77"), *nobody); errcode.Of(err) != errcode.IOMMUUnavailable {
		t.Errorf("grant of a missing node: %v", err)
	}
}

// TestAcquireAsAgentUser: with no QEMU user (QEMU runs as the agent's),
// no node changes owner.
func TestAcquireAsAgentUser(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tr, h := workstation(t)
	p, err := h.Resolve(ctx, vmA, &Spec{PCI: []PCI{{Address: "0000:01:00.0"}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	before := owner(t, tr.D("vfio/1"))
	if err := h.Acquire(ctx, p, nil); err != nil {
		t.Fatal(err)
	}
	if got := owner(t, tr.D("vfio/1")); got != before || len(p.Grants) != 0 {
		t.Errorf("node %s (was %s), grants %v", got, before, p.Grants)
	}
	if err := h.Release(p); err != nil {
		t.Fatal(err)
	}
}
