package proc

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The test binary doubles as the supervised program (std os/exec's
// helper-process trick): PROC_HELPER selects what it does.
func TestMain(m *testing.M) {
	if mode := os.Getenv("PROC_HELPER"); mode != "" {
		os.Exit(helper(mode))
	}
	os.Exit(m.Run())
}

func helper(mode string) int {
	switch mode {
	case "exit3":
		fmt.Fprintln(os.Stderr, "helper: something went wrong")
		return 3
	case "sleep":
		time.Sleep(time.Minute)
		return 0
	case "nap": // sleeps NAP_MS milliseconds
		ms, _ := strconv.Atoi(os.Getenv("NAP_MS"))
		time.Sleep(time.Duration(ms) * time.Millisecond)
		return 0
	case "env": // writes its environment and process group to fd 3
		f := os.NewFile(3, "out")
		pgid, _ := syscall.Getpgid(0)
		wd, _ := os.Getwd()
		fmt.Fprintf(f, "%s\npgid=%d pid=%d wd=%s\n", strings.Join(os.Environ(), ","), pgid, os.Getpid(), wd)
		f.Close()
		return 0
	}
	return 100
}

func helperCmd(mode string, env ...string) Cmd {
	return Cmd{Path: os.Args[0], Env: append([]string{"PROC_HELPER=" + mode}, env...)}
}

func wait(t *testing.T, p *Process) Exit {
	t.Helper()
	select {
	case <-p.Done():
		return p.Exit()
	case <-time.After(30 * time.Second):
		p.Kill()
		t.Fatalf("pid %d did not exit", p.PID())
		return Exit{}
	}
}

func TestExitStatus(t *testing.T) {
	log := filepath.Join(t.TempDir(), "log")
	f, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	c := helperCmd("exit3")
	c.Output = f
	p, err := Start(c)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	e := wait(t, p)
	if e.Code != 3 || e.Signaled() || e.Unknown || e.String() != "exit status 3" {
		t.Errorf("exit = %+v (%s), want exit status 3", e, e)
	}
	if got, want := Tail(log, 0, 2048), "helper: something went wrong"; got != want {
		t.Errorf("Tail = %q, want %q", got, want)
	}
	if err := p.Kill(); err != nil {
		t.Errorf("Kill after exit = %v, want nil", err)
	}
}

func TestKilled(t *testing.T) {
	p, err := Start(helperCmd("sleep"))
	if err != nil {
		t.Fatal(err)
	}
	if p.Exited() || p.Exit() != (Exit{}) {
		t.Errorf("a running process reports an exit: %+v", p.Exit())
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	e := wait(t, p)
	if e.Signal != syscall.SIGKILL || e.Code != -1 || e.String() != "killed by signal SIGKILL" {
		t.Errorf("exit = %+v (%s), want killed by SIGKILL", e, e)
	}
}

// TestEnvAndGroup: the child gets exactly Env (nil: none), the files as
// fds 3..., "/" as its working directory and a process group of its own.
func TestEnvAndGroup(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	t.Setenv("NOTIFY_SOCKET", "/run/leak")
	c := helperCmd("env", "A=1")
	c.Files = []*os.File{w}
	launched := false
	c.Launch = func(start func() error) error { launched = true; return start() }
	p, err := Start(c)
	w.Close()
	if err != nil {
		t.Fatal(err)
	}
	if e := wait(t, p); e.Code != 0 {
		t.Fatalf("helper: %s", e)
	}
	b := make([]byte, 4096)
	n, _ := r.Read(b)
	got := string(b[:n])
	want := fmt.Sprintf("PROC_HELPER=env,A=1\npgid=%d pid=%d wd=/\n", p.PID(), p.PID())
	if got != want {
		t.Errorf("child saw %q, want %q", got, want)
	}
	if !launched {
		t.Error("Launch was not called")
	}
}

func TestStartError(t *testing.T) {
	_, err := Start(Cmd{Path: filepath.Join(t.TempDir(), "missing")})
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Start(missing) = %v, want not exist", err)
	}
	c := helperCmd("sleep")
	c.Launch = func(func() error) error { return errors.New("no room") }
	if _, err := Start(c); err == nil || err.Error() != "no room" {
		t.Errorf("Start with a failing Launch = %v", err)
	}
}

// startForeign starts a process the test adopts as if an earlier agent
// had started it; the cleanup kills and reaps it.
func startForeign(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = []string{"PROC_HELPER=sleep"}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func TestAdopt(t *testing.T) {
	cmd := startForeign(t)
	pid := cmd.Process.Pid
	var asked int
	p, err := Adopt(pid, func(got int) bool { asked++; return got == pid })
	if err != nil {
		t.Fatal(err)
	}
	if asked != 2 {
		t.Errorf("ours asked %d times, want 2 (before and after pidfd_open)", asked)
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	e := wait(t, p)
	if !e.Unknown || e.String() != "exited (adopted process, exit status unknown)" {
		t.Errorf("exit = %+v (%s), want unknown", e, e)
	}
}

func TestAdoptNotOurs(t *testing.T) {
	cmd := startForeign(t)
	pid := cmd.Process.Pid
	if _, err := Adopt(pid, func(int) bool { return false }); !errors.Is(err, ErrNotOurs) {
		t.Errorf("Adopt of another process = %v, want ErrNotOurs", err)
	}
	// The pid is reused between the check and pidfd_open: the second
	// check sees another process.
	n := 0
	if _, err := Adopt(pid, func(int) bool { n++; return n == 1 }); !errors.Is(err, ErrNotOurs) {
		t.Errorf("Adopt of a reused pid = %v, want ErrNotOurs", err)
	}
	if _, err := Adopt(0, func(int) bool { return true }); !errors.Is(err, ErrNotOurs) {
		t.Errorf("Adopt(0) = %v, want ErrNotOurs", err)
	}
}

// TestRelease: a released process keeps running, Signal refuses, and the
// pidfd is closed (no descriptor leaks per released process).
func TestRelease(t *testing.T) {
	cmd := startForeign(t)
	before := openFDs(t)
	p, err := Adopt(cmd.Process.Pid, func(int) bool { return true })
	if err != nil {
		t.Fatal(err)
	}
	p.Release()
	p.Release()
	if err := p.Kill(); !errors.Is(err, ErrReleased) {
		t.Errorf("Kill after Release = %v, want ErrReleased", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for openFDs(t) != before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // the poller closes them as it returns
	}
	if got := openFDs(t); got != before {
		t.Errorf("%d descriptors open after Release, want %d", got, before)
	}
	if err := unix.Kill(cmd.Process.Pid, 0); err != nil {
		t.Errorf("released process is gone: %v", err)
	}
	if p.Exited() {
		t.Error("Done closed after Release")
	}

	c, err := Start(helperCmd("sleep"))
	if err != nil {
		t.Fatal(err)
	}
	c.Release()
	if err := unix.Kill(c.PID(), 0); err != nil {
		t.Errorf("released child is gone: %v", err)
	}
	unix.Kill(c.PID(), unix.SIGKILL)
	wait(t, c) // a child still gets reaped after Release
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestTail(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	os.WriteFile(path, []byte("old line\nnew   words\n\tend\n"), 0o600)
	for _, tc := range []struct {
		from, max int64
		want      string
	}{
		{0, 1 << 20, "old line new words end"},
		{9, 1 << 20, "new words end"},
		{0, 4, "end"},
		{100, 10, ""},
	} {
		if got := Tail(path, tc.from, tc.max); got != tc.want {
			t.Errorf("Tail(%d, %d) = %q, want %q", tc.from, tc.max, got, tc.want)
		}
	}
	if got := Tail(path+".missing", 0, 10); got != "" {
		t.Errorf("Tail of a missing file = %q", got)
	}
}

// TestDoneMeansGone: with many processes started, killed and exiting at
// once (descriptor numbers reused between them), Done closes for each
// exactly when its own process is gone, never before.
func TestDoneMeansGone(t *testing.T) {
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := Start(helperCmd("nap", "NAP_MS="+strconv.Itoa(50+(i*37)%400)))
			if err != nil {
				errs <- err
				return
			}
			if i%3 == 0 {
				time.Sleep(time.Duration(i) * time.Millisecond)
				p.Kill()
			}
			select {
			case <-p.Done():
			case <-time.After(30 * time.Second):
				errs <- fmt.Errorf("pid %d: no exit", p.PID())
				return
			}
			if err := unix.Kill(p.PID(), 0); err == nil {
				errs <- fmt.Errorf("pid %d: Done closed while it lives", p.PID())
			}
			if e := p.Exit(); e.Code != 0 && e.Signal != syscall.SIGKILL {
				errs <- fmt.Errorf("pid %d: %s", p.PID(), e)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
