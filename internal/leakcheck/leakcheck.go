// Package leakcheck fails a test run that leaves processes behind.
//
// Tests that start QEMU, swtpm or an agent must end them, pass or fail: a
// guest left running slows every later test on CI's few cores and is a leak
// on an operator's test host. A package whose tests start such processes
// calls Main from its TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(leakcheck.Main(m)) }
//
// Main runs the package's tests in a grandchild process (the test binary
// again, with the same arguments) under a child that leads a session of
// its own and only waits (a test that opens a pty must not make it the
// session's controlling terminal: its hangup would end the run). Every process
// the tests start inherits that session, also when it changes its process
// group (QEMU, swtpm) or outlives its parent (a QEMU left by a killed
// agent), so when the child ends, however it ends (tests done, t.Fatal, a
// panic, the -timeout alarm), whatever still runs in the session is a
// process a test started and did not end. Main lists each with its command
// line (a guest's -name tells which test), kills it, and fails the run.
package leakcheck

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// childEnv marks the process that runs the tests.
const childEnv = "OTHERIX_LEAKCHECK_CHILD"

// grace is how long processes may take to exit after the tests end (a
// swtpm follows its QEMU out, a SIGKILL sent by a cleanup is delivered).
const grace = 5 * time.Second

// Main runs m's tests under the guard and returns the exit code for
// os.Exit.
func Main(m *testing.M) int { return Run(m.Run) }

// Run is Main for a TestMain with work of its own around m.Run: run (the
// setup, m.Run and the teardown) runs in the guarded child only.
func Run(run func() int) int {
	switch os.Getenv(childEnv) {
	case "1":
		return run()
	case "leader":
		// The session's leader only waits for the tests: a session
		// leader that opens a terminal (a test's pty) gets it as its
		// controlling terminal, and SIGHUP when it closes. Caught, not
		// ignored: the tests start with the default disposition.
		signal.Notify(make(chan os.Signal, 1), syscall.SIGHUP)
		code, err := runChild(os.Args, "1", false)
		if err != nil {
			fmt.Fprintf(os.Stderr, "leakcheck: the tests ended: %v\n", err)
		}
		return code
	}
	return supervise(os.Args, os.Stderr)
}

// supervise runs argv under a session leader (argv again, in its leader
// role), and checks the session once it ends.
func supervise(argv []string, report io.Writer) int {
	code, pid, err := runChildPID(argv, "leader", true)
	if err != nil {
		fmt.Fprintf(report, "leakcheck: the tests ended: %v\n", err)
	}
	if left := Leftovers(pid, grace); len(left) > 0 {
		fmt.Fprintf(report, "leakcheck: %d process(es) started by the tests outlived them (killed now):\n", len(left))
		for _, p := range left {
			fmt.Fprintf(report, "  pid %d: %s\n", p.PID, p.Cmdline)
			syscall.Kill(p.PID, syscall.SIGKILL)
		}
		if code == 0 {
			code = 1
		}
	}
	return code
}

// runChild runs argv with childEnv set to role, forwarding the signals that
// end a test run, and returns its exit code; err says how it ended when
// it did not exit by itself.
func runChild(argv []string, role string, setsid bool) (int, error) {
	code, _, err := runChildPID(argv, role, setsid)
	return code, err
}

func runChildPID(argv []string, role string, setsid bool) (code, pid int, _ error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), childEnv+"="+role)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: setsid}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		return 2, 0, fmt.Errorf("start: %w", err)
	}
	done := make(chan struct{})
	go func() {
		for {
			select {
			case s := <-sigs:
				cmd.Process.Signal(s)
			case <-done:
				return
			}
		}
	}()
	err := cmd.Wait()
	close(done)
	if err == nil {
		return 0, cmd.Process.Pid, nil
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() > 0 {
		return ee.ExitCode(), cmd.Process.Pid, nil
	}
	return 1, cmd.Process.Pid, err
}

// Proc is a live process.
type Proc struct {
	PID     int
	Cmdline string
}

// Leftovers returns the live (not zombie) processes of session sid,
// waiting up to wait for them to exit first.
func Leftovers(sid int, wait time.Duration) []Proc {
	deadline := time.Now().Add(wait)
	for {
		left := inSession(sid)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// inSession lists the live processes whose session id is sid.
func inSession(sid int) []Proc {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []Proc
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		state, session, ok := stat(pid)
		if !ok || session != sid || state == 'Z' || state == 'X' {
			continue
		}
		out = append(out, Proc{PID: pid, Cmdline: cmdline(pid)})
	}
	return out
}

// stat returns a process's state and session id from /proc/PID/stat.
func stat(pid int) (state byte, session int, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, false
	}
	// After the command: state ppid pgrp session ...
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 4 || len(f[0]) != 1 {
		return 0, 0, false
	}
	session, err = strconv.Atoi(f[3])
	if err != nil {
		return 0, 0, false
	}
	return f[0][0], session, true
}

// cmdline returns a process's command line, shortened for a report.
func cmdline(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil || len(b) == 0 {
		return "?"
	}
	s := strings.Join(strings.Split(strings.TrimRight(string(b), "\x00"), "\x00"), " ")
	if len(s) > 400 {
		s = s[:400] + "…"
	}
	return s
}

// Kill sends SIGKILL to each pid and waits up to 10 s for each to be gone
// (a test's cleanup of the processes it started: after it they no longer
// run). A pid that is already gone is skipped.
func Kill(pids ...int) error {
	var errs []error
	for _, pid := range pids {
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue // gone
		}
		unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		deadline := time.Now().Add(10 * time.Second)
		for {
			n, err := unix.Poll(fds, 100)
			if n > 0 || (err != nil && !errors.Is(err, unix.EINTR)) {
				break
			}
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("pid %d still runs 10s after SIGKILL", pid))
				break
			}
		}
		unix.Close(fd)
	}
	return errors.Join(errs...)
}
