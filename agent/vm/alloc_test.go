package vm

import (
	"context"
	"slices"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/errcode"
)

const (
	allocA = "0b6f3a5e-7c1d-4e2f-9a3b-5c6d7e8f9a01"
	allocB = "0b6f3a5e-7c1d-4e2f-9a3b-5c6d7e8f9a02"
	allocC = "0b6f3a5e-7c1d-4e2f-9a3b-5c6d7e8f9a03"
	allocD = "0b6f3a5e-7c1d-4e2f-9a3b-5c6d7e8f9a04"
)

// allocSpec is a stopped VM's spec with one NIC of mac and, with port,
// a console there.
func allocSpec(name, id, mac string, port int) Spec {
	s := Spec{Name: name, UUID: id, Arch: ArchAMD64, VCPUs: 1, MemoryMB: 128,
		Disks: []Disk{{Path: "/nonexistent/" + name + ".raw", Format: "raw"}}, NICs: []NIC{{Type: NICUser, MAC: mac}}}
	if port != 0 {
		s.VNC = &VNC{Listen: "127.0.0.1", Port: port}
	}
	return s
}

func held(t *testing.T, e *Engine, mac string) string {
	t.Helper()
	o, _, ok := e.MACOwner(mac)
	if !ok {
		return ""
	}
	return o
}

// TestAllocations: the MACs and VNC ports of VMs and creates in progress
// never collide, and nothing stays held after a failed create (its
// reservation released), a refused define or update, a delete, or an
// agent restart (a new engine on the same state: what it derives from
// the VMs' records, and no reservation of the old one).
func TestAllocations(t *testing.T) {
	ctx := context.Background()
	state := t.TempDir()
	e := bareEngine(t, state)

	// Two creates in progress.
	ra, err := e.Reserve("a", allocA, api.VM{Name: "a", UUID: allocA})
	if err != nil {
		t.Fatal(err)
	}
	macA, err := ra.AssignMAC(0, "")
	if err != nil {
		t.Fatal(err)
	}
	portA, err := ra.PickVNC("127.0.0.1", 47200)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Reserve("a", allocB, api.VM{}); errcode.Of(err) != errcode.Conflict {
		t.Errorf("a second create of a: %v", err)
	}
	rb, err := e.Reserve("b", allocB, api.VM{Name: "b", UUID: allocB})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rb.AssignMAC(0, macA); errcode.Of(err) != errcode.Conflict {
		t.Errorf("b asking for a's MAC: %v", err)
	}
	if err := rb.HoldVNC(portA); errcode.Of(err) != errcode.PortInUse {
		t.Errorf("b asking for a's port: %v", err)
	}
	if p, err := rb.PickVNC("127.0.0.1", portA); err != nil || p == portA {
		t.Errorf("b picking from a's port: %d, %v", p, err)
	}
	if got := e.Reserved(); len(got) != 2 || got[0].Name != "a" || got[1].Name != "b" {
		t.Errorf("placeholders %+v", got)
	}

	// a's create fails: its reservation released, its MAC and port free.
	ra.Release()
	if o := held(t, e, macA); o != "" || len(e.HeldVNCPorts(allocA)) != 0 {
		t.Fatalf("after a's failed create: MAC held by %q, ports %v", o, e.HeldVNCPorts(allocA))
	}
	if _, ok := e.ReservedView("a"); ok {
		t.Error("a failed create is still listed")
	}

	// c's create defines its VM: the VM holds what the reservation held.
	rc, err := e.Reserve("c", allocC, api.VM{Name: "c", UUID: allocC})
	if err != nil {
		t.Fatal(err)
	}
	macC, _ := rc.AssignMAC(0, "")
	portC, err := rc.PickVNC("127.0.0.1", 47300)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Define(ctx, allocSpec("c", allocC, macC, portC), nil); err != nil {
		t.Fatal(err)
	}
	rc.Release() // taken over: a no-op
	if o := held(t, e, macC); o != allocC || !slices.Equal(e.HeldVNCPorts(allocC), []int{portC}) {
		t.Fatalf("defined c: MAC held by %q, ports %v", o, e.HeldVNCPorts(allocC))
	}
	if _, ok := e.ReservedView("c"); ok {
		t.Error("a defined VM is still listed as being created")
	}

	// A define or an update wanting what another holds is refused and
	// leaves nothing.
	if _, err := e.Define(ctx, allocSpec("d", allocD, macC, 0), nil); errcode.Of(err) != errcode.Conflict {
		t.Errorf("define with c's MAC: %v", err)
	}
	if _, err := e.Define(ctx, allocSpec("d", allocD, "52:54:00:0d:0d:0d", portC), nil); errcode.Of(err) != errcode.PortInUse {
		t.Errorf("define with c's port: %v", err)
	}
	if _, err := e.Get("d"); errcode.Of(err) != errcode.NotFound {
		t.Errorf("a refused define registered d: %v", err)
	}
	portB, err := rb.PickVNC("127.0.0.1", 47400)
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.UpdateAlloc(ctx, "c", func(s *Spec, a *Alloc) error {
		s.VNC = &VNC{Listen: "127.0.0.1", Port: portB}
		return nil
	})
	if errcode.Of(err) != errcode.PortInUse || !slices.Equal(e.HeldVNCPorts(allocC), []int{portC}) {
		t.Errorf("update to b's port: %v, c holds %v", err, e.HeldVNCPorts(allocC))
	}
	_, err = e.UpdateAlloc(ctx, "c", func(s *Spec, a *Alloc) error {
		if err := a.TakenVNC(portB); errcode.Of(err) != errcode.PortInUse {
			t.Errorf("TakenVNC of b's port: %v", err)
		}
		p, err := a.PickVNC("127.0.0.1", portC)
		if err != nil || p != portC {
			t.Errorf("automatic pick from c's own port: %d, %v", p, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// Restart: a new engine derives c's from its record; b's create in
	// progress died with the old one.
	e.Close()
	e2 := bareEngine(t, state)
	if o := held(t, e2, macC); o != allocC || !slices.Equal(e2.HeldVNCPorts(allocC), []int{portC}) {
		t.Fatalf("after restart: MAC held by %q, ports %v", o, e2.HeldVNCPorts(allocC))
	}
	if len(e2.Reserved()) != 0 || len(e2.HeldVNCPorts(allocB)) != 0 {
		t.Errorf("after restart: placeholders %+v, b's ports %v", e2.Reserved(), e2.HeldVNCPorts(allocB))
	}

	// Delete: nothing of c is held any more.
	if err := e2.Delete(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if o := held(t, e2, macC); o != "" || len(e2.HeldVNCPorts(allocC)) != 0 {
		t.Fatalf("after delete: MAC held by %q, ports %v", o, e2.HeldVNCPorts(allocC))
	}
}
