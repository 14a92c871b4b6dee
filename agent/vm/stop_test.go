package vm

import (
	"context"
	"strings"
	"testing"
	"time"
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
