package vm

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/guestagent"
	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/agent/proc"
	"github.com/otherix/otherix-agent/agent/tpm"
	"github.com/otherix/otherix-agent/agent/vnc"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/qmp"
)

// process is one incarnation of a VM's QEMU: from start (or adoption) to
// exit. A reboot makes a new one.
type process struct {
	m   *machine
	sp  *proc.Process // the supervised QEMU
	pid int
	mon Monitor

	reaped   chan struct{} // closed after the VM's state records the exit
	detached chan struct{} // closed when the engine lets go of it
	detach1  sync.Once

	mu           sync.Mutex
	expect       bool   // an op asked QEMU to exit
	expectReason string // status reason to record for an expected exit

	ioErr       string    // the reason of a pending I/O error stop (BLOCK_IO_ERROR, then STOP)
	ioErrLogged time.Time // when an error reported to the guest was last logged

	guestShutdown atomic.Bool
	guestPanic    atomic.Bool  // GUEST_PANICKED, or SHUTDOWN for a guest panic
	graceful      atomic.Bool  // a graceful stop expects the exit
	links         []string     // macvtap links to delete when QEMU exits
	tpm           *tpm.Process // the VM's swtpm, when it has a TPM

	// Runtime state (runtime.go), guarded by m.mu.
	guest    []guestagent.Interface
	attached map[string]io.Closer
}

func newProcess(m *machine, sp *proc.Process) *process {
	return &process{
		m: m, sp: sp, pid: sp.PID(),
		reaped:   make(chan struct{}),
		detached: make(chan struct{}),
	}
}

// exited is closed when QEMU is gone.
func (p *process) exited() <-chan struct{} { return p.sp.Done() }

func (p *process) isExited() bool { return p.sp.Exited() }

func (p *process) expectExit(reason string) {
	p.mu.Lock()
	p.expect, p.expectReason = true, reason
	p.mu.Unlock()
}

// unexpectExit withdraws an expected exit. It returns false when QEMU has
// already exited, in which case the exit stays expected.
func (p *process) unexpectExit() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.isExited() {
		return false
	}
	p.expect, p.expectReason = false, ""
	return true
}

func (p *process) sigkill() error { return p.sp.Kill() }

// events follows QMP events of this incarnation.
func (p *process) events(ch <-chan qmp.Event) {
	var resets rebootFilter
	for ev := range ch {
		switch ev.Name {
		case "SHUTDOWN":
			g, _ := ev.Data["guest"].(bool)
			switch reason, _ := ev.Data["reason"].(string); {
			case reason == "guest-panic":
				p.guestPanic.Store(true)
			case g && reason != "guest-reset":
				p.guestShutdown.Store(true)
			}
		case "GUEST_PANICKED":
			p.guestPanic.Store(true)
		case "RESET":
			at := ev.Timestamp
			if at.IsZero() {
				at = time.Now()
			}
			g, _ := ev.Data["guest"].(bool)
			if resets.reset(at, g) && p.m.e.cfg.OnRunState != nil {
				p.m.e.cfg.OnRunState(p.m.view(), RunStateGuestReboot, "")
			}
		case "BLOCK_IO_ERROR":
			p.onBlockIOError(ev.Data)
		case "STOP":
			p.onStop()
		case "RESUME":
			p.onResume()
		case "VSERPORT_CHANGE":
			if id, _ := ev.Data["id"].(string); id == "qgaport" && p.m.e.cfg.OnGuestAgent != nil {
				open, _ := ev.Data["open"].(bool)
				p.m.e.cfg.OnGuestAgent(p.m.view(), open)
			}
		}
	}
}

// watch records the exit of QEMU in the VM's state.
func (p *process) watch() {
	defer p.m.watchers.Done()
	select {
	case <-p.exited():
	case <-p.detached:
		return
	}
	m := p.m
	if p.mon != nil {
		p.mon.Close()
	}

	cause := ""
	if f := m.e.cfg.ExitCause; f != nil {
		cause = f(m.view())
	}
	m.mu.Lock()
	if m.proc == p {
		m.proc = nil
		m.st.PID = 0
		m.setStatusLocked(p.exitStatus(cause))
	}
	attached := p.takeAttachedLocked()
	v := m.viewLocked()
	m.mu.Unlock()
	closeAll(attached)

	m.removeRunFiles()
	links := p.links
	if links == nil { // adopted: the links are named by the spec
		for _, l := range linkNames(v.Spec) {
			if strings.HasPrefix(l, netdev.MacvtapPrefix) {
				links = append(links, l)
			}
		}
	}
	deleteLinks(links)
	if p.tpm != nil {
		p.tpm.Release() // swtpm exits with QEMU (--terminate)
	}
	m.releaseHostDevices()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if err := m.e.cfg.Placer.Remove(ctx, v); err != nil {
		m.log.Warn("remove placement", zap.Error(err))
	}
	cancel()
	lvl := m.log.Info
	if v.Status == "crashed" {
		lvl = m.log.Warn
	}
	lvl("qemu exited", zap.Int("qemu_pid", p.pid), zap.String("status", v.Status), zap.String("reason", v.Reason))
	close(p.reaped)
	m.notify(v)
}

// exitStatus is the status and reason an exited QEMU leaves its VM in:
// stopped when an op asked for the exit or the guest powered off, else
// crashed, with how QEMU ended (p.sp.Exit()) and cause, when the
// placement knows one (Config.ExitCause).
func (p *process) exitStatus(cause string) (status, reason string) {
	p.mu.Lock()
	expect, why := p.expect, p.expectReason
	p.mu.Unlock()
	exit := p.sp.Exit()
	switch {
	case p.guestPanic.Load():
		return "crashed", "guest kernel panicked (pvpanic)"
	case expect && p.graceful.Load() && exit.Signaled() && !p.guestShutdown.Load():
		// Killed while the guest was shutting down: not a clean power-off.
		return "crashed", "qemu " + exit.String() + " during a graceful stop"
	case expect:
		return "stopped", why
	case p.guestShutdown.Load():
		return "stopped", "guest powered off"
	}
	reason = "qemu " + exit.String()
	if cause != "" {
		reason += ": " + cause
	}
	return "crashed", reason
}

func (p *process) detach() {
	p.detach1.Do(func() {
		close(p.detached)
		if p.mon != nil {
			p.mon.Close()
		}
		p.sp.Release()
	})
}

// launch starts QEMU for the VM and waits until QMP answers.
func (m *machine) launch(ctx context.Context) (err error) {
	spec, prevStatus, err := m.takeNextSpec()
	if err != nil {
		return err
	}
	paths := m.paths()
	if err := m.ensureUID(); err != nil {
		return err
	}
	cred := m.cred()
	hostPlan, err := m.acquireHostDevices(ctx, &spec, cred)
	if err != nil {
		m.setStatus(prevStatus, "start failed: "+errcode.MessageOf(err))
		return err
	}
	if hostPlan != nil {
		// Until QEMU runs, a failed start gives the devices back; once it
		// runs, its exit does (watch).
		defer func() {
			if err != nil {
				m.releaseHostDevices()
			}
		}()
	}
	args, specs, err := BuildArgs(&spec, paths, Platform{Accel: m.e.cfg.Accel, HostDevices: hostPlan})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(m.run, 0o700); err != nil {
		return errcode.Wrap(errcode.Internal, err, "runtime dir")
	}
	// A failed start leaves no socket or pid file (the console log stays,
	// for what QEMU said); once QEMU runs, its exit removes them (watch).
	defer func() {
		if err != nil {
			m.removeRunFiles()
		}
	}()
	logf, logPath, err := m.openQEMULog()
	if err != nil {
		return err
	}
	m.setStatus("starting", "")
	fail := func(code errcode.Code, err error, what string) error {
		e := errcode.Wrap(code, err, "%s", what)
		if tail := proc.Tail(logPath, 0, 2048); tail != "" {
			e.Message += "; qemu said: " + tail
		}
		m.setStatus(prevStatus, "start failed: "+e.Message)
		return e
	}
	var forwards []portfwd.Rule
	for _, n := range spec.NICs {
		forwards = append(forwards, n.Forwards...)
	}
	if err := portfwd.CheckFree(ctx, forwards); err != nil {
		logf.Close()
		m.setStatus(prevStatus, "start failed: "+errcode.MessageOf(err))
		return err
	}
	files, links, err := m.openFiles(ctx, specs, spec.NICs)
	if err != nil {
		logf.Close()
		if c := errcode.Of(err); c != errcode.Internal {
			m.setStatus(prevStatus, "start failed: "+errcode.MessageOf(err))
			return err
		}
		return fail(errcode.QEMUStartFailed, err, "open vm files")
	}
	pc := proc.Cmd{Path: m.e.cfg.Binaries[spec.Arch], Args: args, Env: m.e.cfg.Env, Output: logf, Files: files, Credential: cred}
	if hostPlan != nil && len(hostPlan.VFIO) > 0 {
		memlock := hostdev.MemlockBytes(spec.MemoryMB)
		pc.Launch = func(start func() error) error { return startMemlock(memlock, start) }
	}
	p, what, err := m.spawn(pc, links)
	if err != nil {
		return fail(errcode.QEMUStartFailed, err, what)
	}
	if code, what, err := m.connect(ctx, p, paths.QMPSocket); err != nil {
		p.sigkill()
		<-p.exited()
		deleteLinks(p.links)
		if p.tpm != nil {
			p.tpm.Release()
		}
		if p.mon != nil {
			p.mon.Close()
		}
		if c, w, ok := vncTaken(&spec, code); ok {
			code, what = c, w
		}
		return fail(code, err, what)
	}
	m.running(ctx, p)
	return nil
}

// removeRunFiles removes what a QEMU of the VM leaves in its runtime dir
// once it has exited: its sockets and its pid file.
func (m *machine) removeRunFiles() {
	for _, f := range []string{"qmp.sock", "qga.sock", "qemu.pid"} {
		os.Remove(filepath.Join(m.run, f))
	}
}

// vncTaken tells a start that failed because another process holds the
// VM's VNC port: QEMU exits at once when it cannot bind it ("Failed to
// find an available port: Address already in use"). The engine keeps its
// VMs' and creates' ports apart (alloc.go), but anything else on the host
// may take one, before a start or between a create's pick and QEMU's
// bind. Call it once QEMU has exited, so that the port is not its own:
// then port_in_use, else ok is false.
func vncTaken(spec *Spec, code errcode.Code) (errcode.Code, string, bool) {
	v := spec.VNC
	if code != errcode.QEMUStartFailed || v == nil {
		return "", "", false
	}
	if !errcode.Is(vnc.CheckPort(v.Listen, v.Port), errcode.PortInUse) {
		return "", "", false
	}
	return errcode.PortInUse, fmt.Sprintf("vnc port %d on %s is in use by another process", v.Port, v.Listen), true
}

// takeNextSpec makes the pending changes (Next) the spec QEMU starts
// with, and hot-plugged disks boot disks. It refuses a VM whose earlier
// QEMU still runs out of the engine's hands. prevStatus is the status a
// failed start returns the VM to.
func (m *machine) takeNextSpec() (spec Spec, prevStatus string, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.st.Hot, m.st.MediumSeq = nil, 0 // hot-plugged disks are boot disks now
	if m.st.Next != nil {
		m.st.Spec, m.st.Next = *m.st.Next, nil
		if err := m.persistLocked(); err != nil {
			return Spec{}, "", errcode.Wrap(errcode.Internal, err, "persist pending changes")
		}
	}
	spec = m.st.Spec
	if m.st.PID != 0 && isOurQEMU(m.st.PID, spec.UUID) {
		return Spec{}, "", errcode.New(errcode.Conflict, "vm %q still has a qemu process (pid %d) the agent cannot control", spec.Name, m.st.PID)
	}
	return spec, m.st.Status, nil
}

// openQEMULog opens QEMU's stderr: one file per start, the previous one
// kept as qemu.log.1 (QEMU writes little there: warnings and the reason
// it could not start, which start errors quote).
func (m *machine) openQEMULog() (*os.File, string, error) {
	logPath := filepath.Join(m.dir, "qemu.log")
	if fi, err := os.Stat(logPath); err == nil && fi.Size() > 0 {
		os.Rename(logPath, logPath+".1")
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, "", errcode.Wrap(errcode.Internal, err, "qemu log")
	}
	return logf, logPath, nil
}

// spawn starts QEMU under the supervisor and closes the agent's copies of
// its log and files. In a process group of its own (proc.Start): a signal
// to the agent's group (Ctrl-C, the service manager) never reaches QEMU.
// The credential drops root: QEMU runs as the unprivileged QEMU user with
// no supplementary groups and no capabilities, holding only the
// descriptors the agent opened for it. On error the links and the swtpm
// made for it are gone, and what says what could not start as whom.
func (m *machine) spawn(pc proc.Cmd, links []string) (p *process, what string, err error) {
	sp, err := proc.Start(pc)
	pc.Output.Close()
	for _, f := range pc.Files {
		f.Close() // QEMU has its copies; a listening socket stays bound
	}
	if err != nil {
		deleteLinks(links)
		m.stopTPM()
		who := "the agent's user"
		if pc.Credential != nil {
			who = fmt.Sprintf("uid %d", pc.Credential.Uid)
		}
		return nil, fmt.Sprintf("start qemu (%s) as %s", pc.Path, who), err
	}
	p = newProcess(m, sp)
	p.links = links
	m.mu.Lock()
	p.tpm, m.pendingTPM = m.pendingTPM, nil
	m.mu.Unlock()
	m.log.Info("qemu launched", zap.Int("qemu_pid", p.pid), zap.String("binary", pc.Path))
	writePIDFile(filepath.Join(m.run, "qemu.pid"), p.pid)
	return p, "", nil
}

// connect waits, within the start timeout, until QEMU's QMP answers,
// follows its events and runs the AfterStart hook. On error it says
// with which code and what failed; QEMU is the caller's to end.
func (m *machine) connect(ctx context.Context, p *process, sock string) (errcode.Code, string, error) {
	startCtx, cancel := context.WithTimeout(ctx, m.e.cfg.StartTimeout)
	defer cancel()
	mon, err := m.dialUntil(startCtx, p, sock)
	if err != nil {
		return errcode.QEMUStartFailed, "qemu did not come up", err
	}
	p.mon = mon
	evs, _ := mon.Subscribe(64)
	go p.events(evs)
	var st struct {
		Status string `json:"status"`
	}
	if err := mon.Execute(startCtx, "query-status", nil, &st); err != nil {
		return errcode.QEMUStartFailed, "query-status", err
	}
	if f := m.e.cfg.AfterStart; f != nil {
		m.mu.Lock()
		v := m.viewLocked()
		m.mu.Unlock()
		v.PID = p.pid
		exec := func(ctx context.Context, cmd string, args any) error { return mon.Execute(ctx, cmd, args, nil) }
		if err := f(startCtx, v, exec); err != nil {
			return errcode.Of(err), "after start", err
		}
	}
	return "", "", nil
}

// running records a started QEMU as the VM's, follows its exit (and its
// swtpm's) and places it.
func (m *machine) running(ctx context.Context, p *process) {
	m.mu.Lock()
	m.proc = p
	m.st.PID = p.pid
	m.st.StartedAt = time.Now().UTC()
	m.setStatusLocked("running", "")
	v := m.viewLocked()
	m.mu.Unlock()
	m.watchers.Add(1)
	go p.watch()
	if p.tpm != nil {
		go p.watchTPM()
	}
	if err := m.e.cfg.Placer.Place(ctx, v); err != nil {
		m.log.Warn("place qemu", zap.Int("qemu_pid", p.pid), zap.String("placer", m.e.cfg.Placer.Kind()), zap.Error(err))
	}
	m.notify(v)
}

// openFiles opens what QEMU inherits, in fd order, making each NIC's tap
// or macvtap. It returns the macvtap links made (they outlive QEMU and are
// deleted when it exits). On error nothing stays open or made.
func (m *machine) openFiles(ctx context.Context, specs []FileSpec, nics []NIC) (files []*os.File, links []string, err error) {
	defer func() {
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			deleteLinks(links)
			files, links = nil, nil
			m.stopTPM()
		}
	}()
	for _, s := range specs {
		switch s.Kind {
		case FileListen:
			f, err := listenUnix(s.Path)
			if err != nil {
				return files, links, err
			}
			files = append(files, f)
		case FileTPM:
			f, err := m.startTPM(ctx, s.Path)
			if err != nil {
				return files, links, err
			}
			files = append(files, f)
		case FileTap:
			n := nics[s.Index]
			a, err := netdev.Create(ctx, ShortID(m.st.Spec.UUID), netdev.NICRequest{Index: s.Index, Type: n.Type, Bridge: n.Bridge, Parent: n.Parent, MAC: n.MAC})
			if err != nil {
				return files, links, err
			}
			if n.Type == NICMACVLAN {
				links = append(links, a.Name)
			}
			files = append(files, a.File)
		case FileDevice, FileDeviceWrite:
			// O_NOCTTY: a device that is a terminal (a TPM behind a pty)
			// must not become the controlling terminal of the agent's
			// session, or QEMU, in a background group of it, is stopped
			// (SIGTTIN) when it reads the device, and the agent gets
			// SIGHUP when it hangs up.
			f, err := os.OpenFile(s.Path, s.Kind.OpenFlags()|syscall.O_CLOEXEC|syscall.O_NOFOLLOW|syscall.O_NOCTTY, 0)
			if err != nil {
				return files, links, hostdev.OpenError(s.Path, err)
			}
			files = append(files, f)
		default:
			f, err := os.OpenFile(s.Path, s.Kind.OpenFlags()|syscall.O_CLOEXEC|syscall.O_NOFOLLOW, 0o600)
			if err != nil {
				return files, links, err
			}
			files = append(files, f)
		}
	}
	return files, links, nil
}

// startTPM starts the VM's swtpm (as the QEMU user) and returns a
// connection to it for QEMU to inherit. swtpm runs with --terminate: it
// exits when QEMU's connection closes.
func (m *machine) startTPM(ctx context.Context, state string) (*os.File, error) {
	// swtpm's socket and pid file live in its own state directory (the
	// QEMU user's): swtpm reopens its pid file by path, and the VM's
	// runtime dir is root's.
	cfg := tpm.Config{StateDir: state, RunDir: state, Binary: m.e.cfg.SWTPM, Env: m.e.cfg.Env}
	if c := m.cred(); c != nil {
		cfg.Owner = &tpm.Owner{UID: c.Uid, GID: c.Gid}
	}
	tp, err := tpm.Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	m.pendingTPM = tp
	m.mu.Unlock()
	return tp.Connect(ctx)
}

// stopTPM stops a swtpm started for a launch that failed.
func (m *machine) stopTPM() {
	m.mu.Lock()
	tp := m.pendingTPM
	m.pendingTPM = nil
	m.mu.Unlock()
	if tp != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		tp.Stop(ctx)
		cancel()
	}
}

// watchTPM reports a swtpm that dies under a running QEMU: the guest
// loses its TPM, QEMU goes on.
func (p *process) watchTPM() {
	select {
	case <-p.tpm.Done():
	case <-p.exited():
		return
	case <-p.detached:
		return
	}
	select {
	case <-p.exited(): // it followed QEMU out (--terminate)
		return
	case <-time.After(500 * time.Millisecond):
	}
	m := p.m
	m.mu.Lock()
	if m.proc == p {
		m.st.Reason = "swtpm " + p.tpm.ExitDescription() + ": the guest's TPM is gone"
		m.persistLocked()
	}
	v := m.viewLocked()
	m.mu.Unlock()
	m.log.Error("swtpm died under a running qemu", zap.String("reason", v.Reason))
	m.notify(v)
}

// deleteLinks removes macvtap links; a tap needs nothing (it dies with its
// last descriptor).
func deleteLinks(names []string) {
	for _, n := range names {
		netdev.Delete(n)
	}
}

// linkNames lists the link names of a spec's tap and macvtap NICs.
func linkNames(s Spec) []string {
	var out []string
	for i, n := range s.NICs {
		if n.Type == NICBridge || n.Type == NICMACVLAN {
			if name, err := netdev.LinkName(n.Type, ShortID(s.UUID), i); err == nil {
				out = append(out, name)
			}
		}
	}
	return out
}

// listenUnix binds a unix socket (0600 in the VM's 0700 runtime dir) and
// returns the listening descriptor for QEMU. The path stays bound after the
// agent closes its copy, so a restarted agent reconnects by path.
func listenUnix(path string) (*os.File, error) {
	os.Remove(path)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	defer l.Close()
	if err := os.Chmod(path, 0o600); err != nil {
		return nil, err
	}
	return l.File()
}

func writePIDFile(path string, pid int) {
	_ = os.WriteFile(path, []byte(strconv.Itoa(pid)+"\n"), 0o600)
}

// dialUntil connects to QMP, retrying while QEMU creates its socket.
func (m *machine) dialUntil(ctx context.Context, p *process, path string) (Monitor, error) {
	var last error
	for {
		if p.isExited() {
			return nil, fmt.Errorf("qemu %s", p.sp.Exit())
		}
		c, cancel := context.WithTimeout(ctx, 5*time.Second)
		mon, err := m.e.cfg.Dial(c, path)
		cancel()
		if err == nil {
			return mon, nil
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (last error: %v)", ctx.Err(), last)
		case <-p.exited():
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// isOurQEMU reports whether pid is a live (not zombie) process whose
// command line carries this VM's uuid: a pidfile alone can name a reused PID.
func isOurQEMU(pid int, uuid string) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	if i := bytes.LastIndexByte(stat, ')'); i < 0 || i+2 >= len(stat) || stat[i+2] == 'Z' || stat[i+2] == 'X' {
		return false
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	return bytes.Contains(cmdline, []byte("\x00-uuid\x00"+uuid+"\x00"))
}

type processGroupPlacer struct{}

func (processGroupPlacer) Place(context.Context, View) error  { return nil }
func (processGroupPlacer) Remove(context.Context, View) error { return nil }
func (processGroupPlacer) Kind() string                       { return "process-group" }
