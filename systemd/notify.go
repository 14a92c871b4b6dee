// Package systemd ties the agent to the service manager: sd_notify
// (READY, STATUS, STOPPING, RELOADING, WATCHDOG), the watchdog loop, the
// placement of QEMU processes in transient scopes so that VMs outlive the
// agent, and the minimal environment given to child processes.
//
// Everything degrades to a silent no-op when the agent does not run under
// systemd (no NOTIFY_SOCKET, PID 1 not systemd).
package systemd

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

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
	n := &Notifier{log: log, socket: os.Getenv("NOTIFY_SOCKET")}
	n.watchdog = watchdogFromEnv(log, os.Getenv("WATCHDOG_USEC"), os.Getenv("WATCHDOG_PID"), os.Getpid())
	for _, k := range []string{"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} {
		_ = os.Unsetenv(k) // only fails for an invalid key
	}
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
		return n.send("READY=1")
	}
	return n.send("READY=1\nSTATUS=" + oneLine(status))
}

// Status sets the free-form line shown by `systemctl status` (for example
// the output of StatusLine).
func (n *Notifier) Status(s string) error { return n.send("STATUS=" + oneLine(s)) }

// Stopping tells systemd the agent has begun shutting down.
func (n *Notifier) Stopping() error { return n.send("STOPPING=1") }

// Reloading tells systemd the agent is reloading its configuration; call
// Ready when the reload is done. MONOTONIC_USEC is included because systemd
// 253 and later require it for Type=notify-reload.
func (n *Notifier) Reloading() error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return n.send("RELOADING=1")
	}
	usec := ts.Nano() / int64(time.Microsecond)
	return n.send("RELOADING=1\nMONOTONIC_USEC=" + strconv.FormatInt(usec, 10))
}

// Watchdog sends one WATCHDOG=1 keep-alive ping.
func (n *Notifier) Watchdog() error { return n.send("WATCHDOG=1") }

func (n *Notifier) send(msg string) error {
	if !n.Enabled() {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	// A datagram socket per message: systemd may re-create its socket
	// (daemon-reexec), and a socket connected to the old one would fail.
	// An address starting with '@' is in the abstract namespace, which the
	// net package handles.
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: n.socket, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: connect %s: %w", n.socket, err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(msg)); err != nil {
		return fmt.Errorf("sd_notify: send: %w", err)
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
