package portfwd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Defaults of ProxyOptions.
const (
	DefaultDialTimeout    = 5 * time.Second
	DefaultUDPIdleTimeout = 60 * time.Second
	DefaultMaxUDPSessions = 1024
)

// udpBufSize holds the largest UDP payload.
const udpBufSize = 65535

// ProxyOptions configure a Proxy. The zero value is usable.
type ProxyOptions struct {
	// Dial reaches the guest (default: net.Dialer.DialContext). Tests give
	// one that dials from inside a network namespace.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// DialTimeout bounds connecting to the guest (DefaultDialTimeout).
	DialTimeout time.Duration
	// UDPIdleTimeout ends a UDP session with no datagram either way for
	// this long (DefaultUDPIdleTimeout).
	UDPIdleTimeout time.Duration
	// MaxUDPSessions bounds the sessions of one UDP forward; datagrams
	// from further peers are dropped (DefaultMaxUDPSessions).
	MaxUDPSessions int
	Log            *zap.Logger
}

// Proxy relays host ports to one VM's guest address (bridged and macvlan
// NICs). It listens in the agent; each forward has its own listener and
// connections. Its methods are safe for concurrent use.
type Proxy struct {
	guest func(ctx context.Context) (netip.Addr, error)
	opt   ProxyOptions

	mu     sync.Mutex
	fwds   map[Rule]*forward // key: normalized rule
	closed bool
}

// NewProxy returns a Proxy whose guest address is asked of guest for each
// new TCP connection or UDP session, so an address change is followed.
// guest runs on the relay's path (for UDP, on the forward's read loop):
// let it answer from what the engine last learnt from the guest agent,
// not query the guest.
func NewProxy(guest func(ctx context.Context) (netip.Addr, error), opt ProxyOptions) *Proxy {
	if opt.Dial == nil {
		var d net.Dialer
		opt.Dial = d.DialContext
	}
	if opt.DialTimeout <= 0 {
		opt.DialTimeout = DefaultDialTimeout
	}
	if opt.UDPIdleTimeout <= 0 {
		opt.UDPIdleTimeout = DefaultUDPIdleTimeout
	}
	if opt.MaxUDPSessions <= 0 {
		opt.MaxUDPSessions = DefaultMaxUDPSessions
	}
	if opt.Log == nil {
		opt.Log = zap.NewNop()
	}
	return &Proxy{guest: guest, opt: opt, fwds: map[Rule]*forward{}}
}

// Add starts forwards for rules, all or none: each is validated (with
// Validate, against the forwards already running), then every listener is
// bound; if one cannot be (errcode.PortInUse: taken by anything, another
// process or VM included), those already bound are closed and nothing is
// left.
func (p *Proxy) Add(ctx context.Context, rules ...Rule) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return errcode.New(errcode.Internal, "proxy closed")
	}
	existing := make([]Rule, 0, len(p.fwds))
	for r := range p.fwds {
		existing = append(existing, r)
	}
	rules, err := Validate(existing, rules)
	if err != nil {
		return err
	}
	var bound []*forward
	for _, r := range rules {
		f, err := p.bind(ctx, r)
		if err != nil {
			for _, b := range bound {
				b.stop()
			}
			return err
		}
		bound = append(bound, f)
	}
	for _, f := range bound {
		p.fwds[f.rule] = f
		f.start()
		p.opt.Log.Info("port forward added", zap.String("forward", f.rule.String()))
	}
	return nil
}

// Remove stops the forward of r (matched on protocol, host address and
// port) and closes its connections and sessions. A forward that is not
// there gives errcode.NotFound.
func (p *Proxy) Remove(r Rule) error {
	n, err := r.Normalize()
	if err != nil {
		return err
	}
	p.mu.Lock()
	var f *forward
	for k, v := range p.fwds {
		if k.Proto == n.Proto && k.HostAddr == n.HostAddr && k.HostPort == n.HostPort {
			f = v
			delete(p.fwds, k)
			break
		}
	}
	p.mu.Unlock()
	if f == nil {
		return errcode.New(errcode.NotFound, "forward %s is not set", n)
	}
	f.stop()
	p.opt.Log.Info("port forward removed", zap.String("forward", f.rule.String()))
	return nil
}

// Rules returns the running forwards, sorted by protocol and port.
func (p *Proxy) Rules() []Rule {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Rule, 0, len(p.fwds))
	for r := range p.fwds {
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b Rule) int {
		if a.Proto != b.Proto {
			if a.Proto < b.Proto {
				return -1
			}
			return 1
		}
		return a.HostPort - b.HostPort
	})
	return out
}

// Close stops every forward and waits for their goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	fwds := p.fwds
	p.fwds = map[Rule]*forward{}
	p.mu.Unlock()
	for _, f := range fwds {
		f.stop()
	}
	return nil
}

// forward is one running rule.
type forward struct {
	p    *Proxy
	rule Rule
	ln   net.Listener // TCP
	pc   *net.UDPConn // UDP

	ctx    context.Context // ends when the forward stops
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns map[io.Closer]struct{} // open TCP connections, both sides
}

func (p *Proxy) bind(ctx context.Context, r Rule) (*forward, error) {
	c, err := listen(ctx, r)
	if err != nil {
		return nil, err
	}
	f := &forward{p: p, rule: r, conns: map[io.Closer]struct{}{}}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	switch c := c.(type) {
	case net.Listener:
		f.ln = c
	case *net.UDPConn:
		f.pc = c
	default:
		c.Close()
		return nil, errcode.New(errcode.Internal, "forward %s: unexpected listener %T", r, c)
	}
	return f, nil
}

func (f *forward) start() {
	f.wg.Add(1)
	if f.ln != nil {
		go f.acceptTCP()
	} else {
		go f.serveUDP()
	}
}

// stop closes the listener and every connection, then waits.
func (f *forward) stop() {
	f.cancel()
	if f.ln != nil {
		f.ln.Close()
	}
	if f.pc != nil {
		f.pc.Close()
	}
	f.mu.Lock()
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

func (f *forward) track(c io.Closer) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ctx.Err() != nil {
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *forward) untrack(c io.Closer) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
}

// dialGuest connects to the guest's port for this forward.
func (f *forward) dialGuest(network string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(f.ctx, f.p.opt.DialTimeout)
	defer cancel()
	addr, err := f.p.guest(ctx)
	if err != nil {
		return nil, fmt.Errorf("guest address: %w", err)
	}
	return f.p.opt.Dial(ctx, network, net.JoinHostPort(addr.String(), strconv.Itoa(f.rule.GuestPort)))
}

func (f *forward) acceptTCP() {
	defer f.wg.Done()
	var delay time.Duration
	for {
		c, err := f.ln.Accept()
		if err != nil {
			if f.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors and the like: back off and retry, as
			// net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			f.p.opt.Log.Warn("port forward accept", zap.String("forward", f.rule.String()), zap.Error(err))
			select {
			case <-time.After(delay):
			case <-f.ctx.Done():
				return
			}
			continue
		}
		delay = 0
		if !f.track(c) {
			c.Close()
			return
		}
		f.wg.Add(1)
		go f.relayTCP(c)
	}
}

// relayTCP connects to the guest and copies both ways. When one side
// closes its write half, the other side's write half is closed, so each
// direction ends on its own (half-close); when both are done, both
// connections are closed.
func (f *forward) relayTCP(client net.Conn) {
	defer f.wg.Done()
	defer f.untrack(client)
	defer client.Close()
	guest, err := f.dialGuest("tcp")
	if err != nil {
		f.p.opt.Log.Warn("port forward: cannot reach guest", zap.String("forward", f.rule.String()), zap.Error(err))
		return
	}
	if !f.track(guest) {
		guest.Close()
		return
	}
	defer f.untrack(guest)
	defer guest.Close()
	done := make(chan struct{})
	go func() {
		pipe(guest, client)
		close(done)
	}()
	pipe(client, guest)
	<-done
}

// pipe copies src to dst (splice(2) between TCP sockets), then closes
// dst's write half, or all of dst if it has none.
func pipe(dst, src net.Conn) {
	_, _ = io.Copy(dst, src)
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	} else {
		dst.Close()
	}
}

// udpSession relays one peer's datagrams to the guest and back. Answers
// leave from the forward's socket; on a wildcard address the kernel picks
// their source address by route, which is the address the peer used on a
// single-homed host.
type udpSession struct {
	peer     netip.AddrPort
	up       net.Conn // connected to the guest
	lastSeen time.Time
}

func (f *forward) serveUDP() {
	defer f.wg.Done()
	var mu sync.Mutex // guards sessions and lastSeen
	sessions := map[netip.AddrPort]*udpSession{}
	defer func() {
		mu.Lock()
		for _, s := range sessions {
			s.up.Close()
		}
		mu.Unlock()
	}()
	buf := make([]byte, udpBufSize)
	for {
		n, peer, err := f.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if f.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			f.p.opt.Log.Warn("port forward read", zap.String("forward", f.rule.String()), zap.Error(err))
			continue
		}
		mu.Lock()
		s := sessions[peer]
		if s == nil && len(sessions) >= f.p.opt.MaxUDPSessions {
			mu.Unlock()
			continue // drop: too many peers
		}
		mu.Unlock()
		if s == nil {
			up, err := f.dialGuest("udp")
			if err != nil {
				f.p.opt.Log.Warn("port forward: cannot reach guest", zap.String("forward", f.rule.String()), zap.Error(err))
				continue
			}
			s = &udpSession{peer: peer, up: up, lastSeen: time.Now()}
			mu.Lock()
			sessions[peer] = s
			mu.Unlock()
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				f.udpReturn(s, &mu)
				mu.Lock()
				if sessions[peer] == s {
					delete(sessions, peer)
				}
				mu.Unlock()
				s.up.Close()
			}()
		}
		mu.Lock()
		s.lastSeen = time.Now()
		mu.Unlock()
		if _, err := s.up.Write(buf[:n]); err != nil {
			f.p.opt.Log.Debug("port forward: write to guest", zap.String("forward", f.rule.String()), zap.Error(err))
		}
	}
}

// udpReturn copies the guest's answers back to the peer until the session
// has been idle for UDPIdleTimeout in both directions or the forward stops.
func (f *forward) udpReturn(s *udpSession, mu *sync.Mutex) {
	idle := f.p.opt.UDPIdleTimeout
	buf := make([]byte, udpBufSize)
	stop := context.AfterFunc(f.ctx, func() { s.up.Close() })
	defer stop()
	for {
		mu.Lock()
		deadline := s.lastSeen.Add(idle)
		mu.Unlock()
		_ = s.up.SetReadDeadline(deadline)
		n, err := s.up.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				mu.Lock()
				expired := !time.Now().Before(s.lastSeen.Add(idle))
				mu.Unlock()
				if expired {
					return
				}
				continue // the peer spoke meanwhile: wait on
			}
			if f.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// ECONNREFUSED from an ICMP port unreachable: nobody listens
			// in the guest yet; keep the session until it idles out.
			continue
		}
		mu.Lock()
		s.lastSeen = time.Now()
		mu.Unlock()
		if _, err := f.pc.WriteToUDPAddrPort(buf[:n], s.peer); err != nil && f.ctx.Err() != nil {
			return
		}
	}
}
