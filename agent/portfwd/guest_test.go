package portfwd_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/qmp"
)

// Guest servers: busybox httpd on 80, a UDP echo on 7 (netcat-traditional),
// a TCP discard on 9 (busybox nc, one connection after another); the last
// line waits, in the guest, until all listen.
const httpBody = "hello-from-guest-httpd"

var guestServers = []string{
	"mkdir -p /www && echo " + httpBody + " >/www/index.html && httpd -p 80 -h /www",
	"nc.traditional -u -l -p 7 -e /bin/cat >/dev/null 2>&1 &",
	"nc -ll -p 9 -e sh -c 'cat >/dev/null' &",
	"i=0; until netstat -lnu | grep -q ':7 ' && netstat -lnt | grep -q ':9 '; do i=$((i+1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done; echo servers-up",
}

// httpGet fetches / from addr and returns the body.
func httpGet(ctx context.Context, addr string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/", nil)
	if err != nil {
		return "", err
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(b)), err
}

// udpEchoes sends msg to addr and waits for it back, sending again every
// second (the first datagram may reach the guest before its server binds,
// or be lost) until ctx ends.
func udpEchoes(ctx context.Context, addr, msg string) error {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 1500)
	for ctx.Err() == nil {
		if _, err := c.Write([]byte(msg)); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if err == nil && string(buf[:n]) == msg {
			return nil
		}
	}
	return fmt.Errorf("no udp echo of %q from %s: %w", msg, addr, ctx.Err())
}

// TestSLIRPForwards: a user-mode NIC with a hostfwd at start (TCP to
// httpd) and forwards added and removed at run time through HMP over a
// real QMP connection (UDP echo, TCP), a busy port refused with
// port_in_use.
func TestSLIRPForwards(t *testing.T) {
	t.Parallel()
	httpPort, udpPort, tcpPort := netdevtest.FreePort(t), netdevtest.FreePort(t), netdevtest.FreePort(t)
	start, err := portfwd.Validate(nil, []portfwd.Rule{{Proto: "TCP", DestProto: "TCP", HostAddr: "127.0.0.1", HostPort: httpPort, GuestPort: 80}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), netdevtest.BootTimeout)
	defer cancel()
	if err := portfwd.CheckFree(ctx, start); err != nil {
		t.Fatal(err)
	}
	opts, err := portfwd.HostFwdOptions(start)
	if err != nil {
		t.Fatal(err)
	}
	g := netdevtest.Boot(t, netdevtest.GuestOptions{
		Run:     guestServers,
		NetArgs: []string{"-netdev", "user,id=net0," + strings.Join(opts, ","), "-device", "virtio-net-pci,netdev=net0"},
	})
	g.Expect(ctx, t, "servers-up")

	if body, err := httpGet(ctx, fmt.Sprintf("127.0.0.1:%d", httpPort)); err != nil || body != httpBody {
		t.Fatalf("GET through hostfwd = %q, %v", body, err)
	}

	q, err := qmp.Dial(ctx, g.QMPPath())
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	hmp := func(ctx context.Context, line string) (string, error) {
		var out string
		err := q.Execute(ctx, "human-monitor-command", map[string]any{"command-line": line}, &out)
		return out, err
	}
	rules, err := portfwd.Validate(start, []portfwd.Rule{
		{Proto: "udp", HostAddr: "127.0.0.1", HostPort: udpPort, GuestPort: 7},
		{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: tcpPort, GuestPort: 80},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if err := portfwd.AddHostFwd(ctx, hmp, "net0", r); err != nil {
			t.Fatal(err)
		}
	}
	uctx, ucancel := context.WithTimeout(ctx, 30*time.Second)
	defer ucancel()
	if err := udpEchoes(uctx, fmt.Sprintf("127.0.0.1:%d", udpPort), "ping-over-slirp"); err != nil {
		t.Error(err)
	}
	if body, err := httpGet(ctx, fmt.Sprintf("127.0.0.1:%d", tcpPort)); err != nil || body != httpBody {
		t.Errorf("GET through runtime hostfwd = %q, %v", body, err)
	}

	// A busy host port: port_in_use, nothing added.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	br := portfwd.Rule{Proto: "tcp", DestProto: "tcp", HostAddr: "127.0.0.1", HostPort: busy.Addr().(*net.TCPAddr).Port, GuestPort: 80}
	if err := portfwd.AddHostFwd(ctx, hmp, "net0", br); !errcode.Is(err, errcode.PortInUse) {
		t.Errorf("hostfwd_add on a busy port = %v, want port_in_use", err)
	}
	if err := portfwd.RemoveHostFwd(ctx, hmp, "net0", br); !errcode.Is(err, errcode.NotFound) {
		t.Errorf("the refused forward is there: remove = %v, want not_found", err)
	}
	// QEMU itself refusing (the port taken behind CheckFree's back) maps
	// the same way: ask it directly for the port it already forwards.
	out, err := hmp(ctx, fmt.Sprintf("hostfwd_add net0 tcp:127.0.0.1:%d-:80", httpPort))
	if err != nil || !strings.Contains(out, "Could not set up host forwarding rule") {
		t.Errorf("qemu on a taken port answered %q, %v", out, err)
	}
	nr := portfwd.Rule{Proto: "tcp", DestProto: "tcp", HostAddr: "127.0.0.1", HostPort: netdevtest.FreePort(t), GuestPort: 80}
	if err := portfwd.AddHostFwd(ctx, hmp, "nope", nr); !errcode.Is(err, errcode.NotFound) {
		t.Errorf("hostfwd_add on an unknown netdev = %v, want not_found", err)
	}

	// Remove: the port closes; removing again is not_found.
	if err := portfwd.RemoveHostFwd(ctx, hmp, "net0", rules[1]); err != nil {
		t.Fatal(err)
	}
	if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", tcpPort)); err == nil {
		c.Close()
		t.Errorf("port %d still forwarded after hostfwd_remove", tcpPort)
	}
	if err := portfwd.RemoveHostFwd(ctx, hmp, "net0", rules[1]); !errcode.Is(err, errcode.NotFound) {
		t.Errorf("second remove = %v, want not_found", err)
	}
}

// bridged is a guest on a tap of a bridge in a private namespace, with a
// DHCP lease and the guest servers up.
type bridged struct {
	ns *netdevtest.Netns
	ip netip.Addr
}

func bootBridged(tb testing.TB, subnet string) *bridged {
	tb.Helper()
	ns := netdevtest.NewNetns(tb)
	ns.Bridge(tb, "br0", subnet+".1/24")
	ns.DHCP(tb, "br0", subnet+".100", subnet+".150")
	mac := netdev.GenerateMAC("5b1d2c3e-4f50-4a61-b723-8495a6b7c8d9", 0)
	var tap *netdev.Attached
	if err := ns.Do(func() error {
		var err error
		tap, err = netdev.Create(context.Background(), "5b1d2c3e4f50", netdev.NICRequest{Type: netdev.TypeBridge, Bridge: "br0", MAC: mac})
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	g := netdevtest.Boot(tb, netdevtest.GuestOptions{
		Run:        guestServers,
		NetArgs:    netdev.QEMUArgs(0, tap, 3, ""),
		ExtraFiles: []*os.File{tap.File},
	})
	tap.Close()
	ctx, cancel := context.WithTimeout(context.Background(), netdevtest.BootTimeout)
	defer cancel()
	ip, err := netip.ParseAddr(g.IP(ctx, tb, "eth0"))
	if err != nil {
		tb.Fatalf("no lease: %v", err)
	}
	g.Expect(ctx, tb, "servers-up")
	return &bridged{ns: ns, ip: ip}
}

// TestBridgedProxy: the agent-side proxy on the host's loopback reaches
// httpd (TCP) and the UDP echo of a bridged guest; a busy port is refused
// with nothing set up.
func TestBridgedProxy(t *testing.T) {
	t.Parallel()
	b := bootBridged(t, "10.77.6")
	p := portfwd.NewProxy(func(context.Context) (netip.Addr, error) { return b.ip, nil },
		portfwd.ProxyOptions{Dial: b.ns.DialContext})
	defer p.Close()
	httpPort, udpPort := netdevtest.FreePort(t), netdevtest.FreePort(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.Add(ctx,
		portfwd.Rule{Proto: "TCP", DestProto: "TCP", HostAddr: "127.0.0.1", HostPort: httpPort, GuestPort: 80},
		portfwd.Rule{Proto: "UDP", DestProto: "UDP", HostAddr: "127.0.0.1", HostPort: udpPort, GuestPort: 7},
	); err != nil {
		t.Fatal(err)
	}
	if body, err := httpGet(ctx, fmt.Sprintf("127.0.0.1:%d", httpPort)); err != nil || body != httpBody {
		t.Errorf("GET through the proxy = %q, %v", body, err)
	}
	uctx, ucancel := context.WithTimeout(ctx, 30*time.Second)
	defer ucancel()
	if err := udpEchoes(uctx, fmt.Sprintf("127.0.0.1:%d", udpPort), "ping-over-proxy"); err != nil {
		t.Error(err)
	}

	busy, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	free := netdevtest.FreePort(t)
	err = p.Add(ctx,
		portfwd.Rule{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: free, GuestPort: 80},
		portfwd.Rule{Proto: "udp", HostAddr: "127.0.0.1", HostPort: busy.LocalAddr().(*net.UDPAddr).Port, GuestPort: 7})
	if !errcode.Is(err, errcode.PortInUse) {
		t.Errorf("Add with a busy port = %v, want port_in_use", err)
	}
	if n := len(p.Rules()); n != 2 {
		t.Errorf("%d rules after a refused Add, want the 2 from before", n)
	}
	if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", free)); err == nil {
		c.Close()
		t.Errorf("port %d listens after a refused Add", free)
	}
	// A forward on a port the proxy already serves: validation_failed.
	if err := p.Add(ctx, portfwd.Rule{Proto: "tcp", HostPort: httpPort, GuestPort: 81}); !errcode.Is(err, errcode.ValidationFailed) {
		t.Errorf("second forward on port %d = %v, want validation_failed", httpPort, err)
	}
}

// BenchmarkProxyThroughput sends 4 MiB per connection to the bridged
// guest's TCP discard server (busybox nc + cat, on 9), directly from the
// namespace and through the proxy on the host's loopback, in the same run.
func BenchmarkProxyThroughput(b *testing.B) {
	netdevtest.RequireRoot(b)
	g := bootBridged(b, "10.77.7")
	p := portfwd.NewProxy(func(context.Context) (netip.Addr, error) { return g.ip, nil },
		portfwd.ProxyOptions{Dial: g.ns.DialContext})
	defer p.Close()
	port := netdevtest.FreePort(b)
	if err := p.Add(context.Background(), portfwd.Rule{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: port, GuestPort: 9}); err != nil {
		b.Fatal(err)
	}
	const size = 4 << 20
	chunk := make([]byte, 64<<10)
	send := func(b *testing.B, dial func(ctx context.Context) (net.Conn, error)) {
		b.SetBytes(size)
		for range b.N {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			c, err := dial(ctx)
			if err != nil {
				cancel()
				b.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(time.Minute))
			for sent := 0; sent < size; sent += len(chunk) {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			// Done when the guest has read it all: its EOF after ours.
			c.(interface{ CloseWrite() error }).CloseWrite()
			if _, err := io.Copy(io.Discard, c); err != nil && !errors.Is(err, io.EOF) {
				b.Fatal(err)
			}
			c.Close()
			cancel()
		}
	}
	direct := func(ctx context.Context) (net.Conn, error) {
		return g.ns.DialContext(ctx, "tcp", net.JoinHostPort(g.ip.String(), "9"))
	}
	proxied := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", port))
	}
	// Warm up the guest (page cache, ARP, TCP) before measuring either.
	b.Run("warmup", func(b *testing.B) { send(b, direct); send(b, proxied) })
	b.Run("direct", func(b *testing.B) { send(b, direct) })
	b.Run("proxy", func(b *testing.B) { send(b, proxied) })
}
