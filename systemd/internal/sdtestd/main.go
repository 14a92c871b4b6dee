// Command sdtestd is a stand-in for otherix-agent in the systemd
// integration test (systemd/nspawn_test.go). It uses the systemd package the
// way the agent does: it picks a placement with DetectPlacer, starts a
// stand-in "VM" (sleep infinity) with ChildEnv, places it in a transient
// scope, sends READY=1 and STATUS=, and answers the watchdog while its task
// loop is alive.
//
// Signals: SIGHUP reloads (RELOADING=1 ... READY=1), SIGUSR1 wedges the
// task loop (the watchdog pings stop), SIGUSR2 stops the VM and removes its
// scope, SIGTERM stops the daemon and leaves the VM running.
//
// The VM's PID is kept in $STATE_DIRECTORY/vm.pid; on start the daemon finds
// a VM that is still running and places it again (a no-op when it is
// already in its scope) instead of starting another.
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/systemd"
)

const (
	vmID       = "test1"
	sleepPath  = "/bin/sleep"
	beatEvery  = 100 * time.Millisecond
	staleAfter = time.Second
	opTimeout  = 30 * time.Second
)

type daemon struct {
	log     *zap.Logger
	notify  *systemd.Notifier
	placer  systemd.Placer
	pidFile string

	vmPID   int    // 0 when no VM
	vmHow   string // "started" or "adopted"
	reloads int
}

func main() {
	log, err := zap.NewProduction()
	if err != nil {
		fmt.Fprintln(os.Stderr, "sdtestd:", err)
		os.Exit(1)
	}
	if err := run(log); err != nil {
		log.Error("sdtestd failed", zap.Error(err))
		os.Exit(1)
	}
}

func run(log *zap.Logger) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)

	stateDir := os.Getenv("STATE_DIRECTORY")
	if stateDir == "" {
		stateDir = "/var/lib/otherix"
	}
	d := &daemon{
		log:     log,
		notify:  systemd.NewNotifier(log),
		placer:  detect(ctx, log),
		pidFile: filepath.Join(stateDir, "vm.pid"),
	}
	if err := d.findOrStartVM(ctx); err != nil {
		return err
	}

	// The task loop: beats while alive; SIGUSR1 wedges it for good.
	var lastBeat atomic.Int64
	lastBeat.Store(time.Now().UnixNano())
	wedge := make(chan struct{})
	go func() {
		t := time.NewTicker(beatEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-wedge:
				<-ctx.Done() // stuck, as a wedged loop would be
				return
			case <-t.C:
				lastBeat.Store(time.Now().UnixNano())
			}
		}
	}()
	healthy := func() bool { return time.Since(time.Unix(0, lastBeat.Load())) < staleAfter }
	go d.notify.RunWatchdog(ctx, healthy)

	if err := d.notify.Ready(d.status()); err != nil {
		return fmt.Errorf("notify ready: %w", err)
	}
	for sig := range sigs {
		switch sig {
		case syscall.SIGHUP:
			_ = d.notify.Reloading()
			d.reloads++
			_ = d.notify.Ready(d.status())
		case syscall.SIGUSR1:
			log.Warn("wedging the task loop on request")
			close(wedge)
			signal.Ignore(syscall.SIGUSR1)
			_ = d.notify.Status(d.status() + "; wedged")
		case syscall.SIGUSR2:
			if err := d.stopVM(ctx); err != nil {
				log.Error("stop vm", zap.Error(err))
				_ = d.notify.Status(d.status() + "; last error: " + err.Error())
				continue
			}
			_ = d.notify.Status(d.status())
		default:
			_ = d.notify.Stopping()
			log.Info("stopping; the vm keeps running", zap.Int("qemu_pid", d.vmPID))
			return nil
		}
	}
	return nil
}

func detect(ctx context.Context, log *zap.Logger) systemd.Placer {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	return systemd.DetectPlacer(ctx, log)
}

func (d *daemon) status() string {
	s := systemd.StatusInfo{VMsTotal: 0}
	if d.vmPID != 0 {
		s.VMsTotal, s.VMsRunning = 1, 1
	}
	line := s.String()
	if d.vmPID != 0 {
		line += fmt.Sprintf("; vm pid %d %s", d.vmPID, d.vmHow)
	} else {
		line += "; no vm"
	}
	return line + fmt.Sprintf("; placement %s; reloads %d", d.placer.Kind(), d.reloads)
}

func (d *daemon) spec(pid int) systemd.UnitSpec {
	return systemd.UnitSpec{
		Name:            systemd.ScopeName(vmID),
		Description:     "otherix VM " + vmID + " (sdtestd stand-in)",
		PIDs:            []int{pid},
		Slice:           systemd.DefaultSlice,
		MemoryMaxBytes:  256 << 20,
		CPUWeight:       200,
		CPUQuotaPercent: 50,
	}
}

// place bounds each placement by its own deadline, as the agent's tasks do;
// the placer's connection must outlive it.
func (d *daemon) place(ctx context.Context, pid int) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	return d.placer.Place(ctx, d.spec(pid))
}

func (d *daemon) findOrStartVM(ctx context.Context) error {
	if pid, ok := d.runningVM(); ok {
		// Placing again is a no-op when the VM is already in its scope.
		if err := d.place(ctx, pid); err != nil {
			return fmt.Errorf("place adopted vm: %w", err)
		}
		d.vmPID, d.vmHow = pid, "adopted"
		d.log.Info("found running vm", zap.String("vm", vmID), zap.Int("qemu_pid", pid))
		return nil
	}
	cmd := exec.Command(sleepPath, "infinity")
	cmd.Env = systemd.ChildEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start vm: %w", err)
	}
	go func() { _ = cmd.Wait() }() // reap it if it ends while we live
	pid := cmd.Process.Pid
	if err := d.place(ctx, pid); err != nil {
		_ = cmd.Process.Kill()
		return fmt.Errorf("place vm: %w", err)
	}
	if err := os.WriteFile(d.pidFile, []byte(strconv.Itoa(pid)), 0o600); err != nil {
		return fmt.Errorf("save vm pid: %w", err)
	}
	d.vmPID, d.vmHow = pid, "started"
	d.log.Info("started vm", zap.String("vm", vmID), zap.Int("qemu_pid", pid))
	return nil
}

// runningVM reports the saved VM pid if that process still runs our VM.
func (d *daemon) runningVM() (int, bool) {
	b, err := os.ReadFile(d.pidFile)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Equal(cmdline, []byte(sleepPath+"\x00infinity\x00")) {
		return 0, false
	}
	return pid, true
}

// stopVM ends the VM process, waits until it is gone and removes its scope.
func (d *daemon) stopVM(ctx context.Context) error {
	if d.vmPID == 0 {
		return errors.New("no vm")
	}
	fd, err := unix.PidfdOpen(d.vmPID, 0)
	if err == nil {
		defer unix.Close(fd)
		if err := unix.PidfdSendSignal(fd, unix.SIGTERM, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("signal vm: %w", err)
		}
		// The pidfd becomes readable when the process has exited.
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); !errors.Is(err, unix.EINTR) {
				break
			}
		}
	} else if !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("open vm pidfd: %w", err)
	}
	rctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	if err := d.placer.Remove(rctx, systemd.ScopeName(vmID)); err != nil {
		return fmt.Errorf("remove scope: %w", err)
	}
	if err := os.Remove(d.pidFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("forget vm: %w", err)
	}
	d.log.Info("vm stopped", zap.String("vm", vmID), zap.Int("qemu_pid", d.vmPID))
	d.vmPID, d.vmHow = 0, ""
	return nil
}
