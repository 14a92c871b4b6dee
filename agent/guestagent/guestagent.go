// Package guestagent is a client for qemu-guest-agent (QGA) over the unix
// socket of its chardev:
//
//	-chardev socket,id=qga0,path=<run>/<shortid>/qga.sock,server=on,wait=off
//	-device virtio-serial-pci,id=vser0
//	-device virtserialport,id=qgaport,chardev=qga0,name=org.qemu.guest_agent.0
//
// # When the guest agent is up
//
// Connecting to the socket always works while QEMU runs, whether or not an
// agent listens inside the guest; bytes sent before it opens its port wait
// in QEMU and reach it later. So do not poll: with an id on the
// virtserialport, QMP emits
//
//	VSERPORT_CHANGE {"id": "qgaport", "open": true}
//
// when the guest agent opens the port (and "open": false when it closes
// it, e.g. on reboot). The engine should take that event as "guest agent
// up", subscribe to it before the VM starts, and only then call
// [Client.Interfaces]; on an "open": true that follows a false (the guest
// rebooted), call [Client.Reset]. If the engine connects to QMP after the
// agent came up (re-adoption), a call with a short timeout tells.
//
// # Protocol
//
// Every connection starts with guest-sync-delimited: the client sends the
// byte 0xFF (which makes qemu-ga drop any half-read input) and the command
// with a random id; qemu-ga answers with 0xFF followed by the reply. The
// client skips everything up to that 0xFF (stale replies of an earlier
// client, the error for the 0xFF itself) and then replies whose id is not
// its own. After that, replies come in order, one JSON object per command.
//
// The socket chardev serves one client at a time, so a [Client] holds one
// connection and serializes its calls.
package guestagent

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// DefaultTimeout bounds a call whose context has no deadline.
const DefaultTimeout = 10 * time.Second

// ErrNotResponding is wrapped by the error of a call that timed out
// waiting for the guest agent (not running, or stalled).
var ErrNotResponding = errors.New("guest agent not responding")

// Error is an error reply from qemu-ga.
type Error struct {
	Command string
	Class   string
	Desc    string
}

func (e *Error) Error() string {
	return fmt.Sprintf("guest agent %s: %s: %s", e.Command, e.Class, e.Desc)
}

// Client talks to one VM's guest agent socket. Its methods are safe for
// concurrent use (calls are serialized). Close it when done.
type Client struct {
	path string

	mu     sync.Mutex // held for a whole call
	conn   net.Conn   // nil until a call connects; dropped after any error
	br     *bufio.Reader
	dec    *json.Decoder // replies after the handshake
	closed bool
}

// New returns a Client for the socket at path. It connects on first use.
func New(path string) *Client { return &Client{path: path} }

// Reset drops the connection, so that the next call connects and syncs
// afresh. Call it when the guest agent restarts (VSERPORT_CHANGE with
// "open": true after a "false": a guest reboot), since what the old agent
// had half read is gone.
func (c *Client) Reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	_ = c.dropLocked()
}

// Close drops the connection; later calls fail.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return c.dropLocked()
}

func (c *Client) dropLocked() error {
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn, c.br, c.dec = nil, nil, nil
	return err
}

// Execute runs a guest agent command with args (nil for none) and decodes
// its "return" value into out (nil to ignore it). The call, including
// connecting and the guest-sync-delimited handshake of a new connection,
// is bounded by ctx or else DefaultTimeout; a timeout wraps
// ErrNotResponding and context.DeadlineExceeded. After any error but an
// *Error reply, the next call connects again.
func (c *Client) Execute(ctx context.Context, cmd string, args, out any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fmt.Errorf("guest agent %s: client closed", cmd)
	}
	err := c.executeLocked(ctx, cmd, args, out)
	var qe *Error
	if err != nil && !errors.As(err, &qe) {
		c.dropLocked()
	}
	return err
}

func (c *Client) executeLocked(ctx context.Context, cmd string, args, out any) error {
	if c.conn == nil {
		if err := c.connectLocked(ctx); err != nil {
			return err
		}
	}
	stop := c.watch(ctx)
	defer stop()
	raw, err := c.roundTrip(cmd, args)
	if err != nil {
		return c.ctxErr(ctx, cmd, err)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return fmt.Errorf("guest agent %s: decode reply: %w", cmd, err)
		}
	}
	return nil
}

// watch makes blocking I/O on the connection return when ctx ends.
func (c *Client) watch(ctx context.Context) (stop func()) {
	conn := c.conn
	dl, _ := ctx.Deadline()
	_ = conn.SetDeadline(dl)
	after := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	return func() {
		after()
		_ = conn.SetDeadline(time.Time{})
	}
}

func (c *Client) ctxErr(ctx context.Context, cmd string, err error) error {
	// The socket's deadline is the context's: it may fire a moment before
	// ctx.Err() is set.
	if errors.Is(ctx.Err(), context.DeadlineExceeded) ||
		ctx.Err() == nil && errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("guest agent %s: %w: %w", cmd, ErrNotResponding, context.DeadlineExceeded)
	}
	if ctx.Err() != nil {
		return errcode.Wrap(errcode.Cancelled, ctx.Err(), "guest agent %s", cmd)
	}
	return fmt.Errorf("guest agent %s: %w", cmd, err)
}

func (c *Client) connectLocked(ctx context.Context) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.path)
	if err != nil {
		return fmt.Errorf("guest agent: connect %s: %w", c.path, err)
	}
	c.conn, c.br = conn, bufio.NewReader(conn)
	stop := c.watch(ctx)
	defer stop()
	if err := c.syncLocked(); err != nil {
		return c.ctxErr(ctx, "guest-sync-delimited", err)
	}
	return nil
}

// syncLocked runs guest-sync-delimited on a fresh connection.
func (c *Client) syncLocked() error {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	id := int64(binary.BigEndian.Uint32(b[:]) >> 1) // positive, fits any JSON number
	req, err := json.Marshal(map[string]any{"execute": "guest-sync-delimited", "arguments": map[string]any{"id": id}})
	if err != nil {
		return err
	}
	if _, err := c.conn.Write(append([]byte{0xff}, append(req, '\n')...)); err != nil {
		return err
	}
	for {
		// Skip to the sentinel: what comes before it is stale.
		if _, err := c.br.ReadBytes(0xff); err != nil {
			return err
		}
		dec := json.NewDecoder(c.br)
		raw, err := decodeReply(dec)
		// What the decoder read ahead comes first from now on.
		c.br = bufio.NewReader(io.MultiReader(dec.Buffered(), c.br))
		var er *errorReply
		if err != nil && !errors.As(err, &er) {
			return err
		}
		var got int64
		if err == nil && json.Unmarshal(raw, &got) == nil && got == id {
			c.dec = json.NewDecoder(c.br)
			return nil
		}
		// A reply to an earlier client's sync: wait for ours.
	}
}

type reply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

// errorReply carries an error object read where a return was expected.
type errorReply struct{ class, desc string }

func (e *errorReply) Error() string { return e.class + ": " + e.desc }

// decodeReply decodes the next JSON value: its "return" value, or an
// *errorReply.
func decodeReply(dec *json.Decoder) (json.RawMessage, error) {
	var msg json.RawMessage
	if err := dec.Decode(&msg); err != nil {
		return nil, fmt.Errorf("read reply: %w", err)
	}
	var r reply
	if err := json.Unmarshal(msg, &r); err != nil {
		return nil, fmt.Errorf("malformed reply %q: %w", truncate(msg), err)
	}
	if r.Error != nil {
		return nil, &errorReply{r.Error.Class, r.Error.Desc}
	}
	if r.Return == nil {
		return nil, fmt.Errorf("reply without return: %q", truncate(msg))
	}
	return r.Return, nil
}

func (c *Client) roundTrip(cmd string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return nil, err
	}
	raw, err := decodeReply(c.dec)
	var er *errorReply
	if errors.As(err, &er) {
		return nil, &Error{Command: cmd, Class: er.class, Desc: er.desc}
	}
	return raw, err
}

func truncate(b []byte) string {
	if len(b) > 200 {
		return string(b[:200]) + "…"
	}
	return string(b)
}

// Ping runs guest-ping: nil once the guest agent answers.
func (c *Client) Ping(ctx context.Context) error {
	return c.Execute(ctx, "guest-ping", nil, nil)
}

// Interface is a guest network interface with its addresses.
type Interface struct {
	Name  string         `json:"name"`
	MAC   string         `json:"mac,omitempty"`
	Addrs []netip.Prefix `json:"addrs"` // v4 first, then v6, as the guest lists them
}

type wireInterface struct {
	Name         string `json:"name"`
	HardwareAddr string `json:"hardware-address"`
	IPAddresses  []struct {
		Type    string `json:"ip-address-type"`
		Address string `json:"ip-address"`
		Prefix  int    `json:"prefix"`
	} `json:"ip-addresses"`
}

// Interfaces runs guest-network-get-interfaces and returns the guest's
// interfaces with their IPv4 and IPv6 addresses, loopback and link-local
// addresses left out, and interfaces left with none (lo) dropped.
func (c *Client) Interfaces(ctx context.Context) ([]Interface, error) {
	var wire []wireInterface
	if err := c.Execute(ctx, "guest-network-get-interfaces", nil, &wire); err != nil {
		return nil, err
	}
	return filterInterfaces(wire), nil
}

func filterInterfaces(wire []wireInterface) []Interface {
	var out []Interface
	for _, w := range wire {
		var v4, v6 []netip.Prefix
		for _, a := range w.IPAddresses {
			addr, err := netip.ParseAddr(a.Address)
			if err != nil {
				continue
			}
			addr = addr.WithZone("")
			// An IPv4-mapped address is judged as the IPv4 address it maps
			// (::ffff:127.0.0.1 is loopback, ::ffff:0.0.0.0 unspecified).
			if u := addr.Unmap(); u.IsLoopback() || u.IsLinkLocalUnicast() || u.IsUnspecified() || u.IsMulticast() {
				continue
			}
			p, err := addr.Prefix(a.Prefix)
			if err != nil {
				continue
			}
			p = netip.PrefixFrom(addr, p.Bits()) // keep the host address, not the network
			if addr.Is4() || addr.Is4In6() {
				v4 = append(v4, p)
			} else {
				v6 = append(v6, p)
			}
		}
		if len(v4)+len(v6) == 0 {
			continue
		}
		out = append(out, Interface{Name: w.Name, MAC: w.HardwareAddr, Addrs: append(v4, v6...)})
	}
	return out
}
