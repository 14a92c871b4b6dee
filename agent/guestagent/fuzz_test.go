package guestagent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"
)

// Replies of real qemu-ga (Debian 12's 7.2, and a Windows guest's) to
// guest-network-get-interfaces, and odd ones.
var interfaceReplies = []string{
	sampleInterfaces,
	`{"return": [{"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}, {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}], "statistics": {"tx-packets": 0, "tx-errs": 0, "rx-bytes": 0, "rx-dropped": 0, "rx-packets": 0, "rx-errs": 0, "tx-bytes": 0, "tx-dropped": 0}, "hardware-address": "00:00:00:00:00:00"}, {"name": "enp1s0", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "192.168.122.58", "prefix": 24}, {"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe6b:9a1c", "prefix": 64}], "statistics": {"tx-packets": 120, "tx-errs": 0, "rx-bytes": 24011, "rx-dropped": 3, "rx-packets": 190, "rx-errs": 0, "tx-bytes": 13480, "tx-dropped": 0}, "hardware-address": "52:54:00:6b:9a:1c"}]}`,
	`{"return": [{"name": "Ethernet", "ip-addresses": [{"ip-address-type": "ipv6", "ip-address": "fe80::c1a0:5e0f:23f:7d1b%4", "prefix": 64}, {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}], "hardware-address": "52:54:00:12:34:56"}, {"name": "Loopback Pseudo-Interface 1", "ip-addresses": [{"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}, {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]}]}`,
	`{"return": [{"name": "eth0", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "::ffff:10.1.2.3", "prefix": 120}, {"ip-address-type": "ipv6", "ip-address": "::ffff:0.0.0.0", "prefix": 96}, {"ip-address-type": "ipv6", "ip-address": "2001:db8::1", "prefix": 129}, {"ip-address-type": "ipv4", "ip-address": "0.0.0.0", "prefix": 0}, {"ip-address-type": "ipv4", "ip-address": "224.0.0.1", "prefix": -1}, {"ip-address": "10.9.8.7", "prefix": 33}]}]}`,
	`{"return": []}`,
	`{"return": {}}`,
	`{"return": null}`,
	`{"return": [{"name": 5}]}`,
	`{"error": {"class": "CommandNotFound", "desc": "The command guest-network-get-interfaces has not been found"}}`,
	`{"error": null, "return": [{"name": "eth0", "ip-addresses": null}]}`,
	`{"retu`,
	`[]`,
}

// FuzzInterfaces decodes a reply to guest-network-get-interfaces as
// Execute and Interfaces do. Whatever the guest sends, nothing panics and
// every address returned is one the caller can use: a valid, zone-less IP
// (its text parses back to it) with a valid prefix length, neither
// loopback, link-local, unspecified nor multicast, that the guest did list with that prefix; IPv4 ones come first; an
// interface is kept only with an address.
func FuzzInterfaces(f *testing.F) {
	for _, s := range interfaceReplies {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		raw, err := decodeReply(json.NewDecoder(bytes.NewReader(data)))
		if err != nil {
			return
		}
		var wire []wireInterface
		if json.Unmarshal(raw, &wire) != nil {
			return
		}
		checkInterfaces(t, wire, filterInterfaces(wire))
	})
}

// checkInterfaces checks what filterInterfaces made of wire.
func checkInterfaces(t *testing.T, wire []wireInterface, got []Interface) {
	t.Helper()
	if len(got) > len(wire) {
		t.Fatalf("%d interfaces out of %d", len(got), len(wire))
	}
	w := 0
	for _, i := range got {
		checkAddrs(t, i)
		// The guest's interface it came from: the next one with its name,
		// MAC and addresses (others were dropped for having none left).
		for w < len(wire) && !(wire[w].Name == i.Name && wire[w].HardwareAddr == i.MAC && listed(i.Addrs, wire[w])) {
			w++
		}
		if w == len(wire) {
			t.Fatalf("interface %q (%s) %v is not one the guest listed, in its order", i.Name, i.MAC, i.Addrs)
		}
		w++
	}
}

// listed reports whether the guest listed every address of addrs on wi,
// with its prefix length.
func listed(addrs []netip.Prefix, wi wireInterface) bool {
	for _, p := range addrs {
		found := false
		for _, wa := range wi.IPAddresses {
			if x, err := netip.ParseAddr(wa.Address); err == nil && x.WithZone("") == p.Addr() && wa.Prefix == p.Bits() {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func checkAddrs(t *testing.T, i Interface) {
	t.Helper()
	if len(i.Addrs) == 0 {
		t.Fatalf("interface %q kept with no address", i.Name)
	}
	seenV6 := false
	for _, p := range i.Addrs {
		a := p.Addr()
		if !p.IsValid() || !a.IsValid() {
			t.Fatalf("interface %q: invalid prefix %v", i.Name, p)
		}
		if a.Zone() != "" {
			t.Fatalf("interface %q: address %v has a zone", i.Name, a)
		}
		if back, err := netip.ParseAddr(a.String()); err != nil || back != a {
			t.Fatalf("interface %q: address %v does not parse back: %v, %v", i.Name, a, back, err)
		}
		if back, err := netip.ParsePrefix(p.String()); err != nil || back != p {
			t.Fatalf("interface %q: prefix %v does not parse back: %v, %v", i.Name, p, back, err)
		}
		// An IPv4-mapped address is judged as the address it maps.
		if u := a.Unmap(); u.IsLoopback() || u.IsLinkLocalUnicast() || u.IsUnspecified() || u.IsMulticast() {
			t.Fatalf("interface %q: address %v should have been left out", i.Name, a)
		}
		v4 := a.Is4() || a.Is4In6()
		if v4 && seenV6 {
			t.Fatalf("interface %q: IPv4 address %v after an IPv6 one: %v", i.Name, a, i.Addrs)
		}
		seenV6 = seenV6 || !v4
	}
}

// scriptConn is a connection to a scripted qemu-ga: reads return script,
// in which "@ID@" stands for the id of the client's guest-sync-delimited
// (known once the client wrote it). Writes are kept.
type scriptConn struct {
	script []byte
	r      *bytes.Reader
	wrote  bytes.Buffer
	closed bool
}

func (c *scriptConn) Write(b []byte) (int, error) {
	if c.closed {
		return 0, net.ErrClosed
	}
	if c.r == nil {
		var req struct {
			Execute   string `json:"execute"`
			Arguments struct {
				ID int64 `json:"id"`
			} `json:"arguments"`
		}
		if len(b) == 0 || b[0] != 0xff || json.Unmarshal(b[1:], &req) != nil || req.Execute != "guest-sync-delimited" {
			return 0, errors.New("first write is not 0xFF and guest-sync-delimited")
		}
		c.r = bytes.NewReader(bytes.ReplaceAll(c.script, []byte("@ID@"), []byte(strconv.FormatInt(req.Arguments.ID, 10))))
	}
	return c.wrote.Write(b)
}

func (c *scriptConn) Read(b []byte) (int, error) {
	if c.closed {
		return 0, net.ErrClosed
	}
	if c.r == nil {
		return 0, io.EOF
	}
	return c.r.Read(b)
}

func (c *scriptConn) Close() error                     { c.closed = true; return nil }
func (c *scriptConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "qga.sock", Net: "unix"} }
func (c *scriptConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "qga.sock", Net: "unix"} }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// FuzzSession plays a whole connection: script is everything qemu-ga
// sends, "@ID@" standing for the id of the client's sync. The client syncs
// (skipping stale bytes up to the 0xFF and other ids), then asks for the
// interfaces and pings. Whatever comes, nothing panics or hangs (the
// script ends), a sync succeeds only past a 0xFF, an error reply is an
// *Error that keeps the connection and any other error drops it, and the
// interfaces keep FuzzInterfaces' invariants.
func FuzzSession(f *testing.F) {
	const sync = "\xff{\"return\": @ID@}\n"
	f.Add([]byte(sync + sampleInterfaces + "\n" + `{"return": {}}` + "\n"))
	f.Add([]byte("{\"return\": {}}\n{\"retu" + sync + interfaceReplies[1] + "\n{\"return\": {}}\n"))
	f.Add([]byte("\xff{\"return\": 12345}\n" + sync + interfaceReplies[2] + "\n"))
	f.Add([]byte(`{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}` + "\n" + sync + interfaceReplies[8] + "\n{\"return\": {}}\n"))
	f.Add([]byte("\xff{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n" + sync + interfaceReplies[3]))
	f.Add([]byte(sync + `{"return": 7}` + "\n" + `{"return": {}}`))
	f.Add([]byte(sync + `{"event": "x"}`))
	f.Add([]byte("\xff{\"return\": \"@ID@\"}\n\xff\xff[1]\xff{\"return\": @ID@.0}"))
	f.Add([]byte("\xff\x00{\"return\": @ID@}"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, script []byte) {
		conn := &scriptConn{script: script}
		c := &Client{path: "/nonexistent/qga.sock", conn: conn, br: bufio.NewReader(conn)}
		if err := c.syncLocked(); err != nil {
			return
		}
		if !bytes.Contains(script, []byte{0xff}) {
			t.Fatalf("synced without a 0xFF from the agent")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var wire []wireInterface
		err := c.Execute(ctx, "guest-network-get-interfaces", nil, &wire)
		if !checkKept(t, c, conn, err) {
			return
		}
		if err == nil {
			checkInterfaces(t, wire, filterInterfaces(wire))
		}
		checkKept(t, c, conn, c.Ping(ctx))
	})
}

// checkKept checks that the client kept its connection after err exactly
// when err is nil or an error reply; it reports whether it did.
func checkKept(t *testing.T, c *Client, conn *scriptConn, err error) bool {
	t.Helper()
	var qe *Error
	kept := err == nil || errors.As(err, &qe)
	if qe != nil && qe.Command == "" {
		t.Fatalf("error reply without its command: %v", qe)
	}
	if kept != (c.conn != nil) || kept == conn.closed {
		t.Fatalf("after %v: connection kept %v, closed %v", err, c.conn != nil, conn.closed)
	}
	return kept
}
