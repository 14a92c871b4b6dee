package portfwd_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/internal/errcode"
)

var loopback = func(context.Context) (netip.Addr, error) { return netip.MustParseAddr("127.0.0.1"), nil }

// tcpServer answers each connection, after the client's half-close, with
// "got N bytes" and closes.
func tcpServer(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				n, _ := io.Copy(io.Discard, c)
				fmt.Fprintf(c, "got %d bytes", n)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

// udpEcho answers every datagram with "<source port> <payload>", so that a
// client sees which upstream socket (session) carried it.
func udpEcho(t *testing.T) int {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(fmt.Appendf(nil, "%d %s", from.Port(), buf[:n]), from)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).Port
}

func TestProxyTCPHalfClose(t *testing.T) {
	guestPort := tcpServer(t)
	p := portfwd.NewProxy(loopback, portfwd.ProxyOptions{})
	defer p.Close()
	hostPort := netdevtest.FreePort(t)
	ctx := context.Background()
	if err := p.Add(ctx, portfwd.Rule{Proto: "TCP", DestProto: "TCP", HostAddr: "127.0.0.1", HostPort: hostPort, GuestPort: guestPort}); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", hostPort))
		if err != nil {
			t.Fatal(err)
		}
		payload := bytes.Repeat([]byte("x"), 100000*(i+1))
		if _, err := c.Write(payload); err != nil {
			t.Fatal(err)
		}
		// Half-close: the server only answers after our EOF, through the
		// proxy's other direction, which must stay open.
		c.(*net.TCPConn).CloseWrite()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if want := fmt.Sprintf("got %d bytes", len(payload)); err != nil || string(got) != want {
			t.Fatalf("answer = %q, %v; want %q", got, err, want)
		}
	}
	if err := p.Remove(portfwd.Rule{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: hostPort, GuestPort: guestPort}); err != nil {
		t.Fatal(err)
	}
	if _, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", hostPort)); err == nil {
		t.Errorf("connected to a removed forward")
	}
	if err := p.Remove(portfwd.Rule{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: hostPort, GuestPort: guestPort}); !errcode.Is(err, errcode.NotFound) {
		t.Errorf("second Remove = %v, want not_found", err)
	}
}

// TestProxyRemoveClosesConnections: a forward removed while a connection
// is open ends that connection.
func TestProxyRemoveClosesConnections(t *testing.T) {
	guestPort := tcpServer(t)
	p := portfwd.NewProxy(loopback, portfwd.ProxyOptions{})
	defer p.Close()
	hostPort := netdevtest.FreePort(t)
	r := portfwd.Rule{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: hostPort, GuestPort: guestPort}
	if err := p.Add(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", hostPort))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := p.Remove(r); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(c); err != nil && !errors.Is(err, net.ErrClosed) {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("connection still open after Remove")
		}
	}
}

func TestProxyUDPSessions(t *testing.T) {
	guestPort := udpEcho(t)
	p := portfwd.NewProxy(loopback, portfwd.ProxyOptions{UDPIdleTimeout: 300 * time.Millisecond})
	defer p.Close()
	hostPort := netdevtest.FreePort(t)
	if err := p.Add(context.Background(), portfwd.Rule{Proto: "udp", HostAddr: "127.0.0.1", HostPort: hostPort, GuestPort: guestPort}); err != nil {
		t.Fatal(err)
	}
	ask := func(c *net.UDPConn, msg string) (upstreamPort, payload string) {
		t.Helper()
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("no answer to %q: %v", msg, err)
		}
		var port, body string
		fmt.Sscanf(string(buf[:n]), "%s %s", &port, &body)
		return port, body
	}
	dial := func() *net.UDPConn {
		c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: hostPort})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	a, b := dial(), dial()
	pa1, body := ask(a, "a1")
	if body != "a1" {
		t.Fatalf("a got %q", body)
	}
	pb1, _ := ask(b, "b1")
	pa2, _ := ask(a, "a2")
	if pa1 != pa2 {
		t.Errorf("one peer, two sessions: upstream ports %s then %s", pa1, pa2)
	}
	if pa1 == pb1 {
		t.Errorf("two peers share upstream port %s", pa1)
	}
	// After the idle timeout the session is gone: a new one (a new
	// upstream socket) serves the next datagram. Wait for it to expire
	// with a margin; this is the behaviour under test, not a sync.
	time.Sleep(600 * time.Millisecond)
	pa3, body := ask(a, "a3")
	if body != "a3" || pa3 == pa1 {
		t.Errorf("after idle: upstream port %s (was %s), body %q", pa3, pa1, body)
	}
}

func TestProxyPortInUseLeavesNothing(t *testing.T) {
	guestPort := tcpServer(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port
	free := netdevtest.FreePort(t)
	p := portfwd.NewProxy(loopback, portfwd.ProxyOptions{})
	defer p.Close()
	err = p.Add(context.Background(),
		portfwd.Rule{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: free, GuestPort: guestPort},
		portfwd.Rule{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: busyPort, GuestPort: guestPort})
	if !errcode.Is(err, errcode.PortInUse) {
		t.Fatalf("Add with a busy port = %v, want port_in_use", err)
	}
	if len(p.Rules()) != 0 {
		t.Errorf("rules after a failed Add: %v", p.Rules())
	}
	// The first port was released.
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", free))
	if err != nil {
		t.Errorf("port %d still held after a failed Add: %v", free, err)
	} else {
		ln.Close()
	}
	// A port held by another forward of this (or any) proxy: port_in_use.
	if err := p.Add(context.Background(), portfwd.Rule{Proto: "udp", HostAddr: "127.0.0.1", HostPort: free, GuestPort: 1}); err != nil {
		t.Fatal(err)
	}
	q := portfwd.NewProxy(loopback, portfwd.ProxyOptions{})
	defer q.Close()
	if err := q.Add(context.Background(), portfwd.Rule{Proto: "udp", HostAddr: "127.0.0.1", HostPort: free, GuestPort: 1}); !errcode.Is(err, errcode.PortInUse) {
		t.Errorf("second proxy on a taken udp port = %v, want port_in_use", err)
	}
	// Bad input: stable codes, nothing bound.
	for _, r := range []portfwd.Rule{
		{Proto: "tcp", HostPort: 0, GuestPort: 80},
		{Proto: "tcp", HostPort: 70000, GuestPort: 80},
		{Proto: "tcp", DestProto: "udp", HostPort: free, GuestPort: 80},
	} {
		if err := q.Add(context.Background(), r); !errcode.Is(err, errcode.ValidationFailed) {
			t.Errorf("Add(%+v) = %v, want validation_failed", r, err)
		}
	}
	two := netdevtest.FreePort(t)
	err = q.Add(context.Background(),
		portfwd.Rule{Proto: "tcp", HostPort: two, GuestPort: 80},
		portfwd.Rule{Proto: "tcp", HostPort: two, GuestPort: 81})
	if !errcode.Is(err, errcode.ValidationFailed) {
		t.Errorf("two forwards on one host port = %v, want validation_failed", err)
	}
	if len(q.Rules()) != 0 {
		t.Errorf("rules after refused Adds: %v", q.Rules())
	}
}

// BenchmarkProxyLoopback measures the proxy's own cost: 16 MiB per
// connection to a discard server on loopback, directly and through the
// proxy, in the same run (BenchmarkProxyThroughput has a real guest, which
// is the bottleneck there).
func BenchmarkProxyLoopback(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	sink := ln.Addr().(*net.TCPAddr).Port
	p := portfwd.NewProxy(loopback, portfwd.ProxyOptions{})
	defer p.Close()
	port := netdevtest.FreePort(b)
	if err := p.Add(context.Background(), portfwd.Rule{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: port, GuestPort: sink}); err != nil {
		b.Fatal(err)
	}
	const size = 16 << 20
	chunk := make([]byte, 256<<10)
	send := func(b *testing.B, port int) {
		b.SetBytes(size)
		for range b.N {
			c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
			if err != nil {
				b.Fatal(err)
			}
			for sent := 0; sent < size; sent += len(chunk) {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			c.(*net.TCPConn).CloseWrite()
			io.Copy(io.Discard, c) // the sink's EOF: all of it was read
			c.Close()
		}
	}
	b.Run("direct", func(b *testing.B) { send(b, sink) })
	b.Run("proxy", func(b *testing.B) { send(b, port) })
}
