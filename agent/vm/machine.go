package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/otherix/otherix-agent/agent/crashpoint"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/guestagent"
	"github.com/otherix/otherix-agent/agent/tpm"
	"github.com/otherix/otherix-agent/internal/atomicfile"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// machine is the single owner of one VM.
type machine struct {
	e    *Engine
	name string // never changes
	dir  string // state dir: vm.json, console.log, qemu.log
	run  string // runtime dir: qmp.sock, qemu.pid
	log  *zap.Logger

	mu   sync.Mutex
	st   state
	busy string   // the op in progress, "" when idle
	proc *process // the running QEMU, nil when none

	pendingTPM *tpm.Process // a swtpm started for a launch in progress

	watchers sync.WaitGroup // watch goroutines of its QEMUs
}

func (m *machine) paths() Paths {
	return Paths{
		QMPSocket:  filepath.Join(m.run, "qmp.sock"),
		QGASocket:  filepath.Join(m.run, "qga.sock"),
		ConsoleLog: filepath.Join(m.dir, "console.log"),
	}
}

func (m *machine) acquire(op string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.busy != "" {
		return errcode.New(errcode.Conflict, "vm %q is busy: %s in progress", m.st.Spec.Name, m.busy)
	}
	if m.st.Status == "deleting" && op != "delete" {
		return errcode.New(errcode.Conflict, "vm %q is being deleted", m.st.Spec.Name)
	}
	m.busy = op
	return nil
}

func (m *machine) release() {
	m.mu.Lock()
	m.busy = ""
	m.mu.Unlock()
}

func (m *machine) view() View {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.viewLocked()
}

func (m *machine) viewLocked() View {
	var guest []guestagent.Interface
	if m.proc != nil {
		guest = slices.Clone(m.proc.guest)
	}
	return View{
		Guest:       guest,
		Spec:        m.st.Spec,
		Status:      m.st.Status,
		Reason:      m.st.Reason,
		PID:         m.st.PID,
		StartedAt:   m.st.StartedAt,
		CreatedAt:   m.st.CreatedAt,
		UpdatedAt:   m.st.UpdatedAt,
		Record:      m.st.Record.clone(),
		ConsolePath: m.paths().ConsoleLog,
		QGASocket:   m.paths().QGASocket,
		Next:        m.st.Next,
	}
}

// updateRecord changes the record with fn and persists it; a failed
// write leaves the record as it was.
func (m *machine) updateRecord(fn func(*Record)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.st.Status == "deleting" || m.st.Status == "deleted" {
		return errcode.New(errcode.NotFound, "vm %q is being deleted", m.name)
	}
	old := m.st.Record
	r := old.clone()
	fn(&r)
	m.st.Record = r
	if err := m.persistLocked(); err != nil {
		m.st.Record = old
		return errcode.Wrap(errcode.Internal, err, "persist vm record")
	}
	return nil
}

func (m *machine) persistLocked() error {
	m.st.UpdatedAt = time.Now().UTC()
	b, err := json.MarshalIndent(&m.st, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(m.dir, "vm.json"), b, 0o600)
}

// setStatus records a status change, persists it and notifies.
func (m *machine) setStatus(status, reason string) {
	m.mu.Lock()
	m.setStatusLocked(status, reason)
	v := m.viewLocked()
	m.mu.Unlock()
	m.notify(v)
}

func (m *machine) setStatusLocked(status, reason string) {
	m.st.Status = status
	m.st.Reason = reason
	if err := m.persistLocked(); err != nil {
		m.log.Error("persist vm state", zap.Error(err))
	}
}

func (m *machine) notify(v View) {
	if m.e.cfg.OnChange != nil {
		m.e.cfg.OnChange(v)
	}
}

func (m *machine) current() (*process, string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.proc, m.st.Status
}

// qmpCtx bounds one QMP call by the op's context and a short deadline.
func qmpCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, 10*time.Second)
}

func (m *machine) start(ctx context.Context) error {
	if p, _ := m.current(); p != nil {
		return nil // running or paused: start is idempotent
	}
	return m.launch(ctx)
}

func (m *machine) stop(ctx context.Context) error {
	p, status := m.current()
	if p == nil {
		return errcode.New(errcode.Conflict, "vm %q is not running (status %s)", m.st.Spec.Name, status)
	}
	if status == "paused" {
		// A frozen guest cannot react to the power button.
		c, cancel := qmpCtx(ctx)
		err := p.mon.Execute(c, "cont", nil, nil)
		cancel()
		if err != nil && !p.isExited() {
			return errcode.Wrap(errcode.Internal, err, "resume before stop")
		}
	}
	m.setStatus("stopping", "")
	p.expectExit("stopped")
	p.graceful.Store(true)

	timeout := time.NewTimer(m.e.cfg.StopTimeout)
	defer timeout.Stop()
	tick := time.NewTicker(m.e.cfg.PowerdownInterval)
	defer tick.Stop()
	press := func() {
		c, cancel := qmpCtx(ctx)
		defer cancel()
		if err := p.mon.Execute(c, "system_powerdown", nil, nil); err != nil && !p.isExited() {
			m.log.Debug("system_powerdown", zap.Error(err))
		}
	}
	press()
	crashpoint.Hit("stop.pressed")
	for {
		select {
		case <-p.reaped:
			if v := m.view(); v.Status == "crashed" {
				// QEMU was killed (or the guest panicked) while the guest
				// was shutting down: the stop did not power it off.
				return errcode.New(errcode.Internal, "vm %q did not power off: %s", v.Spec.Name, v.Reason)
			}
			return nil
		case <-tick.C:
			press()
		case <-timeout.C:
			return m.abortStop(p, errcode.New(errcode.StopTimeout, "vm %q did not power off within %s", m.st.Spec.Name, m.e.cfg.StopTimeout))
		case <-ctx.Done():
			return m.abortStop(p, errcode.Wrap(errcode.Cancelled, ctx.Err(), "stop of vm %q interrupted", m.st.Spec.Name))
		}
	}
}

// abortStop returns a VM whose guest ignored the power button to running.
func (m *machine) abortStop(p *process, err error) error {
	if !p.unexpectExit() {
		<-p.reaped // it exited just now after all
		return nil
	}
	p.graceful.Store(false)
	m.mu.Lock()
	if m.proc == p {
		m.setStatusLocked("running", err.Error())
	}
	v := m.viewLocked()
	m.mu.Unlock()
	m.notify(v)
	return err
}

func (m *machine) poweroff(ctx context.Context) error {
	p, status := m.current()
	if p == nil {
		return errcode.New(errcode.Conflict, "vm %q is not running (status %s)", m.st.Spec.Name, status)
	}
	return m.kill(ctx, p, "powered off")
}

// kill ends QEMU: quit, then SIGKILL after the grace period.
func (m *machine) kill(ctx context.Context, p *process, reason string) error {
	p.expectExit(reason)
	m.setStatus("stopping", "")
	c, cancel := qmpCtx(ctx)
	err := p.mon.Execute(c, "quit", nil, nil)
	cancel()
	if err != nil && !p.isExited() {
		m.log.Debug("quit", zap.Error(err))
	}
	grace := time.NewTimer(m.e.cfg.PoweroffGrace)
	defer grace.Stop()
	select {
	case <-p.reaped:
		return nil
	case <-grace.C:
	case <-ctx.Done():
	}
	m.log.Warn("qemu lingered after quit, sending SIGKILL", zap.Int("qemu_pid", p.pid))
	if err := p.sigkill(); err != nil {
		m.log.Warn("sigkill", zap.Error(err))
	}
	select {
	case <-p.reaped:
		return nil
	case <-time.After(10 * time.Second):
		return errcode.New(errcode.Internal, "qemu pid %d did not exit after SIGKILL", p.pid)
	}
}

func (m *machine) reset(ctx context.Context) error {
	p, status := m.current()
	if p == nil {
		return errcode.New(errcode.Conflict, "vm %q is not running (status %s)", m.st.Spec.Name, status)
	}
	c, cancel := qmpCtx(ctx)
	defer cancel()
	if err := p.mon.Execute(c, "system_reset", nil, nil); err != nil {
		return errcode.Wrap(errcode.Internal, err, "system_reset")
	}
	return nil
}

func (m *machine) pause(ctx context.Context) error {
	p, status := m.current()
	if p == nil || status != "running" {
		return errcode.New(errcode.Conflict, "vm %q cannot be paused: status %s", m.st.Spec.Name, status)
	}
	c, cancel := qmpCtx(ctx)
	defer cancel()
	if err := p.mon.Execute(c, "stop", nil, nil); err != nil {
		return errcode.Wrap(errcode.Internal, err, "qmp stop")
	}
	m.setRunState(p, "paused")
	return nil
}

func (m *machine) resume(ctx context.Context) error {
	p, status := m.current()
	if p == nil || status != "paused" {
		return errcode.New(errcode.Conflict, "vm %q cannot be resumed: status %s", m.st.Spec.Name, status)
	}
	c, cancel := qmpCtx(ctx)
	defer cancel()
	if err := p.mon.Execute(c, "cont", nil, nil); err != nil {
		return errcode.Wrap(errcode.Internal, err, "qmp cont")
	}
	m.setRunState(p, "running")
	return nil
}

// setRunState records running/paused for the current process only. It is
// not persisted: QEMU is the source of truth for it, and re-adoption asks
// QMP (query-status), so a pause costs no disk write.
func (m *machine) setRunState(p *process, status string) {
	m.mu.Lock()
	if m.proc != p {
		m.mu.Unlock()
		return
	}
	m.st.Status, m.st.Reason = status, ""
	m.st.UpdatedAt = time.Now().UTC()
	v := m.viewLocked()
	m.mu.Unlock()
	m.notify(v)
}

func (m *machine) delete(ctx context.Context) error {
	if p, _ := m.current(); p != nil {
		if err := m.kill(ctx, p, "deleted"); err != nil {
			return err
		}
	}
	crashpoint.Hit("delete.killed")
	m.setStatus("deleting", "")
	var errs []error
	for _, path := range m.st.Spec.OwnedPaths {
		if err := os.RemoveAll(path); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(m.run); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return errcode.Wrap(errcode.Internal, errors.Join(errs...), "remove vm files")
	}
	if err := os.RemoveAll(m.dir); err != nil {
		return errcode.Wrap(errcode.Internal, err, "remove vm state")
	}
	m.mu.Lock()
	m.st.Status = "deleted"
	m.mu.Unlock()
	m.log.Info("vm deleted")
	return nil
}

// detach closes the QMP connection and stops watching, leaving QEMU running.
// What is attached to QEMU (runtime.go) is closed: the agent's own
// followers of it stop with the agent.
func (m *machine) detach() {
	m.mu.Lock()
	p := m.proc
	var attached []io.Closer
	if p != nil {
		attached = p.takeAttachedLocked()
	}
	m.mu.Unlock()
	closeAll(attached)
	if p != nil {
		p.detach()
	}
	// A watch already recording an exit finishes first: nothing of the
	// VM is written, and no exit reported, after Close.
	m.watchers.Wait()
}

func (m *machine) String() string { return fmt.Sprintf("vm %s", m.st.Spec.Name) }
