package systemd

import (
	"context"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
)

// watchdogFromEnv returns the WATCHDOG_USEC timeout when WATCHDOG_PID is
// absent or names this process, else 0, and removes both variables from
// the environment (daemon.SdWatchdogEnabled reads them). A malformed
// value disables the watchdog with a warning: systemd will then kill the
// agent, which is visible, rather than the agent refusing to start. A
// value too large for a time.Duration (about 292 years: "infinity" in
// practice) disables it too.
func watchdogFromEnv(log *zap.Logger) time.Duration {
	usec, pid := os.Getenv("WATCHDOG_USEC"), os.Getenv("WATCHDOG_PID")
	d, err := daemon.SdWatchdogEnabled(true)
	switch {
	case err != nil:
		log.Warn("ignoring malformed WATCHDOG_USEC or WATCHDOG_PID", zap.String("usec", usec), zap.String("pid", pid), zap.Error(err))
		return 0
	case d <= 0:
		return 0 // not enabled, or for another process
	case strconv.FormatInt(int64(d/time.Microsecond), 10) != strings.TrimLeft(usec, "0") || d%time.Microsecond != 0:
		// Not the plain number of microseconds systemd writes, or one
		// the library's multiplication took past int64 (it may wrap to
		// a tiny positive duration: pings every few nanoseconds).
		log.Warn("ignoring WATCHDOG_USEC out of range", zap.String("usec", usec))
		return 0
	}
	return d
}

// WatchdogInterval returns how often to send WATCHDOG=1: half of
// WATCHDOG_USEC, as sd_watchdog_enabled(3) advises. ok is false when the
// watchdog is not enabled for this process.
func (n *Notifier) WatchdogInterval() (interval time.Duration, ok bool) {
	if !n.Enabled() || n.watchdog <= 0 {
		return 0, false
	}
	return n.watchdog / 2, true
}

// RunWatchdog sends WATCHDOG=1 every WatchdogInterval while healthy returns
// true. When healthy returns false it stops pinging but keeps running, so
// systemd's watchdog fires and restarts the agent; if healthy becomes true
// again before that, pings resume. healthy is called from this goroutine
// once per interval; a healthy that blocks also stops the pings.
// RunWatchdog returns when ctx is done; without a watchdog it only waits
// for ctx.
func (n *Notifier) RunWatchdog(ctx context.Context, healthy func() bool) {
	interval, ok := n.WatchdogInterval()
	if !ok {
		<-ctx.Done()
		return
	}
	n.log.Info("systemd watchdog enabled", zap.Duration("interval", interval))
	t := time.NewTicker(interval)
	defer t.Stop()
	wasHealthy := true
	for {
		ok := healthy()
		switch {
		case ok:
			if !wasHealthy {
				n.log.Info("agent healthy again, resuming watchdog pings")
			}
			if err := n.Watchdog(); err != nil {
				n.log.Warn("watchdog ping failed", zap.Error(err))
			}
		case wasHealthy:
			n.log.Error("agent unhealthy, withholding watchdog pings; systemd will restart the agent",
				zap.Duration("watchdog_timeout", n.watchdog))
		}
		wasHealthy = ok
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
