package systemd

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

func TestChildEnv(t *testing.T) {
	base := []string{"PATH=" + DefaultPath, "LANG=C"}
	tests := []struct {
		name  string
		extra []string
		want  []string
	}{
		{"minimal", nil, base},
		{"extra kept in order", []string{"HOME=/var/lib/otherix", "TZ=UTC"},
			append(slices.Clone(base), "HOME=/var/lib/otherix", "TZ=UTC")},
		{"override", []string{"LANG=C.UTF-8", "A=1", "A=2"},
			[]string{"PATH=" + DefaultPath, "LANG=C.UTF-8", "A=2"}},
		{"systemd variables dropped", []string{
			"NOTIFY_SOCKET=/run/systemd/notify", "WATCHDOG_USEC=30000000", "WATCHDOG_PID=1",
			"LISTEN_FDS=1", "LISTEN_PID=1", "LISTEN_FDNAMES=x", "KEEP=1"},
			append(slices.Clone(base), "KEEP=1")},
		{"malformed dropped", []string{"novalue", "=x", "EMPTY="},
			append(slices.Clone(base), "EMPTY=")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ChildEnv(tt.extra...); !slices.Equal(got, tt.want) {
				t.Errorf("got %q\nwant %q", got, tt.want)
			}
		})
	}
}

// TestChildEnvReachesChild runs a real child with ChildEnv while the agent's
// own environment carries systemd's variables.
func TestChildEnvReachesChild(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "/run/systemd/notify")
	t.Setenv("WATCHDOG_USEC", "30000000")
	t.Setenv("LISTEN_FDS", "2")
	t.Setenv("OTHERIX_SECRET_TOKEN", "s3cret")
	cmd := exec.Command("/usr/bin/env")
	cmd.Env = ChildEnv("QEMU_AUDIO_DRV=none")
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Split(strings.TrimSpace(string(out)), "\n")
	want := []string{"PATH=" + DefaultPath, "LANG=C", "QEMU_AUDIO_DRV=none"}
	if !slices.Equal(got, want) {
		t.Errorf("child environment: got %q, want %q", got, want)
	}
}
