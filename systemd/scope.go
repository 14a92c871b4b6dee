package systemd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	godbus "github.com/godbus/dbus/v5"
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// D-Bus error names systemd returns.
const (
	errNoSuchUnit = "org.freedesktop.systemd1.NoSuchUnit"
	errUnitExists = "org.freedesktop.systemd1.UnitExists"
	errNotLoaded  = "org.freedesktop.systemd1.NotLoaded"
)

// ScopePlacer puts each VM in its own transient systemd scope
// (StartTransientUnit with the PIDs of the running QEMU), so a restart, stop
// or crash of the agent's service leaves the VM running. It talks to PID 1
// over its private socket (root) or the system bus, and reconnects when the
// connection drops (for example when dbus-daemon restarts).
type ScopePlacer struct {
	log *zap.Logger

	mu     sync.Mutex
	conn   *sddbus.Conn
	cancel context.CancelFunc // ends conn's context
	via    string             // "private socket" or "system bus", for logs
}

var _ Placer = (*ScopePlacer)(nil)

// NewScopePlacer connects to systemd and checks it answers. ctx bounds
// only the connecting; the connection lives until Close.
func NewScopePlacer(ctx context.Context, log *zap.Logger) (*ScopePlacer, error) {
	if log == nil {
		log = zap.NewNop()
	}
	p := &ScopePlacer{log: log}
	conn, err := p.connection(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := conn.SystemStateContext(ctx); err != nil {
		p.Close()
		return nil, fmt.Errorf("systemd: query system state: %w", err)
	}
	return p, nil
}

// Kind returns KindScope.
func (*ScopePlacer) Kind() string { return KindScope }

// Close drops the D-Bus connection; a later call reconnects.
func (p *ScopePlacer) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dropLocked()
	return nil
}

func (p *ScopePlacer) dropLocked() {
	if p.conn != nil {
		p.conn.Close()
		p.conn = nil
	}
	if p.cancel != nil {
		p.cancel()
		p.cancel = nil
	}
}

// connection returns the live connection, connecting first if needed.
func (p *ScopePlacer) connection(ctx context.Context) (*sddbus.Conn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn != nil && p.conn.Connected() {
		return p.conn, nil
	}
	p.dropLocked()
	// As root, PID 1's private socket works without dbus-daemon; otherwise
	// (or if it fails) the system bus.
	type dialer struct {
		via  string
		dial func(context.Context) (*sddbus.Conn, error)
	}
	dials := []dialer{{"system bus", sddbus.NewSystemConnectionContext}}
	if os.Geteuid() == 0 {
		dials = append([]dialer{{"private socket", sddbus.NewSystemdConnectionContext}}, dials...)
	}
	var errs []error
	for _, d := range dials {
		conn, cancel, err := dialFor(ctx, d.dial)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", d.via, err))
			continue
		}
		p.conn, p.cancel, p.via = conn, cancel, d.via
		return conn, nil
	}
	return nil, fmt.Errorf("systemd: connect to D-Bus API: %w", errors.Join(errs...))
}

// dialFor connects with dial. A godbus connection closes when the context
// it was made with ends, so it gets a context of its own (cancel ends it);
// ctx, the caller's, only bounds the connecting.
func dialFor(ctx context.Context, dial func(context.Context) (*sddbus.Conn, error)) (*sddbus.Conn, context.CancelFunc, error) {
	life, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, cancel)
	conn, err := dial(life)
	if err == nil {
		// Job completion (JobRemoved) reaches the signal connection only
		// when it is subscribed; on the private socket nothing else
		// routes signals to it.
		if err = conn.Subscribe(); err != nil {
			conn.Close()
			err = fmt.Errorf("subscribe: %w", err)
		}
	}
	if !stop() && err == nil { // ctx ended while connecting
		conn.Close()
		err = ctx.Err()
	}
	if err != nil {
		cancel()
		return nil, nil, err
	}
	return conn, cancel, nil
}

// properties builds the StartTransientUnit properties of the scope.
func properties(u UnitSpec) []sddbus.Property {
	slice := u.Slice
	if slice == "" {
		slice = DefaultSlice
	}
	pids := make([]uint32, len(u.PIDs))
	for i, pid := range u.PIDs {
		pids[i] = uint32(pid)
	}
	props := []sddbus.Property{
		sddbus.PropDescription(describe(u)),
		sddbus.PropSlice(slice),
		sddbus.PropPids(pids...),
		{Name: "CPUAccounting", Value: godbus.MakeVariant(true)},
		{Name: "MemoryAccounting", Value: godbus.MakeVariant(true)},
		{Name: "TasksAccounting", Value: godbus.MakeVariant(true)},
		{Name: "IOAccounting", Value: godbus.MakeVariant(true)},
		// A scope that ends failed (killed on timeout, OOM) is collected
		// anyway, so its name is free for the VM's next start.
		{Name: "CollectMode", Value: godbus.MakeVariant("inactive-or-failed")},
	}
	if u.MemoryMaxBytes > 0 {
		// Without swap off, a VM at its cap would swap instead of being
		// stopped, and slow down the whole host.
		props = append(props,
			sddbus.Property{Name: "MemoryMax", Value: godbus.MakeVariant(u.MemoryMaxBytes)},
			sddbus.Property{Name: "MemorySwapMax", Value: godbus.MakeVariant(uint64(0))})
	}
	if u.CPUWeight > 0 {
		props = append(props, sddbus.Property{Name: "CPUWeight", Value: godbus.MakeVariant(u.CPUWeight)})
	}
	if u.CPUQuotaPercent > 0 {
		// CPUQuota=100% is one second of CPU time per second.
		props = append(props, sddbus.Property{Name: "CPUQuotaPerSecUSec", Value: godbus.MakeVariant(u.CPUQuotaPercent * 10000)})
	}
	if u.IOWeight > 0 {
		props = append(props, sddbus.Property{Name: "IOWeight", Value: godbus.MakeVariant(u.IOWeight)})
	}
	if u.TasksMax > 0 {
		props = append(props, sddbus.Property{Name: "TasksMax", Value: godbus.MakeVariant(u.TasksMax)})
	}
	return props
}

// Place creates the scope u.Name holding u.PIDs and waits until systemd has
// moved them. If the scope already exists and already holds u.PIDs[0], Place
// succeeds without doing anything; any other existing scope of that name is
// a conflict.
func (p *ScopePlacer) Place(ctx context.Context, u UnitSpec) error {
	if err := u.validate(); err != nil {
		return err
	}
	conn, err := p.connection(ctx)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "place %s", u.Name)
	}
	done := make(chan string, 1)
	_, err = conn.StartTransientUnitContext(ctx, u.Name, "fail", properties(u), done)
	if err != nil {
		if dbusErrorIs(err, errUnitExists) {
			return p.checkOwner(ctx, conn, u)
		}
		return p.callErr(ctx, err, "place %s", u.Name)
	}
	select {
	case res := <-done:
		if res != "done" {
			return errcode.New(errcode.Internal, "place %s: start job %s", u.Name, res)
		}
	case <-ctx.Done():
		return errcode.Wrap(errcode.Cancelled, ctx.Err(), "place %s", u.Name)
	}
	p.log.Debug("vm placed in scope", zap.String("unit", u.Name), zap.Int("qemu_pid", u.PIDs[0]))
	return nil
}

// checkOwner handles UnitExists: fine if the scope already holds the VM.
func (p *ScopePlacer) checkOwner(ctx context.Context, conn *sddbus.Conn, u UnitSpec) error {
	owner, err := conn.GetUnitNameByPID(ctx, uint32(u.PIDs[0]))
	if err != nil {
		return errcode.Wrap(errcode.Conflict, err, "place %s: unit exists", u.Name)
	}
	if owner != u.Name {
		return errcode.New(errcode.Conflict, "place %s: unit exists and pid %d is in %s", u.Name, u.PIDs[0], owner)
	}
	return nil
}

// Remove stops the scope (killing what still runs in it) and clears a
// failed state. A scope that does not exist is not an error.
func (p *ScopePlacer) Remove(ctx context.Context, name string) error {
	if err := validUnitName(name, ".scope"); err != nil {
		return err
	}
	conn, err := p.connection(ctx)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "remove %s", name)
	}
	done := make(chan string, 1)
	if _, err := conn.StopUnitContext(ctx, name, "replace", done); err != nil {
		if !dbusErrorIs(err, errNoSuchUnit, errNotLoaded) {
			return p.callErr(ctx, err, "remove %s", name)
		}
	} else {
		select {
		case res := <-done:
			// "done", or "skipped" when it had already stopped.
			if res != "done" && res != "skipped" {
				return errcode.New(errcode.Internal, "remove %s: stop job %s", name, res)
			}
		case <-ctx.Done():
			return errcode.Wrap(errcode.Cancelled, ctx.Err(), "remove %s", name)
		}
	}
	if err := conn.ResetFailedUnitContext(ctx, name); err != nil && !dbusErrorIs(err, errNoSuchUnit, errNotLoaded) {
		return p.callErr(ctx, err, "remove %s: reset failed state", name)
	}
	p.log.Debug("vm scope removed", zap.String("unit", name))
	return nil
}

func (p *ScopePlacer) callErr(ctx context.Context, err error, format string, args ...any) error {
	if ctx.Err() != nil {
		return errcode.Wrap(errcode.Cancelled, err, format, args...)
	}
	return errcode.Wrap(errcode.Internal, err, format, args...)
}

func dbusErrorIs(err error, names ...string) bool {
	var de godbus.Error
	if errors.As(err, &de) {
		for _, n := range names {
			if de.Name == n {
				return true
			}
		}
	}
	var dep *godbus.Error
	if errors.As(err, &dep) {
		for _, n := range names {
			if dep.Name == n {
				return true
			}
		}
	}
	return false
}
