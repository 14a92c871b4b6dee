package vm

import (
	"context"
	"fmt"
	"sync"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// HostDevices passes host devices through to VMs: package hostdev's *Host.
// It keeps no record of which VM holds what: a VM holds the devices of
// its State.HostPlan (a running or starting QEMU's), a create in progress
// those its Reservation holds (alloc.go).
type HostDevices interface {
	// Resolve checks a spec's devices against the host and against held,
	// what the other VMs and creates hold (device_not_found,
	// iommu_unavailable, device_busy), and picks the concrete resources.
	Resolve(ctx context.Context, vmUUID string, s *hostdev.Spec, held hostdev.Holders) (*hostdev.Plan, error)
	// Acquire readies them for QEMU (vfio-pci binding, mdevs, group nodes
	// given to the QEMU user) and records what it did in p.
	Acquire(ctx context.Context, p *hostdev.Plan, qemu *hostdev.Owner) error
	// Release undoes Acquire once QEMU has exited; twice is harmless.
	Release(p *hostdev.Plan) error
}

// acquireHostDevices resolves, claims and acquires the spec's host devices
// for a start and persists the plan, so that Release runs when QEMU
// exits, even after an agent restart. It returns nil when the spec has
// none. The claim is the plan becoming the VM's HostPlan, in the same
// allocMu step as the check against every other VM and create; Acquire
// then works on its own copy, which replaces the claimed one once done.
func (m *machine) acquireHostDevices(ctx context.Context, spec *Spec, cred *syscall.Credential) (*hostdev.Plan, error) {
	if spec.HostDevices.Empty() {
		return nil, nil
	}
	hd := m.e.cfg.HostDevices
	if hd == nil {
		return nil, errcode.New(errcode.ValidationFailed, "vm %q has host devices, and this agent passes none through", spec.Name)
	}
	p, err := m.claimHostDevices(ctx, hd, spec)
	if err != nil {
		return nil, err
	}
	var owner *hostdev.Owner
	if c := cred; c != nil {
		owner = &hostdev.Owner{UID: int(c.Uid), GID: int(c.Gid)}
	}
	if err := hd.Acquire(ctx, p, owner); err != nil {
		m.forgetHostPlan()
		return nil, err
	}
	m.mu.Lock()
	m.st.HostPlan = p
	err = m.persistLocked()
	m.mu.Unlock()
	if err != nil {
		if rerr := hd.Release(p); rerr != nil {
			m.log.Error("release host devices", zap.Error(rerr))
		}
		m.forgetHostPlan()
		return nil, errcode.Wrap(errcode.Internal, err, "persist host devices")
	}
	m.log.Info("host devices acquired", zap.Strings("devices", p.Keys()))
	return p, nil
}

// claimHostDevices resolves the spec's devices against what every other
// VM and create holds and makes them the VM's (in memory: its HostPlan,
// a copy of the plan returned), as one step under allocMu.
func (m *machine) claimHostDevices(ctx context.Context, hd HostDevices, spec *Spec) (*hostdev.Plan, error) {
	m.e.allocMu.Lock()
	defer m.e.allocMu.Unlock()
	p, err := hd.Resolve(ctx, spec.UUID, spec.HostDevices, m.e.usedLocked().devs)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	m.st.HostPlan = p.Clone()
	m.mu.Unlock()
	return p, nil
}

// forgetHostPlan drops the VM's claim on its host devices and persists
// that.
func (m *machine) forgetHostPlan() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.st.HostPlan != nil {
		m.st.HostPlan = nil
		if err := m.persistLocked(); err != nil {
			m.log.Error("persist released host devices", zap.Error(err))
		}
	}
}

// releaseHostDevices gives back the host devices of a QEMU that exited (or
// never started): Release first (on a copy: the plan stays the VM's, as
// read by others, until then), then the plan is forgotten, so a crash in
// between releases again at the next recovery.
func (m *machine) releaseHostDevices() {
	m.mu.Lock()
	p := m.st.HostPlan
	q := p.Clone()
	m.mu.Unlock()
	if p == nil {
		return
	}
	if hd := m.e.cfg.HostDevices; hd != nil {
		if err := hd.Release(q); err != nil {
			m.log.Error("release host devices", zap.Error(err))
		}
	} else {
		m.log.Error("vm holds host devices and this agent passes none through: not released", zap.Strings("devices", p.Keys()))
	}
	m.mu.Lock()
	if m.st.HostPlan == p {
		m.st.HostPlan = nil
		m.persistLocked()
	}
	m.mu.Unlock()
	m.log.Info("host devices released", zap.Strings("devices", p.Keys()))
}

// memlockMu serializes starts that raise the agent's RLIMIT_MEMLOCK for
// QEMU to inherit.
var memlockMu sync.Mutex

// startMemlock runs start (which forks QEMU) with RLIMIT_MEMLOCK raised to
// at least bytes, and restores the agent's own limit after. VFIO pins the
// guest's RAM; QEMU runs unprivileged and cannot raise its limit itself,
// and Go's exec has no per-child rlimit, so the child inherits it from the
// agent at fork. Other children forked in the same instant inherit it too;
// the limit only allows locking memory, never allocating it. Under the
// systemd unit (LimitMEMLOCK=infinity) there is nothing to raise; an agent
// whose hard limit is too low and that lacks CAP_SYS_RESOURCE gets an
// error saying so.
func startMemlock(bytes uint64, start func() error) error {
	memlockMu.Lock()
	defer memlockMu.Unlock()
	var old unix.Rlimit
	if err := unix.Prlimit(0, unix.RLIMIT_MEMLOCK, nil, &old); err != nil {
		return fmt.Errorf("read RLIMIT_MEMLOCK: %w", err)
	}
	if old.Cur >= bytes { // RLIM_INFINITY is the largest value
		return start()
	}
	raised := unix.Rlimit{Cur: bytes, Max: max(bytes, old.Max)}
	if err := unix.Prlimit(0, unix.RLIMIT_MEMLOCK, &raised, nil); err != nil {
		return fmt.Errorf("vfio pins the guest's memory: qemu needs RLIMIT_MEMLOCK >= %d bytes, the agent's hard limit is %d and it cannot raise it (%v): run the agent with LimitMEMLOCK=infinity, as dist/otherix-agent.service does",
			bytes, old.Max, err)
	}
	defer unix.Prlimit(0, unix.RLIMIT_MEMLOCK, &old, nil)
	return start()
}
