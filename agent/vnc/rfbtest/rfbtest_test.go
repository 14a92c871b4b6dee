package rfbtest

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// The vectors come from OpenSSL, not from this package: the key is the
// password with each byte's bits reversed (secret12 → cea6c64ea62e8c4c),
// then
//
//	printf '\x00\x01...\x0f' | openssl enc -des-ecb -K <key> -nopad
func TestResponse(t *testing.T) {
	var ch [16]byte
	for i := range ch {
		ch[i] = byte(i)
	}
	for _, tc := range []struct{ pw, want string }{
		{"secret12", "adcd997f8e16fee575e973f93c2b62b4"},
		{"secret12andmore", "adcd997f8e16fee575e973f93c2b62b4"}, // only 8 bytes count
		{"pw", "858600d9af143c9e6541d3dd92a835d0"},              // NUL-padded
	} {
		got := Response(ch, tc.pw)
		if hex.EncodeToString(got[:]) != tc.want {
			t.Errorf("Response(%q) = %x, want %s", tc.pw, got, tc.want)
		}
	}
}

// scripted is a server goroutine's outcome.
type scripted chan error

func (s scripted) Wait() error { return <-s }

// server runs a scripted RFB server on one end of a pipe; Wait returns
// its error (no t.Fatal in the goroutine).
func server(t *testing.T, script func(c net.Conn) error) (net.Conn, scripted) {
	t.Helper()
	a, b := net.Pipe()
	done := make(scripted, 1)
	go func() {
		defer b.Close()
		done <- script(b)
	}()
	t.Cleanup(func() { a.Close() })
	return a, done
}

func writeAll(c net.Conn, parts ...any) error {
	for _, p := range parts {
		if err := binary.Write(c, binary.BigEndian, p); err != nil {
			return err
		}
	}
	return nil
}

func greet(c net.Conn, types ...byte) error {
	if _, err := c.Write([]byte("RFB 003.008\n")); err != nil {
		return err
	}
	var v [12]byte
	if _, err := io.ReadFull(c, v[:]); err != nil {
		return err
	}
	if string(v[:]) != "RFB 003.008\n" {
		return errors.New("client version " + string(v[:]))
	}
	return writeAll(c, uint8(len(types)), types)
}

func TestHandshakeAndUpdate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var challenge [16]byte
	copy(challenge[:], "0123456789abcdef")
	nc, g := server(t, func(c net.Conn) error {
		if err := greet(c, SecNone, SecVNCAuth); err != nil {
			return err
		}
		var pick [1]byte
		if _, err := io.ReadFull(c, pick[:]); err != nil || pick[0] != SecVNCAuth {
			return errors.New("client did not pick VNC auth")
		}
		c.Write(challenge[:])
		var resp [16]byte
		if _, err := io.ReadFull(c, resp[:]); err != nil {
			return err
		}
		if resp != Response(challenge, "hunter2") {
			return errors.New("wrong response")
		}
		var shared [1]byte
		if err := writeAll(c, uint32(0)); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, shared[:]); err != nil {
			return err
		}
		name := "test-vm"
		if err := writeAll(c, uint16(4), uint16(2), uint8(32), uint8(24), uint8(0), uint8(1), uint16(255), uint16(255), uint16(255), uint8(16), uint8(8), uint8(0), [3]byte{}, uint32(len(name)), []byte(name)); err != nil {
			return err
		}
		var req [10]byte
		if _, err := io.ReadFull(c, req[:]); err != nil || req[0] != 3 {
			return errors.New("no update request")
		}
		// A bell, then an update of two raw rectangles.
		return writeAll(c, uint8(2), uint8(0), uint8(0), uint16(2),
			uint16(0), uint16(0), uint16(4), uint16(1), int32(0), make([]byte, 16),
			uint16(0), uint16(1), uint16(4), uint16(1), int32(0), make([]byte, 16))
	})
	c, err := Handshake(ctx, nc, "hunter2")
	if err != nil {
		t.Fatal(err)
	}
	if c.Init.Width != 4 || c.Init.Height != 2 || c.Init.Name != "test-vm" || c.Init.Format.BitsPerPixel != 32 {
		t.Errorf("ServerInit %+v", c.Init)
	}
	if err := c.RequestUpdate(false, 0, 0, 4, 2); err != nil {
		t.Fatal(err)
	}
	u, err := c.ReadUpdate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if u.Pixels() != 8 || len(u.Rects) != 2 {
		t.Errorf("update %+v", u)
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}

func TestAuthFailedReason(t *testing.T) {
	ctx := context.Background()
	nc, g := server(t, func(c net.Conn) error {
		if err := greet(c, SecVNCAuth); err != nil {
			return err
		}
		var pick [1]byte
		if _, err := io.ReadFull(c, pick[:]); err != nil {
			return err
		}
		c.Write(make([]byte, 16))
		var resp [16]byte
		if _, err := io.ReadFull(c, resp[:]); err != nil {
			return err
		}
		reason := "Authentication failed\x00"
		return writeAll(c, uint32(1), uint32(len(reason)), []byte(reason))
	})
	_, err := Handshake(ctx, nc, "nope")
	var ae *AuthError
	if !errors.As(err, &ae) || ae.Reason != "Authentication failed" {
		t.Fatalf("err = %v, want AuthError with QEMU's reason", err)
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}

func TestRefused(t *testing.T) {
	nc, g := server(t, func(c net.Conn) error {
		if err := greet(c); err != nil {
			return err
		}
		reason := "Too many connections"
		return writeAll(c, uint32(len(reason)), []byte(reason))
	})
	_, err := Handshake(context.Background(), nc, "x")
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != "Too many connections" {
		t.Fatalf("err = %v", err)
	}
	g.Wait()
	// No VNC auth offered while a password is given.
	nc, g = server(t, func(c net.Conn) error { return greet(c, SecNone) })
	if _, err := Handshake(context.Background(), nc, "x"); !errors.Is(err, ErrNoVNCAuth) {
		t.Fatalf("err = %v, want ErrNoVNCAuth", err)
	}
	g.Wait()
}

func TestHandshakeCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	nc, _ := server(t, func(c net.Conn) error {
		<-ctx.Done()
		return nil
	})
	done := make(chan error, 1)
	go func() {
		_, err := Handshake(ctx, nc, "x")
		done <- err
	}()
	cancel()
	if err := <-done; err == nil {
		t.Fatal("handshake succeeded against a silent server")
	}
}
