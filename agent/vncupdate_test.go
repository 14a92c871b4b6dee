package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"testing"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/vnc/rfbtest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// vncAddr is the address TestVNCUpdate's consoles listen on.
const vncAddr = "127.0.0.93"

// heldVNC lists the VNC ports the host holds for a VM.
func heldVNC(h *Host, id string) []int { return h.engine.HeldVNCPorts(id) }

// TestVNCUpdate: vm.update turns a running VM's console on, moves it and
// turns it off at its next start (pending_changes), holding the pending
// port meanwhile and releasing every port the VM no longer has; a taken
// explicit port is port_in_use and leaves nothing held; a stopped VM gets
// the change at once; login works with the password given.
func TestVNCUpdate(t *testing.T) {
	t.Parallel()
	// Its consoles listen on a loopback address of their own: the test
	// asserts which automatic port a VM gets, and the other tests' agents
	// and VMs (this package's and the other packages' that run beside
	// it) pick ports from 5900 on 127.0.0.1; one could bind the port
	// this test was given before its QEMU does.
	hh := newHostWith(t, Options{}, func(c *config.Config) { c.Listen.VNC = vncAddr })
	h := hh.h
	ctx := context.Background()
	const pw = "Up8!pass"
	restart := func() api.VM {
		t.Helper()
		if _, err := h.Engine().Stop(ctx, "vncup"); err != nil {
			t.Fatal(err)
		}
		if _, err := h.Engine().Start(ctx, "vncup"); err != nil {
			t.Fatal(err)
		}
		v, err := h.VM("vncup")
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	v, err := h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "vncup", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, NoCloudInit: true}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	id := v.UUID
	on, off := true, false
	if _, err := h.Update(ctx, "vncup", api.UpdateVM{VNCEnabled: &on}); errcode.Of(err) != errcode.ValidationFailed {
		t.Fatalf("turned on without a password: %v", err)
	}
	if _, err := h.Update(ctx, "vncup", api.UpdateVM{VNCEnabled: &off, VNCPassword: &[]string{pw}[0]}); errcode.Of(err) != errcode.ValidationFailed {
		t.Fatalf("password while turning off: %v", err)
	}

	// On, running: at the next start, the picked port held meanwhile.
	v, err = h.Update(ctx, "vncup", api.UpdateVM{VNCEnabled: &on, VNCPassword: &[]string{pw}[0]})
	if err != nil {
		t.Fatal(err)
	}
	p := v.PendingChanges
	if v.VNCEnabled || p == nil || p.VNCEnabled == nil || !*p.VNCEnabled || p.VNCPort < 5900 {
		t.Fatalf("pending vnc on: %+v %+v", v, p)
	}
	if got := heldVNC(h, id); !slices.Equal(got, []int{p.VNCPort}) {
		t.Fatalf("held %v, want [%d]", got, p.VNCPort)
	}
	// Moved before it applies: the picked port is released. (An
	// ephemeral port: other tests on this machine take 5900 and up.)
	first := freePort(t)
	if v, err = h.Update(ctx, "vncup", api.UpdateVM{VNCPort: &first}); err != nil || v.PendingChanges == nil || v.PendingChanges.VNCPort != first {
		t.Fatalf("pending move: %+v %v", v, err)
	}
	if got := heldVNC(h, id); !slices.Equal(got, []int{first}) {
		t.Fatalf("held %v, want [%d]", got, first)
	}
	v = restart()
	if !v.VNCEnabled || v.VNCPort != first || v.PendingChanges != nil {
		t.Fatalf("after restart: %+v %+v", v, v.PendingChanges)
	}
	c, err := rfbtest.Dial(ctx, net.JoinHostPort(vncAddr, fmt.Sprint(first)), pw)
	if err != nil {
		t.Fatalf("vnc login after turning on: %v", err)
	}
	c.Close()

	// A taken explicit port: port_in_use, nothing held for it.
	ln, err := net.Listen("tcp", vncAddr+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	taken := ln.Addr().(*net.TCPAddr).Port
	if _, err := h.Update(ctx, "vncup", api.UpdateVM{VNCPort: &taken}); errcode.Of(err) != errcode.PortInUse {
		t.Fatalf("taken port %d: %v", taken, err)
	}
	other, err := h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "other", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		NoCloudInit: true, VNCEnabled: true, VNCPassword: pw}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Update(ctx, "vncup", api.UpdateVM{VNCPort: &other.VNCPort}); errcode.Of(err) != errcode.PortInUse {
		t.Fatalf("another VM's port %d: %v", other.VNCPort, err)
	}
	if got := heldVNC(h, id); !slices.Equal(got, []int{first}) {
		t.Fatalf("held %v after port_in_use, want [%d]", got, first)
	}

	// Moved while running: both held until the restart, the old one free then.
	moved := freePort(t)
	v, err = h.Update(ctx, "vncup", api.UpdateVM{VNCPort: &moved})
	if err != nil {
		t.Fatal(err)
	}
	if v.VNCPort != first || v.PendingChanges == nil || v.PendingChanges.VNCPort != moved || v.PendingChanges.VNCEnabled != nil {
		t.Fatalf("pending move: %+v %+v", v, v.PendingChanges)
	}
	if got := heldVNC(h, id); !slices.Equal(got, []int{min(first, moved), max(first, moved)}) {
		t.Fatalf("held %v, want [%d %d]", got, first, moved)
	}
	v = restart()
	if v.VNCPort != moved || v.PendingChanges != nil {
		t.Fatalf("after move: %+v", v)
	}
	if got := heldVNC(h, id); !slices.Equal(got, []int{moved}) {
		t.Fatalf("held %v after the move, want [%d]", got, moved)
	}
	c, err = rfbtest.Dial(ctx, net.JoinHostPort(vncAddr, fmt.Sprint(moved)), pw)
	if err != nil {
		t.Fatalf("vnc login on the moved port: %v", err)
	}
	c.Close()

	// Off while running: pending; after the restart no port, no password.
	v, err = h.Update(ctx, "vncup", api.UpdateVM{VNCEnabled: &off})
	if err != nil {
		t.Fatal(err)
	}
	if !v.VNCEnabled || v.PendingChanges == nil || v.PendingChanges.VNCEnabled == nil || *v.PendingChanges.VNCEnabled {
		t.Fatalf("pending off: %+v %+v", v, v.PendingChanges)
	}
	v = restart()
	if v.VNCEnabled || v.VNCPort != 0 || v.PendingChanges != nil {
		t.Fatalf("after off: %+v", v)
	}
	if got := heldVNC(h, id); len(got) != 0 {
		t.Fatalf("held %v with vnc off", got)
	}
	if r, _ := h.Engine().Get("vncup"); r.Record.VNCPassword != "" {
		t.Fatal("sealed password kept with vnc off")
	}

	// Stopped: at once, on the port asked.
	if _, err := h.Engine().Stop(ctx, "vncup"); err != nil {
		t.Fatal(err)
	}
	v, err = h.Update(ctx, "vncup", api.UpdateVM{VNCEnabled: &on, VNCPort: &first, VNCPassword: &[]string{pw}[0]})
	if err != nil {
		t.Fatal(err)
	}
	if !v.VNCEnabled || v.VNCPort != first || v.PendingChanges != nil {
		t.Fatalf("stopped vm turned on: %+v", v)
	}

	// "vnc_port": null: back to automatic, the next free port from 5900.
	var auto api.UpdateVM
	if err := json.Unmarshal([]byte(`{"vnc_port": null}`), &auto); err != nil || !auto.VNCPortAuto {
		t.Fatalf("null vnc_port decoded as %+v, %v", auto, err)
	}
	v, err = h.Update(ctx, "vncup", auto)
	if err != nil {
		t.Fatal(err)
	}
	if v.VNCPort < 5900 || v.VNCPort >= first || v.PendingChanges != nil {
		t.Fatalf("automatic port after an explicit %d: %+v", first, v)
	}
	if got := heldVNC(h, id); !slices.Equal(got, []int{v.VNCPort}) {
		t.Fatalf("held %v after going automatic, want [%d]", got, v.VNCPort)
	}

	// A start that fails after taking a pending move frees the old port
	// at once: it is in no spec any more.
	if _, err := h.Engine().Start(ctx, "vncup"); err != nil {
		t.Fatal(err)
	}
	old := v.VNCPort
	blocker, err := net.Listen("tcp", vncAddr+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Close()
	blocked := blocker.Addr().(*net.TCPAddr).Port
	blocker.Close() // free for the update's check, taken again below
	if v, err = h.Update(ctx, "vncup", api.UpdateVM{VNCPort: &blocked}); err != nil || v.PendingChanges == nil || v.PendingChanges.VNCPort != blocked {
		t.Fatalf("pending move to %d: %+v %v", blocked, v, err)
	}
	if blocker, err = net.Listen("tcp", net.JoinHostPort(vncAddr, fmt.Sprint(blocked))); err != nil {
		t.Fatal(err)
	}
	defer blocker.Close()
	if _, err := h.Engine().Stop(ctx, "vncup"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Engine().Start(ctx, "vncup"); err == nil {
		t.Fatal("started with its vnc port taken")
	}
	if got := heldVNC(h, id); !slices.Equal(got, []int{blocked}) {
		t.Fatalf("held %v after the failed start, want [%d]", got, blocked)
	}
	if v, err := h.Update(ctx, "other", api.UpdateVM{VNCPort: &old}); err != nil || v.PendingChanges == nil || v.PendingChanges.VNCPort != old {
		t.Fatalf("another VM taking the freed port %d: %+v %v", old, v, err)
	}
	for _, n := range []string{"vncup", "other"} {
		if err := h.Delete(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	if got := heldVNC(h, id); len(got) != 0 {
		t.Fatalf("held %v after delete", got)
	}
}
