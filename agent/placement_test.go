package agent

import (
	"testing"

	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/systemd"
)

// TestScopeLimits checks the scope limits of docs/config.md, "VM limits".
func TestScopeLimits(t *testing.T) {
	defaults := config.Default("/var/lib/otherix").Limits
	tests := []struct {
		name   string
		spec   vm.Spec
		limits config.Limits
		want   systemd.UnitSpec
	}{
		{"defaults, no cap", vm.Spec{VCPUs: 2, MemoryMB: 1024}, defaults,
			systemd.UnitSpec{MemoryMaxBytes: (1024 + 512) << 20, CPUWeight: 200, IOWeight: 100, TasksMax: 1024}},
		{"cpu_limit", vm.Spec{VCPUs: 1, MemoryMB: 256, CPULimit: 0.25}, defaults,
			systemd.UnitSpec{MemoryMaxBytes: (256 + 512) << 20, CPUWeight: 100, CPUQuotaPercent: 25, IOWeight: 100, TasksMax: 1024}},
		{"fractional percent rounds", vm.Spec{VCPUs: 4, MemoryMB: 256, CPULimit: 1.555}, defaults,
			systemd.UnitSpec{MemoryMaxBytes: (256 + 512) << 20, CPUWeight: 400, CPUQuotaPercent: 156, IOWeight: 100, TasksMax: 1024}},
		{"weight capped at 10000", vm.Spec{VCPUs: 128, MemoryMB: 256}, defaults,
			systemd.UnitSpec{MemoryMaxBytes: (256 + 512) << 20, CPUWeight: 10000, IOWeight: 100, TasksMax: 1024}},
		{"no memory cap, own weights", vm.Spec{VCPUs: 1, MemoryMB: 256},
			config.Limits{VMMemoryOverheadMB: 0, VMIOWeight: 500, VMTasksMax: 0},
			systemd.UnitSpec{CPUWeight: 100, IOWeight: 500}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ScopeLimits(tt.spec, tt.limits)
			if got.MemoryMaxBytes != tt.want.MemoryMaxBytes || got.CPUWeight != tt.want.CPUWeight ||
				got.CPUQuotaPercent != tt.want.CPUQuotaPercent || got.IOWeight != tt.want.IOWeight || got.TasksMax != tt.want.TasksMax {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}
