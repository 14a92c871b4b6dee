// Package netdevtest gives network tests a private network namespace with a
// bridge and a DHCP server (dnsmasq), and boots the real test guest with
// any NIC. Everything it makes is removed by t.Cleanup, also on failure.
//
// Traffic stays inside the namespace or on the host's loopback.
package netdevtest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// RequireRoot skips the test unless it runs as root (namespaces, links and
// bridges need CAP_NET_ADMIN; CI runs as root).
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: creates network namespaces and links")
	}
}

// Netns is a network namespace made for one test: oxtest-<8 hex>.
type Netns struct {
	Name string
}

// NewNetns creates a namespace with its loopback up; t.Cleanup deletes it.
func NewNetns(tb testing.TB) *Netns {
	tb.Helper()
	RequireRoot(tb)
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		tb.Fatal(err)
	}
	n := &Netns{Name: "oxtest-" + hex.EncodeToString(b[:])}
	run(tb, "ip", "netns", "add", n.Name)
	tb.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
			tb.Errorf("ip netns del %s: %v: %s", n.Name, err, out)
		}
	})
	n.IP(tb, "link", "set", "lo", "up")
	return n
}

// IP runs `ip -n NAME args...` and fails the test on error.
func (n *Netns) IP(tb testing.TB, args ...string) string {
	tb.Helper()
	return run(tb, "ip", append([]string{"-n", n.Name}, args...)...)
}

// Command returns a command that runs inside the namespace (ip netns exec).
func (n *Netns) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	return cmd
}

// Do runs f on an OS thread that joined the namespace. The thread is never
// given back to the Go scheduler (its goroutine ends locked), so nothing
// else ever runs in the namespace by accident. Goroutines that f starts
// are not in the namespace; sockets and links f makes are.
func (n *Netns) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open(filepath.Join("/run/netns", n.Name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", n.Name, err)
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.Name, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// DialContext dials from inside the namespace: a dialer for code that
// reaches guests on the namespace's bridge (portfwd.Proxy).
func (n *Netns) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// Bridge creates a bridge in the namespace with addr (CIDR) on it, up.
func (n *Netns) Bridge(tb testing.TB, name, addr string) {
	tb.Helper()
	n.IP(tb, "link", "add", name, "type", "bridge")
	// No STP forwarding delay: ports forward at once.
	n.IP(tb, "link", "set", name, "type", "bridge", "forward_delay", "0")
	n.IP(tb, "addr", "add", addr, "dev", name)
	n.IP(tb, "link", "set", name, "up")
}

// Veth creates a veth pair in the namespace, both ends up, peer a port of
// bridge.
func (n *Netns) Veth(tb testing.TB, name, peer, bridge string) {
	tb.Helper()
	n.IP(tb, "link", "add", name, "type", "veth", "peer", "name", peer)
	n.IP(tb, "link", "set", peer, "master", bridge)
	n.IP(tb, "link", "set", peer, "up")
	n.IP(tb, "link", "set", name, "up")
}

// Links returns the names of the namespace's links.
func (n *Netns) Links(tb testing.TB) []string {
	tb.Helper()
	var names []string
	for _, line := range strings.Split(n.IP(tb, "-o", "link", "show"), "\n") {
		// "3: name@peer: <...> ..."
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		names = append(names, name)
	}
	return names
}

// HasLink reports whether the namespace has a link called name.
func (n *Netns) HasLink(tb testing.TB, name string) bool {
	tb.Helper()
	for _, l := range n.Links(tb) {
		if l == name {
			return true
		}
	}
	return false
}

// DHCP runs dnsmasq as DHCP server (no DNS) on iface in the namespace,
// leasing from..to, and returns once it serves. Extra arguments go to
// dnsmasq (e.g. "--dhcp-host=52:54:00:00:00:01,10.77.0.11" for a fixed
// address). t.Cleanup stops it.
func (n *Netns) DHCP(tb testing.TB, iface, from, to string, extra ...string) {
	tb.Helper()
	bin := ensureDnsmasq(tb)
	dir := tb.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := n.Command(ctx, bin,
		"--keep-in-foreground", "--no-daemon", "--conf-file=/dev/null", "--port=0",
		"--interface="+iface, "--bind-interfaces", "--except-interface=lo",
		"--dhcp-range="+from+","+to+",255.255.255.0,1h",
		"--dhcp-leasefile="+filepath.Join(dir, "leases"),
		"--pid-file="+filepath.Join(dir, "pid"), "--log-facility=-", "--log-dhcp",
		"--dhcp-authoritative",
		// No ping before offering an address: nothing else is on this
		// network, and the check costs about 3 s per lease.
		"--no-ping")
	cmd.Args = append(cmd.Args, extra...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stdout = io.Discard
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		cancel()
		tb.Fatalf("start dnsmasq: %v", err)
	}
	var mu sync.Mutex
	var log strings.Builder
	ready := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			mu.Lock()
			log.WriteString(sc.Text() + "\n")
			mu.Unlock()
			if strings.Contains(sc.Text(), "DHCP, IP range") {
				once.Do(func() { close(ready) })
			}
		}
	}()
	tb.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
		<-done
		if tb.Failed() {
			mu.Lock()
			tb.Logf("dnsmasq log:\n%s", log.String())
			mu.Unlock()
		}
	})
	select {
	case <-ready:
	case <-done:
		mu.Lock()
		defer mu.Unlock()
		tb.Fatalf("dnsmasq exited: %s", log.String())
	case <-time.After(30 * time.Second):
		tb.Fatalf("dnsmasq not serving after 30 s")
	}
}

var installMu sync.Mutex

// ensureDnsmasq returns the dnsmasq binary, installing Debian's
// dnsmasq-base if it is missing.
func ensureDnsmasq(tb testing.TB) string {
	tb.Helper()
	installMu.Lock()
	defer installMu.Unlock()
	for _, p := range []string{"/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	env := append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	install := func() error {
		cmd := exec.Command("apt-get", "install", "-y", "-q", "--no-install-recommends", "dnsmasq-base")
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	}
	if err := install(); err != nil {
		cmd := exec.Command("apt-get", "update", "-q")
		cmd.Env = env
		_ = cmd.Run()
		if err := install(); err != nil {
			tb.Fatalf("install dnsmasq-base: %v", err)
		}
	}
	return "/usr/sbin/dnsmasq"
}

func run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// FreePort returns a TCP and UDP port on 127.0.0.1 that was free a moment
// ago. It is picked below the kernel's ephemeral range
// (net.ipv4.ip_local_port_range): a port the kernel hands out for ":0"
// is one it may hand out again at once as the source port of any
// process's outgoing connection, and a test that binds it a moment later
// then finds it in use.
func FreePort(tb testing.TB) int {
	tb.Helper()
	port, err := Port()
	if err != nil {
		tb.Fatal(err)
	}
	return port
}

// Port is FreePort for code outside a test (a TestMain's setup).
func Port() (int, error) {
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 11000 {
				lo = n
			}
		}
	}
	const first = 10000 // above the registered services most hosts run
	for range 200 {
		var b [2]byte
		rand.Read(b[:])
		port := first + (int(b[0])<<8|int(b[1]))%(lo-first)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		l.Close()
		if err != nil {
			continue
		}
		u.Close()
		return port, nil
	}
	return 0, errors.New("no port below the ephemeral range free for both tcp and udp")
}
