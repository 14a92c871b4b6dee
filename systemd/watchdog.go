package systemd

import (
	"context"
	"strconv"
	"time"

	"go.uber.org/zap"
)

// watchdogFromEnv returns the WATCHDOG_USEC timeout when it is meant for
// pid, else 0. A malformed value disables the watchdog with a warning:
// systemd will then kill the agent, which is visible, rather than the agent
// refusing to start.
func watchdogFromEnv(log *zap.Logger, usec, wpid string, pid int) time.Duration {
	if usec == "" {
		return 0
	}
	u, err := strconv.ParseUint(usec, 10, 63)
	if err != nil || u == 0 {
		log.Warn("ignoring malformed WATCHDOG_USEC", zap.String("value", usec))
		return 0
	}
	if wpid != "" {
		p, err := strconv.Atoi(wpid)
		if err != nil {
			log.Warn("ignoring malformed WATCHDOG_PID", zap.String("value", wpid))
			return 0
		}
		if p != pid {
			return 0 // the watchdog is for another process
		}
	}
	if u > uint64(1<<63-1)/uint64(time.Microsecond) {
		return 0 // "infinity" in practice
	}
	return time.Duration(u) * time.Microsecond
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
