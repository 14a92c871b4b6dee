package vm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/proc"
	"github.com/otherix/otherix-agent/agent/tpm"
)

// Recover loads every persisted VM and re-adopts running QEMU processes
// (pidfile + QMP reconnect). It never starts a second QEMU for a VM; a VM
// whose QEMU is gone is marked crashed (or stopped when it was stopping).
// An interrupted delete is finished.
func (e *Engine) Recover(ctx context.Context) error {
	dir := filepath.Join(e.cfg.StateDir, "vms")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	known := map[string]bool{}
	for _, ent := range entries {
		if !ent.IsDir() {
			continue
		}
		st, err := loadState(filepath.Join(dir, ent.Name(), "vm.json"))
		if err != nil {
			// Never delete what we cannot read; an operator looks at it.
			e.log.Error("skip unreadable vm state", zap.String("dir", ent.Name()), zap.Error(err))
			continue
		}
		if st.Spec.UUID != ent.Name() {
			e.log.Error("skip vm state in the wrong dir", zap.String("dir", ent.Name()))
			continue
		}
		m := e.newMachine(st.Spec)
		m.st = *st
		e.mu.Lock()
		e.vms[st.Spec.Name] = m
		e.uuid[st.Spec.UUID] = m
		e.mu.Unlock()
		known[ShortID(st.Spec.UUID)] = true
		if st.Status == "deleting" {
			m.adopt(ctx)
			if err := e.Delete(ctx, st.Spec.Name); err != nil {
				m.log.Error("finish interrupted delete", zap.Error(err))
			}
			continue
		}
		m.adopt(ctx)
	}
	// Remove tap and macvtap links no running VM owns (macvtaps of VMs that
	// stopped while the agent was down, links of a half-made start).
	keep := map[string]bool{}
	for _, v := range e.List() {
		if v.PID != 0 {
			for _, l := range linkNames(v.Spec) {
				keep[l] = true
			}
		}
	}
	if gone, err := netdev.Sweep(keep); err != nil {
		e.log.Warn("sweep network links", zap.Error(err))
	} else if len(gone) > 0 {
		e.log.Info("removed leftover network links", zap.Strings("links", gone))
	}
	// Sweep runtime dirs of VMs that no longer exist.
	if runs, err := os.ReadDir(e.cfg.RunDir); err == nil {
		for _, r := range runs {
			if r.IsDir() && len(r.Name()) == 12 && !known[r.Name()] {
				os.RemoveAll(filepath.Join(e.cfg.RunDir, r.Name()))
			}
		}
	}
	return nil
}

func (m *machine) adopt(ctx context.Context) {
	m.mu.Lock()
	pid := m.st.PID
	uuid := m.st.Spec.UUID
	was := m.st.Status
	m.mu.Unlock()
	if pid == 0 {
		if b, err := os.ReadFile(filepath.Join(m.run, "qemu.pid")); err == nil {
			pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		}
	}
	if pid <= 0 || !isOurQEMU(pid, uuid) {
		m.releaseHostDevices()
		switch was {
		case "stopped", "crashed", "error":
			if pid != 0 {
				m.mu.Lock()
				m.st.PID = 0
				m.persistLocked()
				m.mu.Unlock()
			}
		case "stopping":
			m.setGone("stopped", "qemu exited while the agent was down")
		default:
			if m.e.cfg.HostBooted {
				m.setGone("stopped", ReasonHostRebooted)
			} else {
				m.setGone("crashed", "qemu exited while the agent was down")
			}
		}
		return
	}
	sp, err := proc.Adopt(pid, func(pid int) bool { return isOurQEMU(pid, uuid) })
	if errors.Is(err, proc.ErrNotOurs) { // the PID died and was reused in between
		m.releaseHostDevices()
		m.setGone("crashed", "qemu exited while the agent was down")
		return
	}
	if err != nil {
		m.setStatus("error", "cannot track qemu pid "+strconv.Itoa(pid)+": "+err.Error())
		return
	}
	p := newProcess(m, sp)
	c, cancel := context.WithTimeout(ctx, m.e.cfg.StartTimeout)
	defer cancel()
	mon, err := m.dialUntil(c, p, m.paths().QMPSocket)
	if err != nil {
		p.detach()
		m.setStatus("error", "qemu pid "+strconv.Itoa(pid)+" is running but its QMP socket does not answer: "+err.Error())
		return
	}
	p.mon = mon
	evs, _ := mon.Subscribe(64)
	go p.events(evs)
	var qs struct {
		Status string `json:"status"`
	}
	status, reason := "running", ""
	if err := mon.Execute(c, "query-status", nil, &qs); err == nil {
		if r, paused := p.pauseReason(qs.Status); paused {
			status, reason = "paused", r
			if qs.Status == "io-error" {
				reason = m.ioErrorReason(c, mon)
			}
		}
	}
	m.mu.Lock()
	m.proc = p
	m.st.PID = pid
	if m.st.StartedAt.IsZero() {
		m.st.StartedAt = time.Now().UTC()
	}
	m.setStatusLocked(status, reason)
	v := m.viewLocked()
	m.mu.Unlock()
	m.watchers.Add(1)
	go p.watch()
	if st := v.Spec.TPM; st != nil {
		if tp := tpm.FindRunning(st.State, tpm.SocketPath(st.State)); tp != nil {
			p.tpm = tp
			go p.watchTPM()
		} else {
			m.mu.Lock()
			m.st.Reason = "swtpm is not running: the guest's TPM is gone"
			m.mu.Unlock()
			m.log.Error("re-adopted qemu has no swtpm")
		}
	}
	if err := m.e.cfg.Placer.Place(ctx, v); err != nil {
		m.log.Warn("place re-adopted qemu", zap.Error(err))
	}
	m.log.Info("re-adopted qemu", zap.Int("qemu_pid", pid), zap.String("status", status))
	m.notify(v)
}

func (m *machine) setGone(status, reason string) {
	m.mu.Lock()
	m.st.PID = 0
	m.setStatusLocked(status, reason)
	v := m.viewLocked()
	m.mu.Unlock()
	m.log.Warn("qemu gone", zap.String("status", status), zap.String("reason", reason))
	m.notify(v)
}
