package tpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/agent/proc"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// DefaultEnv is swtpm's whole environment unless Config.Env is set: it
// inherits nothing from the agent (NOTIFY_SOCKET, credentials...).
var DefaultEnv = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

// Config is one VM's TPM.
type Config struct {
	// StateDir holds swtpm's state (tpm2-00.permall): the VM's folder's
	// "tpm", say. Created (0700) if missing; kept across stop/start.
	StateDir string
	// RunDir is the VM's runtime folder (it must exist and be short: the
	// socket path must fit in 107 bytes). swtpm.sock and swtpm.pid go here.
	RunDir string
	// LogPath is swtpm's log, appended to. Default: <StateDir>/swtpm.log.
	LogPath string
	// Binary is swtpm's path or name (looked up in Env's PATH). Default "swtpm".
	Binary string
	// Env is swtpm's whole environment. Default DefaultEnv.
	Env []string
	// Owner, if set, is the user and group swtpm runs as; StateDir and the
	// log are chowned to it. Needs the agent to be root.
	Owner *Owner
}

func (c *Config) validate() error {
	if err := checkPath("state", c.StateDir); err != nil {
		return err
	}
	if strings.Contains(c.StateDir, ",") {
		return errcode.New(errcode.ValidationFailed, "tpm: state path %q holds a comma, which swtpm cannot parse", c.StateDir)
	}
	if err := checkPath("run", c.RunDir); err != nil {
		return err
	}
	if err := checkPath("socket", SocketPath(c.RunDir)); err != nil {
		return err
	}
	if c.LogPath != "" {
		if err := checkPath("log", c.LogPath); err != nil {
			return err
		}
	}
	return nil
}

func (c *Config) logPath() string {
	if c.LogPath != "" {
		return c.LogPath
	}
	return filepath.Join(c.StateDir, "swtpm.log")
}

// Process is a running (or exited) swtpm: started by [Start] or found by
// [FindRunning].
type Process struct {
	p       *proc.Process
	sock    string
	pidPath string
}

// PID returns swtpm's process id.
func (p *Process) PID() int { return p.p.PID() }

// Socket returns the control socket QEMU connects to.
func (p *Process) Socket() string { return p.sock }

// Done is closed when swtpm has exited: a VM whose QEMU still runs has
// then lost its TPM (QEMU does not notice until the guest uses it).
// After Release, Done is closed only if swtpm exits meanwhile and was
// started by this process.
func (p *Process) Done() <-chan struct{} { return p.p.Done() }

// Exited reports whether swtpm has exited.
func (p *Process) Exited() bool { return p.p.Exited() }

// Exit says how swtpm ended; the zero proc.Exit while it runs.
func (p *Process) Exit() proc.Exit { return p.p.Exit() }

// ExitDescription says how swtpm ended ("exit status 0", "killed by signal
// SIGKILL"); empty while it runs.
func (p *Process) ExitDescription() string {
	if !p.Exited() {
		return ""
	}
	return p.p.Exit().String()
}

// Connect opens a connection to swtpm's control socket for QEMU to
// inherit (ArgsFD): QEMU, running as an unprivileged user, need not be
// able to open the socket. Start QEMU with it, then close this copy.
// swtpm serves this one connection and, with --terminate, exits when it
// closes: when QEMU exits, or when QEMU never started and the copy is
// closed.
func (p *Process) Connect(ctx context.Context) (*os.File, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", p.sock)
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: connect to swtpm")
	}
	defer c.Close()
	f, err := c.(*net.UnixConn).File()
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: connection file")
	}
	return f, nil
}

// Start starts swtpm for cfg and returns once it accepted its options and
// its control socket listens: QEMU can be started right after. A swtpm
// already running on cfg.StateDir is a conflict (see FindRunning).
//
// swtpm is in a process group of its own with an explicit environment and
// no tie to ctx or to the agent: it lives until QEMU disconnects or Stop.
// ctx bounds only the start.
func Start(ctx context.Context, cfg Config) (*Process, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	sock := SocketPath(cfg.RunDir)
	if old := FindRunning(cfg.StateDir, sock); old != nil {
		old.Release()
		return nil, errcode.New(errcode.Conflict, "tpm: a swtpm (pid %d) already runs on %s", old.PID(), cfg.StateDir)
	}
	if err := prepareState(cfg); err != nil {
		return nil, err
	}

	lnFile, err := listenControl(sock)
	if err != nil {
		return nil, err
	}
	defer lnFile.Close()
	logPath := cfg.logPath()
	logf, logStart, err := openLog(logPath, cfg.Owner)
	if err != nil {
		os.Remove(sock)
		return nil, err
	}
	defer logf.Close()
	pidPath := PIDPath(cfg.RunDir)
	inotify, err := watchPIDFile(pidPath, cfg.Owner)
	if err != nil {
		os.Remove(sock)
		return nil, err
	}
	defer inotify.Close()

	bin := cfg.Binary
	if bin == "" {
		bin = "swtpm"
	}
	env := cfg.Env
	if env == nil {
		env = DefaultEnv
	}
	path, err := lookPath(bin, env)
	if err != nil {
		os.Remove(sock)
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: find swtpm")
	}
	var cred *syscall.Credential
	who := "the agent's user"
	if o := cfg.Owner; o != nil {
		cred = &syscall.Credential{Uid: o.UID, Gid: o.GID, Groups: []uint32{}}
		who = fmt.Sprintf("uid %d", o.UID)
	}
	dirs, err := openDirs(cfg.StateDir, cfg.RunDir)
	if err != nil {
		os.Remove(sock)
		return nil, err
	}
	defer func() {
		for _, d := range dirs {
			d.Close()
		}
	}()
	sp, err := proc.Start(proc.Cmd{
		Path: path,
		Args: []string{"socket", "--tpm2",
			"--tpmstate", stateArg,
			"--ctrl", "type=unixio,fd=3",
			"--terminate",
			"--log", "fd=4,level=1",
			"--pid", pidArg},
		Env: env,
		// Nothing by path: the working directory is /, the state dir is
		// fd 5, the pid file's dir fd 6.
		Dir:        "/",
		Output:     logf,
		Files:      []*os.File{lnFile, logf, dirs[0], dirs[1]},
		Credential: cred,
	})
	if err != nil {
		os.Remove(sock)
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: the VM's TPM emulator swtpm (%s) could not be started as %s", path, who)
	}
	p := &Process{p: sp, sock: sock, pidPath: pidPath}

	fail := func(err error) (*Process, error) {
		sp.Kill()
		<-sp.Done()
		os.Remove(sock)
		os.Remove(pidPath)
		e := errcode.Wrap(errcode.Internal, err, "tpm: the VM's TPM emulator swtpm (%s, as %s) did not start", path, who)
		if tail := proc.Tail(logPath, logStart, 2048); tail != "" {
			e.Message += "; swtpm said: " + tail
		}
		return nil, e
	}
	ready := make(chan error, 1)
	go func() { ready <- waitPIDFile(inotify, pidPath, sp.PID()) }()
	select {
	case err := <-ready:
		if err != nil {
			return fail(err)
		}
	case <-sp.Done():
		return fail(errors.New("it exited before accepting its options"))
	case <-ctx.Done():
		return fail(ctx.Err()) // closing inotify (deferred) ends the reader
	}
	return p, nil
}

// waitPIDFile reads inotify events of the pid file's directory until the
// pid file is written and closed with a pid in it, and checks that it is
// pid.
func waitPIDFile(inotify *os.File, pidPath string, pid int) error {
	name := filepath.Base(pidPath)
	buf := make([]byte, 16*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
	for {
		n, err := inotify.Read(buf)
		if err != nil {
			return err
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			nameBytes := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
			off += unix.SizeofInotifyEvent + int(ev.Len)
			if string(bytes.TrimRight(nameBytes, "\x00")) != name {
				continue
			}
			b, err := os.ReadFile(pidPath)
			switch {
			case err != nil:
				return err
			case len(bytes.TrimSpace(b)) == 0:
				continue // opened and closed before the write
			case strings.TrimSpace(string(b)) != strconv.Itoa(pid):
				return fmt.Errorf("it wrote pid %q, want %d", b, pid)
			}
			return nil
		}
	}
}

// openDirs opens directories for swtpm to inherit.
func openDirs(paths ...string) ([]*os.File, error) {
	var out []*os.File
	for _, p := range paths {
		d, err := os.OpenFile(p, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW, 0)
		if err != nil {
			for _, o := range out {
				o.Close()
			}
			return nil, errcode.Wrap(errcode.Internal, err, "tpm: open %s", p)
		}
		out = append(out, d)
	}
	return out, nil
}

// listenControl binds swtpm's control socket and returns the listening
// descriptor swtpm inherits: it listens before swtpm starts.
func listenControl(sock string) (*os.File, error) {
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: remove stale socket")
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: listen")
	}
	ln.SetUnlinkOnClose(false)
	lnFile, err := ln.File()
	ln.Close()
	if err != nil {
		os.Remove(sock)
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: listener file")
	}
	if err := os.Chmod(sock, 0o600); err != nil {
		lnFile.Close()
		os.Remove(sock)
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: chmod socket")
	}
	return lnFile, nil
}

// openLog opens swtpm's log for appending, owned by swtpm's user, and
// returns where this start's lines begin.
func openLog(path string, owner *Owner) (*os.File, int64, error) {
	logf, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, 0, errcode.Wrap(errcode.Internal, err, "tpm: log")
	}
	if owner != nil {
		if err := logf.Chown(int(owner.UID), int(owner.GID)); err != nil {
			logf.Close()
			return nil, 0, errcode.Wrap(errcode.Internal, err, "tpm: chown log")
		}
	}
	start, _ := logf.Seek(0, io.SeekEnd)
	return logf, start, nil
}

// watchPIDFile makes the pid file empty, owned by swtpm's user, and
// returns an inotify watch of its directory (swtpm may replace the
// file): swtpm writes its pid there once its options are accepted and
// then closes it (IN_CLOSE_WRITE), which waitPIDFile waits for.
func watchPIDFile(pidPath string, owner *Owner) (*os.File, error) {
	pidFile, err := os.OpenFile(pidPath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: pid file")
	}
	if owner != nil {
		err = pidFile.Chown(int(owner.UID), int(owner.GID))
	}
	if cerr := pidFile.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: pid file")
	}
	ifd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err == nil {
		_, err = unix.InotifyAddWatch(ifd, filepath.Dir(pidPath), unix.IN_CLOSE_WRITE|unix.IN_MOVED_TO)
		if err != nil {
			unix.Close(ifd)
		}
	}
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "tpm: inotify")
	}
	return os.NewFile(uintptr(ifd), "inotify"), nil
}

func prepareState(cfg Config) error {
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return errcode.Wrap(errcode.Internal, err, "tpm: state dir")
	}
	if cfg.Owner == nil {
		return nil
	}
	uid, gid := int(cfg.Owner.UID), int(cfg.Owner.GID)
	if err := os.Chown(cfg.StateDir, uid, gid); err != nil {
		return errcode.Wrap(errcode.Internal, err, "tpm: chown state dir")
	}
	ents, err := os.ReadDir(cfg.StateDir)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "tpm: state dir")
	}
	for _, e := range ents {
		if err := os.Lchown(filepath.Join(cfg.StateDir, e.Name()), uid, gid); err != nil {
			return errcode.Wrap(errcode.Internal, err, "tpm: chown state")
		}
	}
	return nil
}

// lookPath resolves bin in env's PATH, not the agent's.
func lookPath(bin string, env []string) (string, error) {
	if strings.Contains(bin, "/") {
		return bin, nil
	}
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			for _, dir := range filepath.SplitList(v) {
				p := filepath.Join(dir, bin)
				if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
					return p, nil
				}
			}
		}
	}
	return "", fmt.Errorf("%s not found in the PATH of its environment: %w", bin, exec.ErrNotFound)
}

// kill sends swtpm SIGKILL.
func (p *Process) kill() { p.p.Kill() }

// Stop ends swtpm: SIGTERM (swtpm saves its state and exits), then
// SIGKILL if ctx ends first. It waits for the exit, then removes the socket
// and the pid file. Stopping an exited swtpm only removes those.
// QEMU must be gone first: a running VM loses its TPM.
func (p *Process) Stop(ctx context.Context) error {
	if p.isReleased() {
		return errcode.New(errcode.Internal, "tpm: stop after release")
	}
	if !p.Exited() {
		if err := p.p.Signal(unix.SIGTERM); err != nil {
			return errcode.Wrap(errcode.Internal, err, "tpm: signal swtpm")
		}
		select {
		case <-p.p.Done():
		case <-ctx.Done():
			p.kill()
			<-p.p.Done()
		}
	}
	p.removeFiles()
	return nil
}

// removeFiles removes the socket and the pid file unless the pid file
// names another process: a newer swtpm owns them then. (swtpm removes the
// pid file itself when it exits normally.)
func (p *Process) removeFiles() {
	b, err := os.ReadFile(p.pidPath)
	if err == nil && strings.TrimSpace(string(b)) != strconv.Itoa(p.PID()) {
		return
	}
	os.Remove(p.pidPath)
	os.Remove(p.sock)
}

// Release lets go of swtpm without stopping it (the agent shuts down and
// its VMs keep running). The Process must not be used after.
func (p *Process) Release() { p.p.Release() }

func (p *Process) isReleased() bool { return p.p.Released() }

// FindRunning returns the live swtpm serving stateDir on sock, or nil. The
// pid comes from swtpm.pid next to sock, else from a scan of /proc (an
// agent that died between starting swtpm and writing the pid file); a pid
// is taken only if it is a live swtpm whose command line names stateDir
// and which listens on sock, so a reused pid is never adopted.
func FindRunning(stateDir, sock string) *Process {
	want := filepath.Clean(stateDir)
	pidPath := filepath.Join(filepath.Dir(sock), PIDName)
	var cands []int
	if b, err := os.ReadFile(pidPath); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			cands = append(cands, pid)
		}
	}
	if len(cands) == 0 || !isOurSWTPM(cands[0], want, sock) {
		cands = scanSWTPM(want)
	}
	ours := func(pid int) bool { return isOurSWTPM(pid, want, sock) }
	for _, pid := range cands {
		// Adopt checks again once the pidfd pins the process: the pid may
		// have been reused in between.
		if sp, err := proc.Adopt(pid, ours); err == nil {
			return &Process{p: sp, sock: sock, pidPath: pidPath}
		}
	}
	return nil
}

// RemoveState deletes a VM's TPM state. It refuses (conflict) while a
// swtpm runs on it.
func RemoveState(stateDir string) error {
	if pids := PIDs(stateDir); len(pids) > 0 {
		return errcode.New(errcode.Conflict, "tpm: swtpm (pid %d) still runs on %s", pids[0], stateDir)
	}
	if err := os.RemoveAll(stateDir); err != nil {
		return errcode.Wrap(errcode.Internal, err, "tpm: remove state")
	}
	return nil
}

// PIDs returns the live swtpm processes serving stateDir.
func PIDs(stateDir string) []int { return scanSWTPM(filepath.Clean(stateDir)) }

// scanSWTPM returns the live swtpm processes whose state is the directory
// want (clean).
func scanSWTPM(want string) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if isLive(pid) && hasStateArg(pid, want) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func isOurSWTPM(pid int, want, sock string) bool {
	return isLive(pid) && hasStateArg(pid, want) && listensOn(pid, sock)
}

// isLive reports whether pid is a process that is not a zombie.
func isLive(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(stat, ')')
	return i >= 0 && i+2 < len(stat) && stat[i+2] != 'Z' && stat[i+2] != 'X'
}

// hasStateArg reports whether pid is swtpm whose state is the directory
// want: "--tpmstate" stateArg with its fd 6 on want, or (started by an
// older agent) "--tpmstate dir=want,mode=0600".
func hasStateArg(pid int, want string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
	if len(args) == 0 || !strings.HasPrefix(filepath.Base(args[0]), "swtpm") {
		return false
	}
	for i := 1; i+1 < len(args); i++ {
		if args[i] != "--tpmstate" {
			continue
		}
		switch args[i+1] {
		case pathStateArg(want):
			return true
		case stateArg:
			link, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/fd/" + strconv.Itoa(stateFD))
			if err != nil {
				return false
			}
			if link == want {
				return true
			}
			real, err := filepath.EvalSymlinks(want) // the link is the resolved path
			return err == nil && link == real
		}
	}
	return false
}

// listensOn reports whether one of pid's descriptors is the unix socket
// bound to path (matched by inode through the process's /proc/net/unix).
func listensOn(pid int, path string) bool {
	dir := "/proc/" + strconv.Itoa(pid)
	b, err := os.ReadFile(dir + "/net/unix")
	if err != nil {
		return false
	}
	inodes := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		// Num RefCount Protocol Flags Type St Inode Path
		f := strings.Fields(line)
		if len(f) >= 8 && f[7] == path {
			inodes[f[6]] = true
		}
	}
	if len(inodes) == 0 {
		return false
	}
	fds, err := os.ReadDir(dir + "/fd")
	if err != nil {
		return false
	}
	for _, fd := range fds {
		link, err := os.Readlink(dir + "/fd/" + fd.Name())
		if err != nil {
			continue
		}
		if ino, ok := strings.CutPrefix(link, "socket:["); ok && inodes[strings.TrimSuffix(ino, "]")] {
			return true
		}
	}
	return false
}
