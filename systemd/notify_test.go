package systemd

import (
	"context"
	"errors"
	"net"
	"os"
	"regexp"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"
)

// notifySocket is a real sd_notify listener: a unixgram socket the test
// points NOTIFY_SOCKET at.
type notifySocket struct {
	t    *testing.T
	conn *net.UnixConn
	path string
}

func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	// t.TempDir can exceed the 108-byte limit of socket paths.
	dir, err := os.MkdirTemp("", "sdnotify")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := dir + "/notify.sock"
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &notifySocket{t: t, conn: conn, path: path}
}

// notifier points NOTIFY_SOCKET (and optionally the watchdog) at s and
// returns a Notifier made from that environment.
func (s *notifySocket) notifier(watchdogUSec string) *Notifier {
	s.t.Setenv("NOTIFY_SOCKET", s.path)
	s.t.Setenv("WATCHDOG_USEC", watchdogUSec)
	s.t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	return NewNotifier(zap.NewNop())
}

// next returns the next datagram. The deadline only bounds a broken test;
// every message it waits for has already been sent or is about to be.
func (s *notifySocket) next() string {
	s.t.Helper()
	buf := make([]byte, 4096)
	if err := s.conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		s.t.Fatal(err)
	}
	n, err := s.conn.Read(buf)
	if err != nil {
		s.t.Fatalf("read notify socket: %v", err)
	}
	return string(buf[:n])
}

// pending reports a datagram already queued, if any, without waiting.
func (s *notifySocket) pending() (string, bool) {
	s.t.Helper()
	buf := make([]byte, 4096)
	if err := s.conn.SetReadDeadline(time.Now()); err != nil {
		s.t.Fatal(err)
	}
	n, err := s.conn.Read(buf)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "", false
	}
	if err != nil {
		s.t.Fatalf("read notify socket: %v", err)
	}
	return string(buf[:n]), true
}

func TestNotifyMessages(t *testing.T) {
	sock := listenNotify(t)
	n := sock.notifier("")
	if !n.Enabled() {
		t.Fatal("Enabled() = false with NOTIFY_SOCKET set")
	}
	tests := []struct {
		name string
		send func() error
		want string // a regexp matching the whole datagram
	}{
		{"ready", func() error { return n.Ready("") }, `READY=1`},
		{"ready with status", func() error {
			return n.Ready(StatusInfo{VMsRunning: 2, VMsTotal: 3, ControlPlane: true}.String())
		}, `READY=1\nSTATUS=2/3 VMs running; control plane connected`},
		{"status", func() error {
			return n.Status(StatusInfo{VMsTotal: 1, LastError: "disk_full: pool p1"}.String())
		}, `STATUS=0/1 VMs running; control plane disconnected; last error: disk_full: pool p1`},
		{"status cannot inject an assignment", func() error { return n.Status("boom\nREADY=1\r\nX") },
			`STATUS=boom READY=1 X`},
		{"stopping", n.Stopping, `STOPPING=1`},
		{"reloading", n.Reloading, `RELOADING=1\nMONOTONIC_USEC=[1-9][0-9]*`},
		{"watchdog", n.Watchdog, `WATCHDOG=1`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.send(); err != nil {
				t.Fatalf("send: %v", err)
			}
			got := sock.next()
			if !regexp.MustCompile(`^(?:` + tt.want + `)$`).MatchString(got) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

// NewNotifier takes systemd's variables out of the environment, and no
// send (through go-systemd's daemon.SdNotify, which reads the socket from
// the environment) leaves NOTIFY_SOCKET behind, whether it reached the
// socket or failed.
func TestNewNotifierClearsEnvironment(t *testing.T) {
	sock := listenNotify(t)
	n := sock.notifier("200000")
	cleared := func(when string) {
		t.Helper()
		for _, k := range []string{"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} {
			if v, ok := os.LookupEnv(k); ok {
				t.Errorf("%s: %s=%q still in the environment", when, k, v)
			}
		}
	}
	cleared("after NewNotifier")
	for _, send := range []func() error{func() error { return n.Ready("x") }, n.Watchdog, n.Stopping} {
		if err := send(); err != nil {
			t.Fatal(err)
		}
		sock.next()
		cleared("after a send")
	}
	sock.conn.Close() // nothing listens any more: the send fails
	if err := n.Watchdog(); err == nil {
		t.Error("a send to a closed socket reported no error")
	}
	cleared("after a failed send")
}

func TestNotifierWithoutSocketIsSilentNoop(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "200000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	for name, n := range map[string]*Notifier{
		"from env": NewNotifier(nil),
		"zero":     {},
		"nil":      nil,
	} {
		t.Run(name, func(t *testing.T) {
			if n.Enabled() {
				t.Error("Enabled() = true")
			}
			for _, f := range []func() error{
				func() error { return n.Ready("x") }, func() error { return n.Status("x") },
				n.Stopping, n.Reloading, n.Watchdog,
			} {
				if err := f(); err != nil {
					t.Errorf("got %v, want nil", err)
				}
			}
			if d, ok := n.WatchdogInterval(); ok {
				t.Errorf("WatchdogInterval() = %v, true; want false", d)
			}
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			n.RunWatchdog(ctx, func() bool { t.Error("healthy called without a watchdog"); return true })
		})
	}
}

func TestWatchdogInterval(t *testing.T) {
	self := strconv.Itoa(os.Getpid())
	tests := []struct {
		usec, pid string
		want      time.Duration
		ok        bool
	}{
		{"200000", self, 100 * time.Millisecond, true},
		{"30000000", "", 15 * time.Second, true}, // no WATCHDOG_PID: for us
		{"30000000", "1", 0, false},              // for another process
		{"", self, 0, false},
		{"0", self, 0, false},
		{"-5", self, 0, false},
		{"abc", self, 0, false},
		{"200000", "abc", 0, false},
		{"18446744073709551615", self, 0, false}, // infinity
		{"9223372036854775807", self, 0, false},  // ×1000 overflows to a negative duration
		{"18446744073709552", self, 0, false},    // ×1000 wraps to 384ns: no ping storm
		{"+200000", self, 0, false},              // not what systemd writes
		{"000200000", self, 100 * time.Millisecond, true},
	}
	sock := listenNotify(t)
	for _, tt := range tests {
		t.Run(tt.usec+"/"+tt.pid, func(t *testing.T) {
			t.Setenv("NOTIFY_SOCKET", sock.path)
			t.Setenv("WATCHDOG_USEC", tt.usec)
			t.Setenv("WATCHDOG_PID", tt.pid)
			got, ok := NewNotifier(nil).WatchdogInterval()
			if got != tt.want || ok != tt.ok {
				t.Errorf("got %v, %v; want %v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}

// TestRunWatchdog drives RunWatchdog tick by tick through healthy(): each
// answer is taken by exactly one tick, so the pings can be counted exactly,
// without timing assertions.
func TestRunWatchdog(t *testing.T) {
	sock := listenNotify(t)
	n := sock.notifier("200000") // WATCHDOG_USEC=200ms: a tick every 100ms
	if d, ok := n.WatchdogInterval(); !ok || d != 100*time.Millisecond {
		t.Fatalf("WatchdogInterval() = %v, %v; want 100ms, true", d, ok)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	answers := make(chan bool)
	healthy := func() bool {
		select {
		case ok := <-answers:
			return ok
		case <-ctx.Done():
			return false
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.RunWatchdog(ctx, healthy)
	}()
	tick := func(ok bool) {
		select {
		case answers <- ok:
		case <-done:
			t.Fatal("RunWatchdog returned early")
		}
	}

	// Healthy: one WATCHDOG=1 per tick.
	const healthyTicks = 5
	for i := range healthyTicks {
		tick(true)
		if got := sock.next(); got != "WATCHDOG=1" {
			t.Fatalf("ping %d: got %q, want WATCHDOG=1", i, got)
		}
	}
	// Unhealthy: the loop keeps ticking (it takes every answer) but sends
	// nothing.
	for range 3 {
		tick(false)
	}
	// Healthy again: pings resume, and the next datagram is that ping, so
	// none was sent while unhealthy.
	tick(true)
	if got := sock.next(); got != "WATCHDOG=1" {
		t.Fatalf("after recovery: got %q, want WATCHDOG=1", got)
	}
	// Unhealthy, then the context ends: RunWatchdog returns and nothing
	// more was sent.
	tick(false)
	cancel()
	<-done
	if got, ok := sock.pending(); ok {
		t.Errorf("datagram %q sent while unhealthy", got)
	}
}

func TestStatusInfoString(t *testing.T) {
	tests := []struct {
		in   StatusInfo
		want string
	}{
		{StatusInfo{}, "0/0 VMs running; control plane disconnected"},
		{StatusInfo{VMsRunning: 2, VMsTotal: 3, ControlPlane: true}, "2/3 VMs running; control plane connected"},
		{StatusInfo{VMsTotal: 1, LastError: "stop_timeout: vm web-1\ndid not stop"},
			"0/1 VMs running; control plane disconnected; last error: stop_timeout: vm web-1 did not stop"},
	}
	for _, tt := range tests {
		if got := tt.in.String(); got != tt.want {
			t.Errorf("%+v: got %q, want %q", tt.in, got, tt.want)
		}
	}
}
