package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/testguest"
)

// TestGuestPanicARM64: an arm64 VM's pvpanic device reaches the agent.
// No Debian arm64 kernel has the pvpanic driver, so the guest does the
// driver's panic write itself (testguest.PanicViaDevice: PVPANIC_PANICKED
// to the pvpanic-pci device's BAR0); QEMU reports GUEST_PANICKED and exits,
// and the VM is crashed with the pvpanic reason and a crashed event. With
// restart_policy never it stays crashed over two heartbeats; set to
// on-failure, the agent restarts it. One arm64 boot (TCG is slow): the
// restarted VM is deleted before its guest boots.
func TestGuestPanicARM64(t *testing.T) {
	t.Parallel()
	a := startAgent(t, "restart:\n  backoff_base: 500ms\n  backoff_max: 1s\n")
	srv := httptest.NewServer(http.FileServer(http.Dir(testguest.PlatformDir(t, "arm64", testguest.VariantDefault))))
	t.Cleanup(srv.Close)
	ud := filepath.Join(t.TempDir(), "user-data.yaml")
	if err := os.WriteFile(ud, []byte("#cloud-config\n#otherix-run: "+testguest.PanicViaDevice+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a.ok("vm", "create", "armpanic", "--image-url", srv.URL+"/guest.qcow2", "--arch", "arm64", "--vcpus", "1",
		"--memory-mb", "256", "--user-data", ud, "--restart-policy", "never", "--wait")
	v := a.getVM("armpanic")
	con := testguest.OpenConsole(filepath.Join(a.dir, "vms", v.UUID, "console.log"))
	t.Cleanup(func() { con.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	line, err := con.WaitFor(ctx, testguest.Prefix+"pvpanic ")
	if err != nil {
		t.Fatalf("the guest did not reach its panic write: %v\n%s", err, con.Text())
	}
	wrote := time.Now()
	if !strings.Contains(line, "bar0=0x") {
		t.Fatalf("guest: %q\n%s", line, con.Text())
	}
	t.Logf("guest: %s", line)

	c := a.waitVM("armpanic", "crashed", 30*time.Second, func(v api.VM) bool { return v.Status == api.StatusCrashed })
	t.Logf("crashed in the API %v after the guest's line", time.Since(wrote).Round(time.Millisecond))
	const reason = "guest kernel panicked (pvpanic)"
	if c.StatusReason != reason || c.QEMUPID != 0 {
		t.Fatalf("after the panic write: status_reason %q pid %d, want %q and no QEMU\nconsole:\n%s", c.StatusReason, c.QEMUPID, reason, con.Text())
	}
	if e := a.waitEvent("armpanic", api.EventCrashed, 10*time.Second); e.Message != reason {
		t.Errorf("crashed event message %q, want %q", e.Message, reason)
	}

	// restart_policy never: two heartbeats (5 s each) later still crashed.
	time.Sleep(11 * time.Second)
	if v := a.getVM("armpanic"); v.Status != api.StatusCrashed || v.QEMUPID != 0 {
		t.Errorf("restart_policy never, 11 s after the panic: status %s pid %d, want crashed", v.Status, v.QEMUPID)
	}
	if ev := a.eventTypes("armpanic"); slices.Contains(ev, api.EventRestarted) {
		t.Errorf("restart_policy never: events %v hold a restart", ev)
	}

	// on-failure: the next reconcile restarts it, and says after what.
	a.ok("vm", "set", "armpanic", "--restart-policy", "on-failure")
	r := a.waitVM("armpanic", "a restart by its policy", 30*time.Second, func(v api.VM) bool {
		return v.Status == api.StatusRunning && v.QEMUPID != 0 && v.RestartCount == 1
	})
	if e := a.waitEvent("armpanic", api.EventRestarted, 10*time.Second); e.Message != "after crashed: "+reason {
		t.Errorf("restarted event message %q, want %q", e.Message, "after crashed: "+reason)
	}
	a.ok("vm", "delete", "armpanic", "--force", "--wait")
	t.Logf("restarted by on-failure as qemu pid %d, then deleted", r.QEMUPID)
}
