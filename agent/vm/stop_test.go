package vm

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/testguest"
)

// TestStopRepressesPowerButton: a graceful stop presses the power button
// again every PowerdownInterval, so a guest that ignores the first presses
// (its ACPI daemon busy or not yet listening) and obeys a later one is
// stopped before stop_timeout.
func TestStopRepressesPowerButton(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHarness(t, func(c *Config) { c.StopTimeout = 60 * time.Second; c.PowerdownInterval = time.Second })
	v := h.define("deaf-twice", "#cloud-config\n#otherix-guest: ignore-acpi-presses 2\n{}\n")
	con := h.console(v)
	if _, err := h.e.Start(ctx, "deaf-twice"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, con, "OTHERIX-GUEST ready", bootWait)
	begin := time.Now()
	v, err := h.e.Stop(ctx, "deaf-twice")
	if err != nil {
		t.Fatalf("stop of a guest that obeys the third press: %v", err)
	}
	took := time.Since(begin)
	if v.Status != "stopped" || v.PID != 0 {
		t.Errorf("after stop: status %s pid %d", v.Status, v.PID)
	}
	text := con.Text()
	ignored := strings.Count(text, "OTHERIX-GUEST ignoring power button (")
	if ignored != 2 || !strings.Contains(text, "OTHERIX-GUEST powering off") {
		t.Errorf("console: %d presses ignored (want 2), powering off %v\n%s", ignored, strings.Contains(text, "OTHERIX-GUEST powering off"), text)
	}
	t.Logf("stopped after the 3rd press, %v after the stop began", took.Round(time.Millisecond))
}

// TestKilledDuringGracefulStop: a QEMU killed while a graceful stop waits
// for the guest is a crash, said so by the stop's error and the reason,
// not a clean power-off.
func TestKilledDuringGracefulStop(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHarness(t, func(c *Config) { c.StopTimeout = 60 * time.Second })
	v := h.define("killed-stop", "#cloud-config\n#otherix-guest: ignore-acpi\n{}\n")
	con := h.console(v)
	v, err := h.e.Start(ctx, "killed-stop")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, con, "OTHERIX-GUEST ready", bootWait)
	errc := make(chan error, 1)
	go func() { _, err := h.e.Stop(ctx, "killed-stop"); errc <- err }()
	waitFor(t, con, "OTHERIX-GUEST ignoring power button", 30*time.Second)
	syscall.Kill(v.PID, syscall.SIGKILL)
	err = <-errc
	after, _ := h.e.Get("killed-stop")
	if err == nil || after.Status != "crashed" || !strings.Contains(after.Reason, "SIGKILL during a graceful stop") {
		t.Fatalf("stop of a killed qemu: err %v, status %s, reason %q", err, after.Status, after.Reason)
	}
}

// TestGuestPanic: a guest kernel panic reaches QEMU through pvpanic
// (GUEST_PANICKED), QEMU exits, and the VM is crashed with a guest-panic
// reason, not stopped as if the guest had powered off.
func TestGuestPanic(t *testing.T) {
	t.Parallel()
	testPanic(t, "panicky", "sleep 1; echo c >/proc/sysrq-trigger")
}

// TestGuestPanicViaDevice: testguest.PanicViaDevice, the driver's panic
// write done from the guest's userspace (what the arm64 test relies on, its
// kernel having no pvpanic driver), ends the same way on amd64, where it
// first unbinds the driver.
func TestGuestPanicViaDevice(t *testing.T) {
	t.Parallel()
	testPanic(t, "panic-write", testguest.PanicViaDevice)
}

// testPanic starts a VM whose guest runs cmd once booted, and wants it
// crashed with the pvpanic reason.
func testPanic(t *testing.T, name, cmd string) {
	ctx := context.Background()
	h := newHarness(t, nil)
	v := h.define(name, "#cloud-config\n#otherix-run: "+cmd+"\n{}\n")
	if _, err := h.e.Start(ctx, name); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(bootWait)
	for {
		v, _ = h.e.Get(name)
		if v.Status == "crashed" || v.Status == "stopped" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest did not panic: %s\n%s", v.Status, h.console(v).Text())
		}
		select {
		case <-h.changes:
		case <-time.After(time.Second):
		}
	}
	if v.Status != "crashed" || v.Reason != "guest kernel panicked (pvpanic)" {
		t.Fatalf("after a guest panic: status %s, reason %q\n%s", v.Status, v.Reason, h.console(v).Text())
	}
}
