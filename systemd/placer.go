package systemd

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Placement kinds returned by Placer.Kind.
const (
	KindScope        = "systemd-scope"
	KindProcessGroup = "process-group"
)

// DefaultSlice holds every VM scope. A dash in a slice name means nesting
// (a-b.slice lives in a.slice), so the name has none.
const DefaultSlice = "otherix.slice"

// Placer puts already-started VM processes somewhere that outlives the
// agent: a transient systemd scope, or (fallback) nothing beyond the process
// group the engine gave them.
type Placer interface {
	// Place moves unit.PIDs into their own transient scope. Placing a PID
	// that is already in the scope unit.Name is a no-op, so an agent that
	// finds a VM again after a restart may simply place it again.
	Place(ctx context.Context, unit UnitSpec) error
	// Remove stops the scope and resets its failed state. Stopping a scope
	// kills whatever still runs in it. A scope that is already gone is not
	// an error.
	Remove(ctx context.Context, name string) error
	// Kind is KindScope or KindProcessGroup.
	Kind() string
}

// UnitSpec describes the transient scope of one VM.
type UnitSpec struct {
	Name        string // e.g. ScopeName(shortID): otherix-vm-<shortid>.scope
	Description string // shown by systemctl, e.g. "otherix VM web-1 (<uuid>)"
	PIDs        []int  // the QEMU process, already started
	Slice       string // DefaultSlice when empty

	// Optional limits from the VM's size; zero means unset. Accounting
	// (CPU, memory, tasks, IO) is always on.
	MemoryMaxBytes  uint64 // MemoryMax=, with MemorySwapMax=0: a cap swap cannot escape
	CPUWeight       uint64 // CPUWeight=, 1..10000 (systemd's default is 100)
	CPUQuotaPercent uint64 // CPUQuota=, 100 is one full CPU
	IOWeight        uint64 // IOWeight=, 1..10000 (systemd's default is 100)
	TasksMax        uint64 // TasksMax=: processes and threads
}

// ScopeName returns the scope name of the VM with the given short id.
func ScopeName(shortID string) string { return "otherix-vm-" + shortID + ".scope" }

func (u UnitSpec) validate() error {
	if err := validUnitName(u.Name, ".scope"); err != nil {
		return err
	}
	if u.Slice != "" {
		if err := validUnitName(u.Slice, ".slice"); err != nil {
			return err
		}
	}
	if len(u.PIDs) == 0 {
		return errcode.New(errcode.ValidationFailed, "scope %s: no pid to place", u.Name)
	}
	for _, pid := range u.PIDs {
		if pid <= 1 || pid > 1<<22 {
			return errcode.New(errcode.ValidationFailed, "scope %s: invalid pid %d", u.Name, pid)
		}
	}
	if u.CPUWeight > 10000 {
		return errcode.New(errcode.ValidationFailed, "scope %s: cpu weight %d out of 1..10000", u.Name, u.CPUWeight)
	}
	if u.IOWeight > 10000 {
		return errcode.New(errcode.ValidationFailed, "scope %s: io weight %d out of 1..10000", u.Name, u.IOWeight)
	}
	return nil
}

// validUnitName accepts the characters systemd allows in unit names.
func validUnitName(name, suffix string) error {
	prefix, ok := strings.CutSuffix(name, suffix)
	if !ok || prefix == "" || len(name) > 255 {
		return errcode.New(errcode.ValidationFailed, "invalid unit name %q: want <name>%s", name, suffix)
	}
	for _, r := range prefix {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case r == ':' || r == '-' || r == '_' || r == '.' || r == '\\':
		default:
			return errcode.New(errcode.ValidationFailed, "invalid unit name %q: character %q", name, r)
		}
	}
	return nil
}

// DetectPlacer returns a scope placer when systemd is PID 1 (sd_booted(3):
// /run/systemd/system exists) and its D-Bus API answers, else the
// process-group placer. It logs the choice and why.
func DetectPlacer(ctx context.Context, log *zap.Logger) Placer {
	if log == nil {
		log = zap.NewNop()
	}
	if !booted() {
		log.Info("vm placement: process groups; VMs stay in the agent's cgroup",
			zap.String("placement", KindProcessGroup), zap.String("reason", "systemd is not PID 1"))
		return ProcessGroupPlacer{}
	}
	// Bound the probe: a wedged bus must not keep the agent from starting.
	probe, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	p, err := NewScopePlacer(probe, log)
	if err != nil {
		log.Warn("vm placement: process groups; VMs stay in the agent's cgroup",
			zap.String("placement", KindProcessGroup), zap.String("reason", "systemd D-Bus API unreachable"), zap.Error(err))
		return ProcessGroupPlacer{}
	}
	p.mu.Lock()
	via := p.via
	p.mu.Unlock()
	log.Info("vm placement: one transient systemd scope per VM",
		zap.String("placement", KindScope), zap.String("slice", DefaultSlice), zap.String("via", via))
	return p
}

func booted() bool {
	fi, err := os.Lstat("/run/systemd/system")
	return err == nil && fi.IsDir()
}

// ProcessGroupPlacer is the fallback without systemd: the engine starts
// QEMU in its own process group (so signals to the agent's group do not
// reach it) and placement itself does nothing.
type ProcessGroupPlacer struct{}

// Place only checks the spec.
func (ProcessGroupPlacer) Place(ctx context.Context, unit UnitSpec) error {
	if err := unit.validate(); err != nil {
		return err
	}
	return ctxErr(ctx)
}

// Remove does nothing.
func (ProcessGroupPlacer) Remove(ctx context.Context, name string) error { return ctxErr(ctx) }

// Kind returns KindProcessGroup.
func (ProcessGroupPlacer) Kind() string { return KindProcessGroup }

func ctxErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return errcode.Wrap(errcode.Cancelled, err, "vm placement")
	}
	return nil
}

func describe(u UnitSpec) string {
	if u.Description != "" {
		return u.Description
	}
	return fmt.Sprintf("otherix VM %s", strings.TrimSuffix(u.Name, ".scope"))
}
