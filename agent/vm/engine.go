package vm

import (
	"context"
	"errors"
	"fmt"
	"github.com/otherix/otherix-agent/agent/crashpoint"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/agent/guestagent"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/qmp"
)

// Monitor is the part of a QMP connection the engine uses. *qmp.Client
// implements it; tests may substitute qmp/qmptest servers behind a real
// client.
type Monitor interface {
	Execute(ctx context.Context, cmd string, args, out any) error
	Subscribe(n int) (<-chan qmp.Event, func())
	Done() <-chan struct{}
	Close() error
}

// Placer puts a freshly started QEMU process where it survives the agent
// (a systemd scope) and removes that place when the VM stops. The default
// keeps QEMU in its own process group and does nothing else.
type Placer interface {
	Place(ctx context.Context, v View) error
	Remove(ctx context.Context, v View) error
	Kind() string
}

// Config configures an Engine.
type Config struct {
	// StateDir holds vms/<uuid>/{vm.json,console.log,qemu.log}. Required.
	StateDir string
	// RunDir is a short runtime root for sockets: <RunDir>/<shortid>/.
	// Unix socket paths are limited to 108 bytes. Required.
	RunDir string
	// Binaries maps arch to the QEMU binary (defaults: qemu-system-x86_64,
	// qemu-system-aarch64, looked up in PATH).
	Binaries map[string]string
	// Accel is "kvm" or "tcg"; empty picks kvm when /dev/kvm is usable.
	Accel string
	// StopTimeout bounds a graceful stop (default 60s).
	StopTimeout time.Duration
	// PowerdownInterval is how often system_powerdown is re-sent during a
	// graceful stop: a press before the guest's ACPI daemon runs is lost
	// (default 2s).
	PowerdownInterval time.Duration
	// PoweroffGrace is how long QEMU may linger after quit before SIGKILL
	// (default 5s).
	PoweroffGrace time.Duration
	// StartTimeout bounds QEMU start until QMP answers (default 30s).
	StartTimeout time.Duration
	// Credential is the unprivileged user QEMU runs as (nil: the agent's
	// own user). QEMU needs no access to any file: the agent opens them.
	// With UIDs, each VM gets a uid and gid of its own instead and keeps
	// Credential's supplementary groups (kvm).
	Credential *syscall.Credential
	// UIDs, when set, is the block of ids VMs' QEMUs run as, one per VM
	// (persisted with it).
	UIDs *UIDRange
	// HostDevices passes host devices through (nil: a VM with host
	// devices fails to start with validation_failed).
	HostDevices HostDevices
	// SWTPM is the swtpm binary (default "swtpm").
	SWTPM string
	// Env is QEMU's whole environment (default: PATH and LANG only). It
	// must never carry NOTIFY_SOCKET.
	Env []string
	// Dial opens a QMP connection (default qmp.Dial).
	Dial func(ctx context.Context, path string) (Monitor, error)
	// Placer (default: process groups only).
	Placer Placer
	// AfterStart, when set, runs once QMP answers after every start, with
	// a way to run QMP commands (e.g. set the VNC password). An error
	// fails the start and QEMU is stopped.
	AfterStart func(ctx context.Context, v View, exec func(ctx context.Context, cmd string, args any) error) error
	// OnGuestAgent, when set, is called when the guest's qemu-guest-agent
	// opens (true) or closes (false) its channel (QMP VSERPORT_CHANGE).
	// View.QGASocket is its socket. It must not block.
	OnGuestAgent func(v View, up bool)
	// OnRunState, when set, is called when QEMU changed a guest's run
	// state on its own: event RunStatePaused (an I/O error with the stop
	// policy, a guest panic; reason says which), RunStateResumed, or
	// RunStateIOError (a disk error reported to the guest). A VM's event
	// history records these. It must not block.
	OnRunState func(v View, event, reason string)
	// ExitCause, when set, is asked why a VM's QEMU exited, before the
	// exit is recorded (with the VM's view, its PID still set); a
	// non-empty answer (e.g. the memory cap's OOM kill) is added to the
	// crash reason. It must answer quickly.
	ExitCause func(View) string
	// HostBooted tells Recover that the host booted since the VMs' state
	// was written: a VM whose QEMU is gone then went with the host and is
	// stopped (ReasonHostRebooted), not crashed.
	HostBooted bool
	// OnChange, when set, is called after every persisted status change.
	// It must not block.
	OnChange func(View)
	Logger   *zap.Logger
}

// ReasonHostRebooted is the status reason of a VM whose QEMU went with a
// host reboot (Config.HostBooted).
const ReasonHostRebooted = "host rebooted"

// View is a snapshot of one VM.
type View struct {
	Spec        Spec
	Status      string
	Reason      string
	PID         int
	StartedAt   time.Time
	CreatedAt   time.Time
	UpdatedAt   time.Time
	Record      Record
	ConsolePath string
	QGASocket   string // the guest agent's socket while QEMU runs
	// Next is the spec the VM gets at its next start, when it differs.
	Next *Spec
	// Guest is what the guest agent last reported of the running guest's
	// interfaces (Engine.SetGuestInterfaces); nil when QEMU does not run.
	Guest []guestagent.Interface
}

// Engine owns the VMs of this host.
type Engine struct {
	cfg Config
	log *zap.Logger

	mu       sync.Mutex
	vms      map[string]*machine     // by name
	uuid     map[string]*machine     // by uuid
	reserved map[string]*Reservation // creates in progress, by uuid

	// allocMu makes each derivation of the host-wide allocations and the
	// change it allows one step (alloc.go). Lock order: allocMu, a
	// machine's mu, e.mu.
	allocMu sync.Mutex
}

// maxSocketPath is sun_path's size on Linux, including the NUL.
const maxSocketPath = 108

// New returns an engine. Call Recover before serving to re-adopt VMs.
func New(cfg Config) (*Engine, error) {
	if cfg.StateDir == "" || cfg.RunDir == "" {
		return nil, errors.New("vm: StateDir and RunDir are required")
	}
	if !filepath.IsAbs(cfg.StateDir) || !filepath.IsAbs(cfg.RunDir) {
		return nil, errors.New("vm: StateDir and RunDir must be absolute")
	}
	if n := len(filepath.Join(cfg.RunDir, "0123456789ab", "qmp.sock")); n >= maxSocketPath {
		return nil, fmt.Errorf("vm: runtime dir %q too long: socket paths would be %d bytes, the limit is %d", cfg.RunDir, n, maxSocketPath-1)
	}
	if cfg.Binaries == nil {
		cfg.Binaries = map[string]string{}
	}
	if cfg.Binaries[ArchAMD64] == "" {
		cfg.Binaries[ArchAMD64] = "qemu-system-x86_64"
	}
	if cfg.Binaries[ArchARM64] == "" {
		cfg.Binaries[ArchARM64] = "qemu-system-aarch64"
	}
	if cfg.Accel == "" {
		cfg.Accel = DetectAccel()
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = 60 * time.Second
	}
	if cfg.PowerdownInterval <= 0 {
		cfg.PowerdownInterval = 2 * time.Second
	}
	if cfg.PoweroffGrace <= 0 {
		cfg.PoweroffGrace = 5 * time.Second
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = 30 * time.Second
	}
	if cfg.Env == nil {
		cfg.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C"}
	}
	if cfg.Dial == nil {
		cfg.Dial = func(ctx context.Context, path string) (Monitor, error) {
			return qmp.Dial(ctx, path, qmp.WithLogger(cfg.Logger))
		}
	}
	if cfg.Placer == nil {
		cfg.Placer = processGroupPlacer{}
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	for _, d := range []string{filepath.Join(cfg.StateDir, "vms"), cfg.RunDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("vm: %w", err)
		}
	}
	return &Engine{cfg: cfg, log: cfg.Logger, vms: map[string]*machine{}, uuid: map[string]*machine{}, reserved: map[string]*Reservation{}}, nil
}

// DetectAccel returns "kvm" when KVM can really run guests here, else
// "tcg". /dev/kvm opening is not enough: under some nested hypervisors it
// opens and answers ioctls while the CPU lacks hardware virtualization, and
// every guest then dies with "KVM internal error". So on x86 the CPU must
// also advertise vmx or svm.
func DetectAccel() string {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "tcg"
	}
	defer f.Close()
	const kvmGetAPIVersion = 0xAE00
	v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	if err != nil || v != 12 {
		return "tcg"
	}
	if runtime.GOARCH == "amd64" || runtime.GOARCH == "386" {
		b, err := os.ReadFile("/proc/cpuinfo")
		if err != nil {
			return "tcg"
		}
		for _, line := range strings.Split(string(b), "\n") {
			if !strings.HasPrefix(line, "flags") {
				continue
			}
			for _, fl := range strings.Fields(line) {
				if fl == "vmx" || fl == "svm" {
					return "kvm"
				}
			}
			return "tcg"
		}
		return "tcg"
	}
	return "kvm"
}

// Accel reports the accelerator in use.
func (e *Engine) Accel() string { return e.cfg.Accel }

// Binary returns the QEMU binary for arch.
func (e *Engine) Binary(arch string) string { return e.cfg.Binaries[arch] }

// Placement reports how QEMU processes are kept alive across agent restarts.
func (e *Engine) Placement() string { return e.cfg.Placer.Kind() }

func (e *Engine) vmDir(uuid string) string { return filepath.Join(e.cfg.StateDir, "vms", uuid) }

func (e *Engine) lookup(name string) (*machine, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	m := e.vms[name]
	if m == nil {
		return nil, errcode.New(errcode.NotFound, "vm %q not found", name)
	}
	return m, nil
}

// Define registers a new VM in status stopped and persists it with rec
// (nil: an empty record). Its MACs and VNC port must be free of every
// other VM and create (conflict, port_in_use); a create's Reservation of
// the same uuid is taken over: its name, MACs and port are the VM's now.
func (e *Engine) Define(ctx context.Context, spec Spec, rec *Record) (View, error) {
	if err := spec.Validate(); err != nil {
		return View{}, err
	}
	e.allocMu.Lock()
	defer e.allocMu.Unlock()
	if err := e.usedLocked().check(&spec); err != nil {
		return View{}, err
	}
	e.mu.Lock()
	if _, ok := e.vms[spec.Name]; ok {
		e.mu.Unlock()
		return View{}, errcode.New(errcode.Conflict, "vm %q already exists", spec.Name)
	}
	if _, ok := e.uuid[spec.UUID]; ok {
		e.mu.Unlock()
		return View{}, errcode.New(errcode.Conflict, "a vm with uuid %s already exists", spec.UUID)
	}
	for _, r := range e.reserved {
		if r.name == spec.Name && r.uuid != spec.UUID {
			e.mu.Unlock()
			return View{}, errcode.New(errcode.Conflict, "vm %q is being created", spec.Name)
		}
	}
	m := e.newMachine(spec)
	now := time.Now().UTC()
	m.st = state{Spec: spec, Status: "stopped", CreatedAt: now, UpdatedAt: now}
	if rec != nil {
		m.st.Record = rec.clone()
	}
	if err := e.assignUIDLocked(m); err != nil {
		e.mu.Unlock()
		return View{}, err
	}
	e.vms[spec.Name] = m
	e.uuid[spec.UUID] = m
	e.mu.Unlock()

	if err := os.MkdirAll(m.dir, 0o700); err != nil {
		e.forget(m)
		return View{}, errcode.Wrap(errcode.Internal, err, "create vm dir")
	}
	m.mu.Lock()
	err := m.persistLocked()
	v := m.viewLocked()
	m.mu.Unlock()
	if err != nil {
		os.RemoveAll(m.dir)
		e.forget(m)
		return View{}, errcode.Wrap(errcode.Internal, err, "persist vm")
	}
	e.mu.Lock()
	delete(e.reserved, spec.UUID) // taken over
	e.mu.Unlock()
	m.log.Info("vm defined")
	return v, nil
}

func (e *Engine) forget(m *machine) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.vms[m.st.Spec.Name] == m {
		delete(e.vms, m.st.Spec.Name)
	}
	if e.uuid[m.st.Spec.UUID] == m {
		delete(e.uuid, m.st.Spec.UUID)
	}
}

func (e *Engine) newMachine(spec Spec) *machine {
	return &machine{
		e:    e,
		name: spec.Name,
		dir:  e.vmDir(spec.UUID),
		run:  filepath.Join(e.cfg.RunDir, ShortID(spec.UUID)),
		log:  e.log.With(zap.String("vm", spec.Name), zap.String("vm_uuid", spec.UUID)),
	}
}

func (e *Engine) lookupUUID(uuid string) (*machine, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	m := e.uuid[uuid]
	if m == nil {
		return nil, errcode.New(errcode.NotFound, "vm %s not found", uuid)
	}
	return m, nil
}

// Get returns a VM's view.
func (e *Engine) Get(name string) (View, error) {
	m, err := e.lookup(name)
	if err != nil {
		return View{}, err
	}
	return m.view(), nil
}

// GetByUUID returns a VM's view by uuid.
func (e *Engine) GetByUUID(uuid string) (View, error) {
	m, err := e.lookupUUID(uuid)
	if err != nil {
		return View{}, err
	}
	return m.view(), nil
}

// List returns every VM, sorted by name.
func (e *Engine) List() []View {
	e.mu.Lock()
	ms := make([]*machine, 0, len(e.vms))
	for _, m := range e.vms {
		ms = append(ms, m)
	}
	e.mu.Unlock()
	out := make([]View, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.view())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Spec.Name < out[j].Spec.Name })
	return out
}

// Update changes a VM's spec with fn. A VM that does not run gets the
// change at once; a running one at its next start (View.Pending says so).
// The changed spec is validated; the name, uuid and arch cannot change.
func (e *Engine) Update(ctx context.Context, name string, fn func(*Spec)) (View, error) {
	return e.UpdateAlloc(ctx, name, func(s *Spec, _ *Alloc) error { fn(s); return nil })
}

// UpdateAlloc is Update with a way to pick host-wide resources (a VNC
// port) for the change: fn may refuse it with an error, which changes
// nothing. The changed spec's MACs and VNC port must be free of every
// other VM and create (conflict, port_in_use).
func (e *Engine) UpdateAlloc(ctx context.Context, name string, fn func(*Spec, *Alloc) error) (View, error) {
	return e.op(ctx, name, "update", func(m *machine) error { return m.update(fn) })
}

// update is UpdateAlloc's change, the VM's op held.
func (m *machine) update(fn func(*Spec, *Alloc) error) error {
	m.e.allocMu.Lock()
	defer m.e.allocMu.Unlock()
	u := m.e.usedLocked()
	m.mu.Lock()
	defer m.mu.Unlock()
	base := m.st.Spec
	if m.st.Next != nil {
		base = *m.st.Next
	}
	next := base
	next.Disks = append([]Disk(nil), base.Disks...)
	next.NICs = append([]NIC(nil), base.NICs...)
	if err := fn(&next, &Alloc{id: base.UUID, u: u, self: m}); err != nil {
		return err
	}
	if next.Name != base.Name || next.UUID != base.UUID || next.Arch != base.Arch {
		return errcode.New(errcode.ValidationFailed, "name, uuid and arch cannot change")
	}
	if err := next.Validate(); err != nil {
		return err
	}
	if err := u.check(&next); err != nil {
		return err
	}
	if m.proc != nil {
		m.st.Next = &next
	} else {
		m.st.Spec, m.st.Next = next, nil
	}
	return m.persistLocked()
}

// UpdateRecord changes a VM's record with fn and persists it, under the
// VM's lock: concurrent updates of different fields never lose one
// another. It does not wait for an op in progress (a task's last_task is
// recorded while the next op runs); a change that must be atomic with an
// op is made in a Txn (Engine.Do). fn must not call the engine.
func (e *Engine) UpdateRecord(name string, fn func(*Record)) error {
	m, err := e.lookup(name)
	if err != nil {
		return err
	}
	return m.updateRecord(fn)
}

// UpdateRecordVolatile is UpdateRecord without a write: the change is kept
// in memory and reaches vm.json with the VM's next persisted change. For
// what a crash may lose, e.g. the last task of a pause (a sync op then
// writes nothing to vm.json).
func (e *Engine) UpdateRecordVolatile(name string, fn func(*Record)) error {
	m, err := e.lookup(name)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.st.Record.clone()
	fn(&r)
	m.st.Record = r
	return nil
}

// Close detaches from every VM (closes QMP connections) and leaves QEMU
// processes running. The agent shutting down never stops VMs.
func (e *Engine) Close() {
	e.mu.Lock()
	ms := make([]*machine, 0, len(e.vms))
	for _, m := range e.vms {
		ms = append(ms, m)
	}
	e.mu.Unlock()
	for _, m := range ms {
		m.detach()
	}
}

// op runs fn as the VM's single owner; a VM already busy answers conflict.
func (e *Engine) op(ctx context.Context, name, op string, fn func(m *machine) error) (View, error) {
	m, err := e.lookup(name)
	if err != nil {
		return View{}, err
	}
	if err := m.acquire(op); err != nil {
		return m.view(), err
	}
	defer m.release()
	log := m.log.With(zap.String("op", op))
	log.Debug("op begin")
	before, _ := m.current()
	err = fn(m)
	v := m.view()
	switch after, _ := m.current(); {
	case err != nil:
		log.Info("op failed", zap.String("code", string(errcode.Of(err))), zap.Error(err))
	case after != before:
		// A QEMU started or ended: its pid is news.
		log.Info("op done", zap.String("status", v.Status), zap.Int("qemu_pid", v.PID))
	default:
		// Pause, resume, reset, a change: the task's own lines (runner:
		// task started, task finished) and the VM's event say it.
		log.Debug("op done", zap.String("status", v.Status), zap.Int("qemu_pid", v.PID))
	}
	return v, err
}

// Start boots a VM. Starting a running or paused VM is a no-op (idempotent).
func (e *Engine) Start(ctx context.Context, name string) (View, error) {
	return e.op(ctx, name, "start", func(m *machine) error { return m.start(ctx) })
}

// Stop shuts the guest down through ACPI (system_powerdown, re-sent at
// intervals) and waits for QEMU to exit. After the stop timeout it fails
// with stop_timeout and leaves the VM running.
func (e *Engine) Stop(ctx context.Context, name string) (View, error) {
	return e.op(ctx, name, "stop", func(m *machine) error { return m.stop(ctx) })
}

// Poweroff is a hard power-off: QMP quit, then SIGKILL if QEMU lingers.
func (e *Engine) Poweroff(ctx context.Context, name string) (View, error) {
	return e.op(ctx, name, "poweroff", func(m *machine) error { return m.poweroff(ctx) })
}

// Reboot is a graceful stop and a start: the QEMU PID changes.
func (e *Engine) Reboot(ctx context.Context, name string) (View, error) {
	return e.op(ctx, name, "reboot", func(m *machine) error {
		if err := m.stop(ctx); err != nil {
			return err
		}
		crashpoint.Hit("reboot.stopped")
		return m.start(ctx)
	})
}

// Reset presses the reset button (system_reset); the PID stays.
func (e *Engine) Reset(ctx context.Context, name string) (View, error) {
	return e.op(ctx, name, "reset", func(m *machine) error { return m.reset(ctx) })
}

// Pause freezes the vCPUs (QMP stop).
func (e *Engine) Pause(ctx context.Context, name string) (View, error) {
	return e.op(ctx, name, "pause", func(m *machine) error { return m.pause(ctx) })
}

// Resume continues a paused VM (QMP cont).
func (e *Engine) Resume(ctx context.Context, name string) (View, error) {
	return e.op(ctx, name, "resume", func(m *machine) error { return m.resume(ctx) })
}

// Delete powers the VM off if needed and removes every file of it.
func (e *Engine) Delete(ctx context.Context, name string) error {
	_, err := e.Do(ctx, name, "delete", func(t *Txn) error { return t.Delete(ctx) })
	return err
}

// QMP runs one QMP command on a running VM (screenshots and the like).
func (e *Engine) QMP(ctx context.Context, name, cmd string, args, out any) error {
	m, err := e.lookup(name)
	if err != nil {
		return err
	}
	p, status := m.current()
	if p == nil || p.mon == nil {
		return errcode.New(errcode.Conflict, "vm %q is not running (status %s)", name, status)
	}
	return p.mon.Execute(ctx, cmd, args, out)
}

// RunDir is the engine's runtime root.
func (e *Engine) RunDir() string { return e.cfg.RunDir }
