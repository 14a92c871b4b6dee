// Package rfbtest is a minimal RFB 3.8 (VNC) client for tests: the
// protocol handshake, VNC authentication (security type 2), ClientInit and
// ServerInit, and framebuffer update requests in the raw encoding. It is
// enough to prove that a VNC server lets in the right password, turns
// away a wrong one with its reason, and serves pixels (RFC 6143).
package rfbtest

import (
	"bufio"
	"context"
	"crypto/des"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"time"
)

// Security types (RFC 6143 7.1.2).
const (
	SecNone    = 1
	SecVNCAuth = 2
)

// AuthError is the server refusing a login: a failed SecurityResult,
// with the reason the server gave ("Authentication failed" from QEMU).
type AuthError struct {
	Reason string
}

func (e *AuthError) Error() string { return "rfb: authentication failed: " + e.Reason }

// RefusedError is a server that offers no security type at all, with its
// reason (e.g. too many connections).
type RefusedError struct {
	Reason string
}

func (e *RefusedError) Error() string { return "rfb: connection refused by the server: " + e.Reason }

// ErrNoVNCAuth: the server does not offer the security type the password
// (or its absence) calls for.
var ErrNoVNCAuth = errors.New("rfb: the server does not offer the needed security type")

// PixelFormat is the server's pixel format (RFC 6143 7.4).
type PixelFormat struct {
	BitsPerPixel, Depth             uint8
	BigEndian, TrueColour           bool
	RedMax, GreenMax, BlueMax       uint16
	RedShift, GreenShift, BlueShift uint8
}

// ServerInit is the server's first message after ClientInit.
type ServerInit struct {
	Width, Height uint16
	Format        PixelFormat
	Name          string
}

// Conn is a connection past the handshake.
type Conn struct {
	nc            net.Conn
	r             *bufio.Reader
	Version       string // the server's ProtocolVersion, "RFB 003.008"
	SecurityTypes []byte // what the server offered
	Init          ServerInit
}

// Dial connects to a VNC server at addr (host:port) and logs in with
// password ("" for security type None). ctx bounds the handshake.
func Dial(ctx context.Context, addr, password string) (*Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c, err := Handshake(ctx, nc, password)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// Handshake runs the RFB 3.8 handshake on nc: versions, security,
// ClientInit (shared) and ServerInit.
func Handshake(ctx context.Context, nc net.Conn, password string) (*Conn, error) {
	stop := deadline(ctx, nc)
	defer stop()
	c := &Conn{nc: nc, r: bufio.NewReader(nc)}
	var ver [12]byte
	if _, err := io.ReadFull(c.r, ver[:]); err != nil {
		return nil, fmt.Errorf("rfb: read version: %w", err)
	}
	c.Version = string(ver[:11])
	var major, minor int
	if _, err := fmt.Sscanf(string(ver[:]), "RFB %03d.%03d\n", &major, &minor); err != nil {
		return nil, fmt.Errorf("rfb: bad version %q", ver)
	}
	if major != 3 || minor < 8 {
		return nil, fmt.Errorf("rfb: server speaks %d.%d, want 3.8", major, minor)
	}
	if _, err := nc.Write([]byte("RFB 003.008\n")); err != nil {
		return nil, err
	}
	n, err := c.r.ReadByte()
	if err != nil {
		return nil, fmt.Errorf("rfb: read security types: %w", err)
	}
	if n == 0 {
		reason, err := c.readString()
		if err != nil {
			return nil, err
		}
		return nil, &RefusedError{Reason: reason}
	}
	c.SecurityTypes = make([]byte, n)
	if _, err := io.ReadFull(c.r, c.SecurityTypes); err != nil {
		return nil, err
	}
	want := byte(SecVNCAuth)
	if password == "" {
		want = SecNone
	}
	offered := false
	for _, t := range c.SecurityTypes {
		offered = offered || t == want
	}
	if !offered {
		return nil, fmt.Errorf("%w: want %d, offered %v", ErrNoVNCAuth, want, c.SecurityTypes)
	}
	if _, err := nc.Write([]byte{want}); err != nil {
		return nil, err
	}
	if want == SecVNCAuth {
		var challenge [16]byte
		if _, err := io.ReadFull(c.r, challenge[:]); err != nil {
			return nil, fmt.Errorf("rfb: read challenge: %w", err)
		}
		resp := Response(challenge, password)
		if _, err := nc.Write(resp[:]); err != nil {
			return nil, err
		}
	}
	var result uint32
	if err := binary.Read(c.r, binary.BigEndian, &result); err != nil {
		return nil, fmt.Errorf("rfb: read security result: %w", err)
	}
	if result != 0 {
		reason, err := c.readString()
		if err != nil {
			return nil, &AuthError{Reason: fmt.Sprintf("result %d, no reason (%v)", result, err)}
		}
		return nil, &AuthError{Reason: reason}
	}
	if _, err := nc.Write([]byte{1}); err != nil { // ClientInit: shared
		return nil, err
	}
	var head struct {
		Width, Height uint16
		BPP, Depth    uint8
		BigEndian     uint8
		TrueColour    uint8
		RMax, GMax    uint16
		BMax          uint16
		RS, GS, BS    uint8
		Pad           [3]byte
	}
	if err := binary.Read(c.r, binary.BigEndian, &head); err != nil {
		return nil, fmt.Errorf("rfb: read ServerInit: %w", err)
	}
	name, err := c.readString()
	if err != nil {
		return nil, err
	}
	c.Init = ServerInit{
		Width: head.Width, Height: head.Height, Name: name,
		Format: PixelFormat{
			BitsPerPixel: head.BPP, Depth: head.Depth, BigEndian: head.BigEndian != 0, TrueColour: head.TrueColour != 0,
			RedMax: head.RMax, GreenMax: head.GMax, BlueMax: head.BMax, RedShift: head.RS, GreenShift: head.GS, BlueShift: head.BS,
		},
	}
	return c, nil
}

// readString reads a u32 length and that many bytes; a trailing NUL (QEMU
// counts one) is dropped.
func (c *Conn) readString() (string, error) {
	var n uint32
	if err := binary.Read(c.r, binary.BigEndian, &n); err != nil {
		return "", fmt.Errorf("rfb: read string length: %w", err)
	}
	if n > 1<<16 {
		return "", fmt.Errorf("rfb: string of %d bytes", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		return "", fmt.Errorf("rfb: read string: %w", err)
	}
	for len(b) > 0 && b[len(b)-1] == 0 {
		b = b[:len(b)-1]
	}
	return string(b), nil
}

// Response is the VNC authentication answer to a challenge: the challenge
// DES-encrypted (ECB, two blocks) with the password as the key, the
// password cut or NUL-padded to 8 bytes and each byte's bits reversed.
func Response(challenge [16]byte, password string) [16]byte {
	var key [8]byte
	copy(key[:], password)
	for i := range key {
		key[i] = bits.Reverse8(key[i])
	}
	block, err := des.NewCipher(key[:])
	if err != nil {
		panic(err) // an 8-byte key always makes a cipher
	}
	var out [16]byte
	block.Encrypt(out[:8], challenge[:8])
	block.Encrypt(out[8:], challenge[8:])
	return out
}

// RequestUpdate sends a FramebufferUpdateRequest for a rectangle; not
// incremental asks for all of it.
func (c *Conn) RequestUpdate(incremental bool, x, y, w, h uint16) error {
	msg := []byte{3, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if incremental {
		msg[1] = 1
	}
	binary.BigEndian.PutUint16(msg[2:], x)
	binary.BigEndian.PutUint16(msg[4:], y)
	binary.BigEndian.PutUint16(msg[6:], w)
	binary.BigEndian.PutUint16(msg[8:], h)
	_, err := c.nc.Write(msg)
	return err
}

// Rect is one rectangle of an update.
type Rect struct {
	X, Y, W, H uint16
	Encoding   int32
	Data       []byte // raw pixels, W*H*BitsPerPixel/8 bytes
}

// Update is a FramebufferUpdate.
type Update struct {
	Rects []Rect
}

// Pixels is the number of pixels the update covers.
func (u *Update) Pixels() int {
	n := 0
	for _, r := range u.Rects {
		n += int(r.W) * int(r.H)
	}
	return n
}

// ReadUpdate reads server messages until a FramebufferUpdate and returns
// it, skipping bells, cut text and colour map entries. Only the raw
// encoding is understood (the client never sends SetEncodings, so the
// server uses no other).
func (c *Conn) ReadUpdate(ctx context.Context) (*Update, error) {
	stop := deadline(ctx, c.nc)
	defer stop()
	for {
		t, err := c.r.ReadByte()
		if err != nil {
			return nil, fmt.Errorf("rfb: read message: %w", err)
		}
		switch t {
		case 0: // FramebufferUpdate
			var head struct {
				Pad   uint8
				Count uint16
			}
			if err := binary.Read(c.r, binary.BigEndian, &head); err != nil {
				return nil, err
			}
			u := &Update{}
			for i := 0; i < int(head.Count); i++ {
				var rh struct {
					X, Y, W, H uint16
					Encoding   int32
				}
				if err := binary.Read(c.r, binary.BigEndian, &rh); err != nil {
					return nil, err
				}
				if rh.Encoding != 0 {
					return nil, fmt.Errorf("rfb: rectangle %d: encoding %d not supported", i, rh.Encoding)
				}
				data := make([]byte, int(rh.W)*int(rh.H)*int(c.Init.Format.BitsPerPixel)/8)
				if _, err := io.ReadFull(c.r, data); err != nil {
					return nil, fmt.Errorf("rfb: rectangle %d: %w", i, err)
				}
				u.Rects = append(u.Rects, Rect{X: rh.X, Y: rh.Y, W: rh.W, H: rh.H, Encoding: rh.Encoding, Data: data})
			}
			return u, nil
		case 1: // SetColourMapEntries
			var head struct {
				Pad          uint8
				First, Count uint16
			}
			if err := binary.Read(c.r, binary.BigEndian, &head); err != nil {
				return nil, err
			}
			if _, err := c.r.Discard(int(head.Count) * 6); err != nil {
				return nil, err
			}
		case 2: // Bell
		case 3: // ServerCutText
			var head struct {
				Pad [3]byte
				Len uint32
			}
			if err := binary.Read(c.r, binary.BigEndian, &head); err != nil {
				return nil, err
			}
			if _, err := c.r.Discard(int(head.Len)); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("rfb: unknown server message %d", t)
		}
	}
}

// Close closes the connection.
func (c *Conn) Close() error { return c.nc.Close() }

// deadline applies ctx's deadline and cancellation to nc until stop.
func deadline(ctx context.Context, nc net.Conn) (stop func()) {
	if d, ok := ctx.Deadline(); ok {
		nc.SetDeadline(d)
	}
	cancel := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	return func() {
		cancel()
		nc.SetDeadline(time.Time{})
	}
}
