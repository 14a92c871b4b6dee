package systemd

import (
	"context"
	"testing"

	godbus "github.com/godbus/dbus/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/otherix/otherix-agent/internal/errcode"
)

func TestUnitSpecValidate(t *testing.T) {
	good := UnitSpec{Name: ScopeName("a1b2c3"), PIDs: []int{1234}}
	tests := []struct {
		name   string
		modify func(*UnitSpec)
		ok     bool
	}{
		{"good", func(*UnitSpec) {}, true},
		{"with slice and limits", func(u *UnitSpec) {
			u.Slice, u.MemoryMaxBytes, u.CPUWeight, u.CPUQuotaPercent = "otherix.slice", 1<<30, 10000, 200
		}, true},
		{"not a scope", func(u *UnitSpec) { u.Name = "otherix-vm-a1.service" }, false},
		{"empty name", func(u *UnitSpec) { u.Name = ".scope" }, false},
		{"bad character", func(u *UnitSpec) { u.Name = "otherix vm.scope" }, false},
		{"path in name", func(u *UnitSpec) { u.Name = "../x.scope" }, false},
		{"bad slice", func(u *UnitSpec) { u.Slice = "otherix" }, false},
		{"no pid", func(u *UnitSpec) { u.PIDs = nil }, false},
		{"pid 1", func(u *UnitSpec) { u.PIDs = []int{1} }, false},
		{"negative pid", func(u *UnitSpec) { u.PIDs = []int{-3} }, false},
		{"weight too big", func(u *UnitSpec) { u.CPUWeight = 10001 }, false},
		{"io weight too big", func(u *UnitSpec) { u.IOWeight = 10001 }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := good
			tt.modify(&u)
			err := u.validate()
			if tt.ok && err != nil {
				t.Fatalf("got %v, want nil", err)
			}
			if !tt.ok && errcode.Of(err) != errcode.ValidationFailed {
				t.Fatalf("got %v, want a %s error", err, errcode.ValidationFailed)
			}
		})
	}
}

func TestScopeProperties(t *testing.T) {
	props := func(u UnitSpec) map[string]any {
		m := map[string]any{}
		for _, p := range properties(u) {
			m[p.Name] = p.Value.Value()
		}
		return m
	}
	minimal := props(UnitSpec{Name: "otherix-vm-a1.scope", PIDs: []int{42, 43}})
	want := map[string]any{
		"Description":      "otherix VM otherix-vm-a1",
		"Slice":            DefaultSlice,
		"PIDs":             []uint32{42, 43},
		"CPUAccounting":    true,
		"MemoryAccounting": true,
		"TasksAccounting":  true,
		"IOAccounting":     true,
		"CollectMode":      "inactive-or-failed",
	}
	if len(minimal) != len(want) {
		t.Errorf("got %d properties %v, want %d", len(minimal), minimal, len(want))
	}
	for k, v := range want {
		if got := godbus.MakeVariant(minimal[k]).String(); got != godbus.MakeVariant(v).String() {
			t.Errorf("%s: got %s, want %s", k, got, godbus.MakeVariant(v).String())
		}
	}

	sized := props(UnitSpec{Name: "otherix-vm-a1.scope", PIDs: []int{42}, Slice: "vms.slice",
		MemoryMaxBytes: 2 << 30, CPUWeight: 300, CPUQuotaPercent: 150, IOWeight: 50, TasksMax: 512, Description: "otherix VM web-1"})
	for k, v := range map[string]any{
		"Slice":              "vms.slice",
		"Description":        "otherix VM web-1",
		"MemoryMax":          uint64(2 << 30),
		"CPUWeight":          uint64(300),
		"CPUQuotaPerSecUSec": uint64(1500000),
		"MemorySwapMax":      uint64(0),
		"IOWeight":           uint64(50),
		"TasksMax":           uint64(512),
	} {
		if got := godbus.MakeVariant(sized[k]).String(); got != godbus.MakeVariant(v).String() {
			t.Errorf("%s: got %s, want %s", k, got, godbus.MakeVariant(v).String())
		}
	}
}

func TestProcessGroupPlacer(t *testing.T) {
	var p Placer = ProcessGroupPlacer{}
	ctx := context.Background()
	if p.Kind() != KindProcessGroup {
		t.Errorf("Kind() = %q", p.Kind())
	}
	if err := p.Place(ctx, UnitSpec{Name: ScopeName("a1"), PIDs: []int{1234}}); err != nil {
		t.Errorf("Place: %v", err)
	}
	if err := p.Place(ctx, UnitSpec{Name: "bad", PIDs: []int{1234}}); errcode.Of(err) != errcode.ValidationFailed {
		t.Errorf("Place(bad name) = %v, want %s", err, errcode.ValidationFailed)
	}
	if err := p.Remove(ctx, ScopeName("a1")); err != nil {
		t.Errorf("Remove: %v", err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if err := p.Remove(cancelled, ScopeName("a1")); errcode.Of(err) != errcode.Cancelled {
		t.Errorf("Remove(cancelled) = %v, want %s", err, errcode.Cancelled)
	}
}

// TestDetectPlacerHere checks the choice made on the machine running the
// test and that it is logged. The systemd side is covered in the
// container by TestSystemdInContainer.
func TestDetectPlacerHere(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	p := DetectPlacer(context.Background(), zap.New(core))
	if c, ok := p.(interface{ Close() error }); ok {
		defer c.Close()
	}
	want := KindProcessGroup
	if booted() {
		want = KindScope // may still fall back if D-Bus is unreachable
	}
	entries := logs.FilterFieldKey("placement").All()
	if len(entries) != 1 {
		t.Fatalf("got %d placement log entries, want 1: %v", len(entries), logs.All())
	}
	logged := entries[0].ContextMap()["placement"]
	if logged != p.Kind() {
		t.Errorf("logged placement %v, placer kind %q", logged, p.Kind())
	}
	if want == KindProcessGroup && p.Kind() != KindProcessGroup {
		t.Errorf("without systemd as PID 1: got %q, want %q", p.Kind(), want)
	}
	t.Logf("placement on this machine: %s (%s)", p.Kind(), entries[0].Message)
}
