package leakcheck

import (
	"bytes"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// helper is what the child runs in the scenarios below (selected by
// LEAKCHECK_SCENARIO); outside them it does nothing.
func TestHelper(t *testing.T) {
	switch os.Getenv("LEAKCHECK_SCENARIO") {
	case "leak":
		// A process in its own group, as QEMU and swtpm are, left running.
		cmd := exec.Command("sleep", "300")
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(os.Getenv("LEAKCHECK_PIDFILE"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600)
	case "orphan":
		// A process whose parent is gone (a QEMU left by a killed agent).
		out, err := exec.Command("sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!").Output()
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(os.Getenv("LEAKCHECK_PIDFILE"), bytes.TrimSpace(out), 0o600)
	case "panic":
		cmd := exec.Command("sleep", "300")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(os.Getenv("LEAKCHECK_PIDFILE"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600)
		panic("a test panicked with its process running")
	case "pty":
		// A test that opens a terminal (a fake device, a console) must
		// not end the run when the terminal hangs up.
		ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.IoctlSetPointerInt(int(ptmx.Fd()), unix.TIOCSPTLCK, 0); err != nil {
			t.Fatal(err)
		}
		n, err := unix.IoctlGetInt(int(ptmx.Fd()), unix.TIOCGPTN)
		if err != nil {
			t.Fatal(err)
		}
		pts, err := os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		ptmx.Close()
		time.Sleep(200 * time.Millisecond)
		pts.Close()
	case "clean":
		cmd := exec.Command("sleep", "300")
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	}
}

// TestGuard runs this package's test binary (guard included) on each
// scenario: a run that leaves a process behind fails and names it, and the
// process is gone afterwards; a clean run passes.
func TestGuard(t *testing.T) {
	for _, tc := range []struct {
		scenario string
		leaks    bool
	}{{"leak", true}, {"orphan", true}, {"panic", true}, {"clean", false}, {"pty", false}} {
		t.Run(tc.scenario, func(t *testing.T) {
			pidfile := t.TempDir() + "/pid"
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelper$", "-test.count=1")
			cmd.Env = append(os.Environ(), "LEAKCHECK_SCENARIO="+tc.scenario, "LEAKCHECK_PIDFILE="+pidfile, childEnv+"=")
			out, err := cmd.CombinedOutput()
			if !tc.leaks {
				if err != nil {
					t.Fatalf("a clean run failed: %v\n%s", err, out)
				}
				return
			}
			if err == nil {
				t.Fatalf("a run that left a process behind passed:\n%s", out)
			}
			if !strings.Contains(string(out), "outlived them") || !strings.Contains(string(out), "sleep 300") {
				t.Fatalf("the report does not name the process:\n%s", out)
			}
			b, rerr := os.ReadFile(pidfile)
			pid, _ := strconv.Atoi(string(b))
			if rerr != nil || pid <= 0 {
				t.Fatalf("no pid from the helper: %v", rerr)
			}
			deadline := time.Now().Add(5 * time.Second)
			for {
				if st, _, ok := stat(pid); !ok || st == 'Z' {
					break
				}
				if time.Now().After(deadline) {
					syscall.Kill(pid, syscall.SIGKILL)
					t.Fatalf("pid %d still runs after the guard", pid)
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}
