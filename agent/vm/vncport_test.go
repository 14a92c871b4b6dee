package vm

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/vnc"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// TestVNCPortTakenByProcess: a VM whose VNC port another process holds
// (a listener here) fails to start with port_in_use, as agent/vnc and
// docs/api.md say: QEMU cannot bind the port and exits, and the engine
// tells why. The VM stays stopped and leaves no QEMU, pid file or socket;
// once the port is free again it starts on it.
func TestVNCPortTakenByProcess(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHarness(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0") // an ephemeral port: above 5900
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	v := h.defineWith("vnc-taken", "", nil)
	if _, err := h.e.Update(ctx, "vnc-taken", func(s *Spec) { s.VNC = &VNC{Listen: "127.0.0.1", Port: port} }); err != nil {
		t.Fatal(err)
	}

	_, err = h.e.Start(ctx, "vnc-taken")
	wantCode(t, err, errcode.PortInUse)
	msg := errcode.MessageOf(err)
	if !strings.Contains(msg, "vnc port "+strconv.Itoa(port)+" on 127.0.0.1 is in use by another process") ||
		!strings.Contains(msg, "Failed to find an available port") {
		t.Errorf("message %q: want the port and QEMU's reason", msg)
	}
	got, _ := h.e.Get("vnc-taken")
	if got.Status != "stopped" || got.PID != 0 || !strings.HasPrefix(got.Reason, "start failed: vnc port") {
		t.Errorf("after the failed start: status %s, pid %d, reason %q", got.Status, got.PID, got.Reason)
	}
	if out, _ := exec.Command("pgrep", "-f", v.Spec.UUID).Output(); len(out) > 0 {
		t.Errorf("a process of the VM is left: %s", out)
	}
	run := filepath.Join(h.run, ShortID(v.Spec.UUID))
	for _, f := range []string{"qemu.pid", "qmp.sock", "qga.sock"} {
		if _, err := os.Lstat(filepath.Join(run, f)); err == nil {
			t.Errorf("%s is left in %s", f, run)
		}
	}

	ln.Close()
	if _, err := h.e.Start(ctx, "vnc-taken"); err != nil {
		t.Fatalf("start once the port is free: %v", err)
	}
	if err := vnc.CheckPort("127.0.0.1", port); !errcode.Is(err, errcode.PortInUse) {
		t.Errorf("the VM's QEMU does not hold port %d: %v", port, err)
	}
	if _, err := h.e.Poweroff(ctx, "vnc-taken"); err != nil {
		t.Fatal(err)
	}
}
