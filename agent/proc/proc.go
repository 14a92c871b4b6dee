// Package proc supervises the agent's long-lived child processes (QEMU,
// swtpm): each is started in a process group of its own with an explicit
// environment, or adopted by pid after an agent restart, and followed
// through a pidfd until it exits, with how it ended ([Exit]).
//
// A Process never ties its process to the agent: the agent shutting down
// calls Release and the process goes on.
package proc

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Exit is how a process ended.
type Exit struct {
	// Code is the exit status of a process that exited by itself; -1 when
	// a signal ended it or the status is unknown.
	Code int
	// Signal is the signal that ended it; 0 when it exited by itself or
	// the status is unknown.
	Signal syscall.Signal
	// CoreDumped: the signal dumped core.
	CoreDumped bool
	// Unknown: the process was adopted (not the agent's child), so the
	// kernel tells only that it ended, not how.
	Unknown bool
	// Err is a failure to learn the status (wait failed); Code is -1.
	Err error
}

// Signaled reports whether a signal ended the process.
func (e Exit) Signaled() bool { return e.Signal != 0 }

// String says how the process ended: "exit status 1", "killed by signal
// SIGKILL", "exited (adopted process, exit status unknown)".
func (e Exit) String() string {
	switch {
	case e.Unknown:
		return "exited (adopted process, exit status unknown)"
	case e.Signal != 0:
		s := "killed by signal " + unix.SignalName(e.Signal)
		if e.CoreDumped {
			s += " (core dumped)"
		}
		return s
	case e.Err != nil:
		return e.Err.Error()
	}
	return "exit status " + strconv.Itoa(e.Code)
}

// exitOf reads a reaped child's status.
func exitOf(ps *os.ProcessState, err error) Exit {
	if ps == nil {
		if err == nil {
			err = errors.New("exited")
		}
		return Exit{Code: -1, Err: err}
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return Exit{Code: -1, Signal: ws.Signal(), CoreDumped: ws.CoreDump()}
	}
	return Exit{Code: ps.ExitCode()}
}

// Process is one supervised process, started by [Start] or adopted by
// [Adopt].
type Process struct {
	pid  int
	done chan struct{}
	exit Exit // set before done is closed

	mu       sync.Mutex
	pidfd    int // -1 once closed (exit observed, or released)
	released bool
	wake     *os.File // write end: wakes an adopted process's poller
}

// PID is the process id.
func (p *Process) PID() int { return p.pid }

// Done is closed when the process has exited. After Release it is
// closed only if a child of this agent exits meanwhile.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Exit says how the process ended; the zero Exit while it runs.
func (p *Process) Exit() Exit {
	if !p.Exited() {
		return Exit{}
	}
	return p.exit
}

// ErrReleased is returned by Signal after Release.
var ErrReleased = errors.New("proc: process released")

// Signal sends sig through the pidfd, so a reused pid is never hit. A
// process that has already exited is not an error.
func (p *Process) Signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.released {
		return ErrReleased
	}
	if p.pidfd < 0 {
		return nil // exited: its pidfd is closed
	}
	err := unix.PidfdSendSignal(p.pidfd, sig, nil, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("signal pid %d: %w", p.pid, err)
	}
	return nil
}

// Kill sends SIGKILL.
func (p *Process) Kill() error { return p.Signal(unix.SIGKILL) }

// Release lets go of the process without stopping it (the agent shuts
// down, or the process is another's to follow now). Signal fails after.
func (p *Process) Release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.released {
		return
	}
	p.released = true
	if p.wake != nil {
		p.wake.Close() // the poller sees POLLHUP and closes the pidfd
		p.wake = nil
		return
	}
	p.closeFDLocked()
}

// Released reports whether Release was called.
func (p *Process) Released() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.released
}

func (p *Process) closeFDLocked() {
	if p.pidfd >= 0 {
		unix.Close(p.pidfd)
		p.pidfd = -1
	}
}

func (p *Process) finish(e Exit) {
	p.exit = e
	p.mu.Lock()
	p.closeFDLocked()
	p.mu.Unlock()
	close(p.done)
}

// Cmd describes a process to start.
type Cmd struct {
	// Path is the program's path.
	Path string
	// Args are its arguments, without the program's name.
	Args []string
	// Env is its whole environment; nil is an empty one (never the
	// agent's: NOTIFY_SOCKET and the like must not leak).
	Env []string
	// Dir is its working directory (default "/").
	Dir string
	// Output gets its stdout and stderr (nil: /dev/null).
	Output *os.File
	// Files are its descriptors 3, 4, ...
	Files []*os.File
	// Credential, when set, is the user it runs as.
	Credential *syscall.Credential
	// Launch, when set, wraps the fork, e.g. to raise a resource limit
	// the child inherits. It must call start once and return its error.
	Launch func(start func() error) error
}

// Start starts c in a process group of its own (a signal to the agent's
// group, Ctrl-C or the service manager, never reaches it) and follows it
// until it exits. The caller may close its copies of c's files after.
func Start(c Cmd) (*Process, error) {
	cmd := exec.Command(c.Path, c.Args...)
	cmd.Env = c.Env
	if cmd.Env == nil {
		cmd.Env = []string{}
	}
	cmd.Dir = c.Dir
	if cmd.Dir == "" {
		cmd.Dir = "/"
	}
	if c.Output != nil {
		cmd.Stdout, cmd.Stderr = c.Output, c.Output
	}
	cmd.ExtraFiles = c.Files
	pidfd := -1
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: c.Credential, PidFD: &pidfd}
	var err error
	if c.Launch != nil {
		err = c.Launch(cmd.Start)
	} else {
		err = cmd.Start()
	}
	if err != nil {
		return nil, err
	}
	if pidfd < 0 { // a kernel without CLONE_PIDFD (before 5.2)
		if pidfd, err = unix.PidfdOpen(cmd.Process.Pid, 0); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, fmt.Errorf("pidfd_open %d: %w", cmd.Process.Pid, err)
		}
	}
	p := &Process{pid: cmd.Process.Pid, pidfd: pidfd, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		p.finish(exitOf(cmd.ProcessState, err))
	}()
	return p, nil
}

// Adopt follows a running process that is not the agent's child (one an
// earlier agent started). ours checks that pid is the expected process
// (its command line, say: a pid file alone can name a reused pid); it is
// asked again once the pidfd is open, which pins the process, so a pid
// reused in between is never adopted. Adopt fails when pid is not ours.
func Adopt(pid int, ours func(pid int) bool) (*Process, error) {
	if pid <= 0 || !ours(pid) {
		return nil, fmt.Errorf("pid %d: %w", pid, ErrNotOurs)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("pid %d: %w", pid, ErrNotOurs)
		}
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	if !ours(pid) {
		unix.Close(fd)
		return nil, fmt.Errorf("pid %d: %w", pid, ErrNotOurs)
	}
	r, w, err := os.Pipe()
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	p := &Process{pid: pid, pidfd: fd, done: make(chan struct{}), wake: w}
	go p.poll(r)
	return p, nil
}

// ErrNotOurs: Adopt's pid is gone or another process.
var ErrNotOurs = errors.New("not the expected process")

// poll waits for an adopted process to exit, or for Release.
func (p *Process) poll(wake *os.File) {
	defer wake.Close()
	p.mu.Lock()
	fd := p.pidfd
	p.mu.Unlock()
	fds := []unix.PollFd{
		{Fd: int32(fd), Events: unix.POLLIN},
		{Fd: int32(wake.Fd()), Events: unix.POLLIN},
	}
	for {
		_, err := unix.Poll(fds, -1)
		if err != nil && !errors.Is(err, unix.EINTR) {
			// Cannot watch it: Done stays open, as after Release.
			p.mu.Lock()
			p.closeFDLocked()
			p.mu.Unlock()
			return
		}
		if fds[1].Revents != 0 { // released
			p.mu.Lock()
			p.closeFDLocked()
			p.mu.Unlock()
			return
		}
		if fds[0].Revents != 0 {
			p.finish(Exit{Code: -1, Unknown: true})
			return
		}
	}
}
