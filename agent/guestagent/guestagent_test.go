package guestagent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"
)

// fakeQGA speaks qemu-ga's wire protocol on a unix socket: 0xFF resets the
// parser (answered, like qemu-ga, with a parse error), guest-sync-delimited
// answers 0xFF and the id, other commands go to handle. before is written
// to each new connection first (stale bytes of an earlier client).
type fakeQGA struct {
	path   string
	ln     net.Listener
	before string
	handle func(cmd string, args json.RawMessage) (reply string) // "" = no answer

	mu    sync.Mutex
	conns int
	wg    sync.WaitGroup
}

func newFakeQGA(t *testing.T, before string, handle func(cmd string, args json.RawMessage) string) *fakeQGA {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "qga")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeQGA{path: filepath.Join(dir, "qga.sock"), before: before, handle: handle}
	f.ln, err = net.Listen("unix", f.path)
	if err != nil {
		t.Fatal(err)
	}
	f.wg.Add(1)
	go f.serve()
	t.Cleanup(func() {
		f.ln.Close()
		f.wg.Wait()
		os.RemoveAll(dir)
	})
	return f
}

func (f *fakeQGA) serve() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		f.conns++
		f.mu.Unlock()
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer c.Close()
			f.conn(c)
		}()
	}
}

func (f *fakeQGA) conn(c net.Conn) {
	if f.before != "" {
		fmt.Fprint(c, f.before)
	}
	r := bufio.NewReader(c)
	var line []byte
	for {
		b, err := r.ReadByte()
		if err != nil {
			return
		}
		switch {
		case b == 0xff:
			line = line[:0]
			fmt.Fprint(c, `{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}`+"\n")
		case b == '\n':
			var req struct {
				Execute   string          `json:"execute"`
				Arguments json.RawMessage `json:"arguments"`
			}
			if err := json.Unmarshal(line, &req); err != nil {
				fmt.Fprintf(c, `{"error": {"class": "GenericError", "desc": "bad json"}}`+"\n")
			} else if req.Execute == "guest-sync-delimited" {
				var a struct{ ID int64 }
				json.Unmarshal(req.Arguments, &a)
				fmt.Fprintf(c, "\xff{\"return\": %d}\n", a.ID)
			} else if rep := f.handle(req.Execute, req.Arguments); rep != "" {
				fmt.Fprint(c, rep+"\n")
			}
			line = line[:0]
		default:
			line = append(line, b)
		}
	}
}

const sampleInterfaces = `{"return": [
 {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [
   {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
   {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}]},
 {"name": "eth0", "hardware-address": "52:54:00:12:34:56", "ip-addresses": [
   {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24},
   {"ip-address-type": "ipv6", "ip-address": "fec0::5054:ff:fe12:3456", "prefix": 64},
   {"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe12:3456%eth0", "prefix": 64}]},
 {"name": "eth1", "hardware-address": "52:54:00:12:34:57", "ip-addresses": [
   {"ip-address-type": "ipv4", "ip-address": "169.254.3.4", "prefix": 16},
   {"ip-address-type": "ipv6", "ip-address": "2001:db8::7", "prefix": 64},
   {"ip-address-type": "ipv4", "ip-address": "192.168.5.9", "prefix": 24}]},
 {"name": "eth2", "hardware-address": "52:54:00:12:34:58"}
]}`

func TestInterfacesFiltersAndSkipsStaleBytes(t *testing.T) {
	// An earlier client's late replies and half a message: all before the
	// sentinel, so skipped.
	f := newFakeQGA(t, "{\"return\": {}}\n{\"retu", func(cmd string, _ json.RawMessage) string {
		if cmd == "guest-network-get-interfaces" {
			return sampleInterfaces
		}
		return `{"error": {"class": "CommandNotFound", "desc": "no"}}`
	})
	c := New(f.path)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := c.Interfaces(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []Interface{
		{Name: "eth0", MAC: "52:54:00:12:34:56", Addrs: []netip.Prefix{
			netip.MustParsePrefix("10.0.2.15/24"), netip.MustParsePrefix("fec0::5054:ff:fe12:3456/64")}},
		{Name: "eth1", MAC: "52:54:00:12:34:57", Addrs: []netip.Prefix{
			netip.MustParsePrefix("192.168.5.9/24"), netip.MustParsePrefix("2001:db8::7/64")}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Interfaces =\n%+v\nwant\n%+v", got, want)
	}
	// The connection is kept: a second call does not reconnect.
	if _, err := c.Interfaces(ctx); err != nil {
		t.Fatal(err)
	}
	// An error reply is an *Error and keeps the connection too.
	err = c.Execute(ctx, "guest-nope", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" || qe.Command != "guest-nope" {
		t.Errorf("error reply: %v, want *Error CommandNotFound", err)
	}
	if err := c.Ping(ctx); err == nil {
		t.Errorf("guest-ping on a fake that does not know it: no error")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conns != 1 {
		t.Errorf("%d connections, want 1", f.conns)
	}
}

func TestStaleSyncReplyIsSkipped(t *testing.T) {
	// A sentinel and sync reply of an earlier client come first.
	f := newFakeQGA(t, "\xff{\"return\": 12345}\n", func(cmd string, _ json.RawMessage) string { return `{"return": {}}` })
	c := New(f.path)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestTimeoutThenReconnect(t *testing.T) {
	var mu sync.Mutex
	silent := true
	f := newFakeQGA(t, "", func(cmd string, _ json.RawMessage) string {
		mu.Lock()
		defer mu.Unlock()
		if silent {
			return ""
		}
		return `{"return": {}}`
	})
	c := New(f.path)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	err := c.Ping(ctx)
	cancel()
	if !errors.Is(err, ErrNotResponding) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ping on a silent agent: %v, want ErrNotResponding and DeadlineExceeded", err)
	}
	mu.Lock()
	silent = false
	mu.Unlock()
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping after a timeout: %v", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conns != 2 {
		t.Errorf("%d connections, want 2 (a new one after the timeout)", f.conns)
	}
}

func TestNoSocket(t *testing.T) {
	c := New(filepath.Join(t.TempDir(), "none.sock"))
	defer c.Close()
	if err := c.Ping(context.Background()); err == nil {
		t.Fatal("Ping without a socket: no error")
	}
	c.Close()
	if err := c.Ping(context.Background()); err == nil {
		t.Fatal("Ping after Close: no error")
	}
}
