// Package systemd ties the agent to the service manager: sd_notify
// (READY, STATUS, STOPPING, RELOADING, WATCHDOG), the watchdog loop, the
// placement of QEMU processes in transient scopes so that VMs outlive the
// agent, and the minimal environment given to child processes.
//
// The sd_notify wire and WATCHDOG_USEC go through go-systemd's daemon
// package; this package adds what the agent needs around it: one reading
// of the environment at start (then cleared, so no child inherits it),
// ordered sends, STATUS lines that cannot inject an assignment, and the
// health-gated watchdog loop.
//
// Everything degrades to a silent no-op when the agent does not run under
// systemd (no NOTIFY_SOCKET, PID 1 not systemd).
package systemd

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
)

// notifySocketEnv is where systemd puts its notification socket.
const notifySocketEnv = "NOTIFY_SOCKET"

// Notifier sends sd_notify messages to the service manager. Its zero value
// and a Notifier made without NOTIFY_SOCKET are silent no-ops. It is safe
// for concurrent use.
type Notifier struct {
	log    *zap.Logger
	socket string // NOTIFY_SOCKET, "" when not under a notify-aware manager

	watchdog time.Duration // WATCHDOG_USEC, 0 when disabled or not for us

	mu sync.Mutex // serialises sends so messages keep their order
}

// NewNotifier reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, then
// removes them from the process environment so that no child started later
// (with or without an explicit environment) can inherit them. Without
// NOTIFY_SOCKET every method is a no-op that returns nil. Make one per
// process: a second NewNotifier finds the variables gone and is a no-op.
func NewNotifier(log *zap.Logger) *Notifier {
	if log == nil {
		log = zap.NewNop()
	}
	n := &Notifier{log: log, socket: os.Getenv(notifySocketEnv)}
	_ = os.Unsetenv(notifySocketEnv) // only fails for an invalid key
	n.watchdog = watchdogFromEnv(log)
	if n.socket == "" {
		log.Debug("systemd notify disabled: NOTIFY_SOCKET not set")
	}
	return n
}

// Enabled reports whether messages go anywhere.
func (n *Notifier) Enabled() bool { return n != nil && n.socket != "" }

// Ready tells systemd that start-up (or a reload) is finished and the agent
// can serve. status, when not empty, is sent with it as the STATUS= line.
func (n *Notifier) Ready(status string) error {
	if status == "" {
		return n.send(daemon.SdNotifyReady)
	}
	return n.send(daemon.SdNotifyReady + "\nSTATUS=" + oneLine(status))
}

// Status sets the free-form line shown by `systemctl status` (for example
// the output of StatusLine).
func (n *Notifier) Status(s string) error { return n.send("STATUS=" + oneLine(s)) }

// Stopping tells systemd the agent has begun shutting down.
func (n *Notifier) Stopping() error { return n.send(daemon.SdNotifyStopping) }

// Reloading tells systemd the agent is reloading its configuration; call
// Ready when the reload is done. MONOTONIC_USEC is included because systemd
// 253 and later require it for Type=notify-reload.
func (n *Notifier) Reloading() error {
	msg := daemon.SdNotifyReloading
	if ts := strings.TrimSuffix(daemon.SdNotifyMonotonicUsec(), "\n"); ts != "" {
		msg += "\n" + ts
	}
	return n.send(msg)
}

// Watchdog sends one WATCHDOG=1 keep-alive ping.
func (n *Notifier) Watchdog() error { return n.send(daemon.SdNotifyWatchdog) }

func (n *Notifier) send(msg string) error {
	if !n.Enabled() {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	// daemon.SdNotify takes the socket from the environment, which
	// NewNotifier cleared: put it back for this one send, and let
	// SdNotify take it out again (unsetEnvironment) before it even dials.
	// It is in the environment only between these two calls; a child
	// forked in that window could inherit it, but QEMU gets an explicit
	// environment (ChildEnv) and the unit's NotifyAccess=main makes
	// systemd ignore any other process anyway. SdNotify dials a datagram
	// socket per message, so a systemd that re-created its socket
	// (daemon-reexec) is still reached.
	if err := os.Setenv(notifySocketEnv, n.socket); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	sent, err := daemon.SdNotify(true, msg)
	switch {
	case err != nil:
		return fmt.Errorf("sd_notify %s: %w", n.socket, err)
	case !sent:
		return fmt.Errorf("sd_notify %s: not sent", n.socket)
	}
	return nil
}

// oneLine keeps a STATUS= value on one line: a newline would start a new
// assignment (an error message must never be able to say READY=1).
func oneLine(s string) string {
	if !strings.ContainsAny(s, "\r\n") {
		return s
	}
	return strings.Join(strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' }), " ")
}
