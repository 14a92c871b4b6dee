package tpm

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// golden compares got with testdata/<name>, or writes it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs (go test -update rewrites it)\ngot:\n%s\nwant:\n%s", path, got, want)
	}
}

func TestArgs(t *testing.T) {
	var b strings.Builder
	for _, tc := range []struct{ arch, sock string }{
		{"amd64", "/run/otherix/vm/0f8fad5b/swtpm.sock"},
		{"arm64", "/run/otherix/vm/0f8fad5b/swtpm.sock"},
		{"amd64", "/run/odd,dir/swtpm.sock"},
	} {
		args, err := Args(tc.arch, tc.sock)
		if err != nil {
			t.Fatalf("Args(%q, %q): %v", tc.arch, tc.sock, err)
		}
		fmt.Fprintf(&b, "# %s %s\n%s\n\n", tc.arch, tc.sock, strings.Join(args, "\n"))
	}
	args, err := ArgsFD("arm64", 7)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&b, "# arm64 fd 7\n%s\n", strings.Join(args, "\n"))
	golden(t, "args.txt", b.String())
}

func TestArgsInvalid(t *testing.T) {
	for _, tc := range []struct{ name, arch, sock string }{
		{"arch", "riscv64", "/run/x/swtpm.sock"},
		{"relative", "amd64", "run/x/swtpm.sock"},
		{"newline", "amd64", "/run/x\n/swtpm.sock"},
		{"long", "amd64", "/run/" + strings.Repeat("x", 100) + "/swtpm.sock"},
		{"relative arm64", "arm64", "swtpm.sock"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Args(tc.arch, tc.sock)
			if got := errcode.Of(err); got != errcode.ValidationFailed {
				t.Errorf("Args(%q, %q) = %v, want validation_failed", tc.arch, tc.sock, err)
			}
		})
	}
}

func TestArgsFDInvalid(t *testing.T) {
	for _, tc := range []struct {
		arch string
		fd   int
	}{{"amd64", 2}, {"riscv64", 5}} {
		if _, err := ArgsFD(tc.arch, tc.fd); errcode.Of(err) != errcode.ValidationFailed {
			t.Errorf("ArgsFD(%s, %d) = %v, want validation_failed", tc.arch, tc.fd, err)
		}
	}
}

func needSWTPM(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("swtpm"); err != nil {
		// The platform guest's builder installs the host tools its tests
		// need, swtpm among them.
		testguest.PlatformDir(t, "amd64", testguest.VariantDefault)
	}
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Fatalf("swtpm is missing (apt-get install swtpm swtpm-tools; testdata/guest/build-platform.sh installs it): %v", err)
	}
}

// vmDirs returns a state dir and a short run dir for one VM.
func vmDirs(t *testing.T) (state, run string) {
	t.Helper()
	run, err := os.MkdirTemp("/tmp", "tpm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	return filepath.Join(t.TempDir(), "tpm"), run
}

// startSWTPM starts swtpm and stops it at cleanup.
func startSWTPM(t *testing.T, cfg Config) *Process {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := Start(ctx, cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if !p.isReleased() {
			p.Stop(context.Background())
		}
	})
	return p
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil && isLive(pid) }

func TestStartFindStop(t *testing.T) {
	needSWTPM(t)
	t.Parallel()
	state, run := vmDirs(t)
	p := startSWTPM(t, Config{StateDir: state, RunDir: run})

	if b, err := os.ReadFile(PIDPath(run)); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(p.PID()) {
		t.Errorf("pid file = %q, %v; want %d", b, err, p.PID())
	}
	if fi, err := os.Stat(SocketPath(run)); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket: %v %v, want a 0600 socket", fi.Mode(), err)
	}
	if fi, err := os.Stat(state); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("state dir: %v, want 0700", err)
	}
	// Its own process group, not the test's.
	if pgid, _ := syscall.Getpgid(p.PID()); pgid != p.PID() {
		t.Errorf("swtpm's process group is %d, want its own (%d)", pgid, p.PID())
	}
	env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.PID()))
	if got := strings.Split(strings.TrimSuffix(string(env), "\x00"), "\x00"); strings.Join(got, " ") != strings.Join(DefaultEnv, " ") {
		t.Errorf("swtpm's environment = %q, want %q", got, DefaultEnv)
	}

	found := FindRunning(state, SocketPath(run))
	if found == nil || found.PID() != p.PID() {
		t.Fatalf("FindRunning = %v, want pid %d", found, p.PID())
	}
	found.Release()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if !p.Exited() || alive(p.PID()) {
		t.Errorf("swtpm %d still runs after Stop", p.PID())
	}
	for _, f := range []string{PIDPath(run), SocketPath(run)} {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after Stop: %v", f, err)
		}
	}
	if got := FindRunning(state, SocketPath(run)); got != nil {
		t.Errorf("FindRunning after Stop = pid %d, want nil", got.PID())
	}
	if err := RemoveState(state); err != nil {
		t.Errorf("RemoveState: %v", err)
	}
	if _, err := os.Stat(state); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state dir left: %v", err)
	}
}

func TestStartConflictAndRemoveStateRefused(t *testing.T) {
	needSWTPM(t)
	t.Parallel()
	state, run := vmDirs(t)
	p := startSWTPM(t, Config{StateDir: state, RunDir: run})
	_, err := Start(context.Background(), Config{StateDir: state, RunDir: run})
	if errcode.Of(err) != errcode.Conflict {
		t.Errorf("second Start = %v, want conflict", err)
	}
	if err := RemoveState(state); errcode.Of(err) != errcode.Conflict {
		t.Errorf("RemoveState while running = %v, want conflict", err)
	}
	if !alive(p.PID()) {
		t.Errorf("the first swtpm died")
	}
}

func TestStartFailureShowsLog(t *testing.T) {
	t.Parallel()
	state, run := vmDirs(t)
	// A "swtpm" that complains and exits without writing its pid.
	fake := filepath.Join(t.TempDir(), "swtpm")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho 'bad option --tpm2' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := Start(context.Background(), Config{StateDir: state, RunDir: run, Binary: fake})
	if err == nil || !strings.Contains(err.Error(), "bad option --tpm2") || !strings.Contains(err.Error(), "exited before") {
		t.Fatalf("Start = %v, want the failure with swtpm's words", err)
	}
	for _, f := range []string{PIDPath(run), SocketPath(run)} {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after a failed start: %v", f, err)
		}
	}

	_, err = Start(context.Background(), Config{StateDir: state, RunDir: run, Binary: "no-such-swtpm"})
	if !errors.Is(err, exec.ErrNotFound) {
		t.Errorf("Start with a missing binary = %v, want exec.ErrNotFound", err)
	}
}

func TestStartCancelled(t *testing.T) {
	t.Parallel()
	state, run := vmDirs(t)
	// A "swtpm" that never gets ready.
	fake := filepath.Join(t.TempDir(), "swtpm")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\nexec sleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := Start(ctx, Config{StateDir: state, RunDir: run, Binary: fake})
		done <- err
	}()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Start = %v, want context.Canceled", err)
	}
}

func TestFindRunningRefusesReusedPID(t *testing.T) {
	t.Parallel()
	state, run := vmDirs(t)
	// The pid file names a live process that is not this VM's swtpm.
	sleep := exec.Command("sleep", "60")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleep.Process.Kill(); sleep.Wait() }()
	if err := os.WriteFile(PIDPath(run), []byte(strconv.Itoa(sleep.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	if p := FindRunning(state, SocketPath(run)); p != nil {
		t.Errorf("FindRunning adopted pid %d", p.PID())
	}
}

func TestFindRunningWithoutPIDFile(t *testing.T) {
	needSWTPM(t)
	t.Parallel()
	state, run := vmDirs(t)
	p := startSWTPM(t, Config{StateDir: state, RunDir: run})
	// An agent that died before the pid file was of use: found by its
	// command line and socket.
	os.Remove(PIDPath(run))
	found := FindRunning(state, SocketPath(run))
	if found == nil || found.PID() != p.PID() {
		t.Fatalf("FindRunning = %v, want pid %d", found, p.PID())
	}
	// The adopted process: Stop works through its pidfd and Done closes.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := found.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-found.Done():
	default:
		t.Error("Done is open after Stop")
	}
	<-p.Done()
}

func TestOwner(t *testing.T) {
	needSWTPM(t)
	if os.Getuid() != 0 {
		t.Fatal("needs root to run swtpm as another user")
	}
	t.Parallel()
	// The folders above the state dir are private (0700 root, as
	// t.TempDir's are, or a data_dir under /root): swtpm, running as
	// another user, reaches its state through the descriptor it inherits.
	private := t.TempDir()
	if err := os.Chmod(private, 0o700); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(private, "vm", "tpm")
	p := startSWTPM(t, Config{StateDir: state, RunDir: state, Owner: &Owner{UID: 65534, GID: 65534}})
	found := FindRunning(state, SocketPath(state))
	if found == nil || found.PID() != p.PID() {
		t.Fatalf("FindRunning = %v, want pid %d", found, p.PID())
	}
	found.Release()
	// swtpm works: a control command answers and its state is written.
	c, err := net.Dial("unix", SocketPath(state))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var reply [4]byte
	if _, err := c.Write([]byte{0, 0, 0, 2, 0, 0, 0, 0}); err != nil { // CMD_INIT
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, reply[:]); err != nil || reply != [4]byte{} {
		t.Fatalf("CMD_INIT answered %x, %v; want result 0", reply, err)
	}
	if _, err := os.Stat(filepath.Join(state, "tpm2-00.permall")); err != nil {
		t.Errorf("swtpm wrote no state: %v", err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.PID()))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && (f[0] == "Uid:" || f[0] == "Gid:") && f[1] != "65534" {
			t.Errorf("swtpm %s", line)
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(state, &st); err != nil || st.Uid != 65534 {
		t.Errorf("state dir owner = %d (%v), want 65534", st.Uid, err)
	}
}
