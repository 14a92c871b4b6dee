package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
	"github.com/digitalocean/go-qemu/qmp/raw"
)

// qemu is a real QEMU, paused (-S) with no guest, whose QMP socket is at
// path.
type qemu struct {
	path   string
	exited chan struct{} // closed when the process has exited
	stderr *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.Len() > 64<<10 {
		return len(p), nil
	}
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startQEMU starts QEMU and kills it when the test ends. We bind the QMP
// socket ourselves and hand it to QEMU as fd 3 (-chardev socket,fd=3), so
// the socket exists before QEMU runs: a Dial right away is queued in the
// listen backlog instead of racing QEMU's start-up.
func startQEMU(tb testing.TB) *qemu {
	tb.Helper()
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		if os.Getenv("CI") != "" {
			tb.Fatalf("qemu-system-x86_64 is required in CI (apt-get install qemu-system-x86): %v", err)
		}
		tb.Skipf("qemu-system-x86_64 not installed: %v", err)
	}
	dir, err := os.MkdirTemp("/tmp", "qmpq")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "qmp.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		tb.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	f, err := ln.File()
	ln.Close()
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()

	q := &qemu{path: path, exited: make(chan struct{}), stderr: &syncBuffer{}}
	cmd := exec.Command(bin,
		"-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-m", "64", "-S",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off",
		"-mon", "chardev=qmp,mode=control")
	cmd.ExtraFiles = []*os.File{f}
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Stderr = q.stderr
	// If the test binary dies, so does QEMU.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	go func() {
		cmd.Wait()
		close(q.exited)
	}()
	tb.Cleanup(func() {
		cmd.Process.Kill()
		<-q.exited
		if tb.Failed() {
			tb.Logf("qemu stderr:\n%s", q.stderr)
		}
	})
	return q
}

func (q *qemu) dial(tb testing.TB) *Client {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Dial(ctx, q.path)
	if err != nil {
		tb.Fatalf("Dial: %v\nqemu stderr:\n%s", err, q.stderr)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

func TestQEMU(t *testing.T) {
	q := startQEMU(t)
	c := q.dial(t)
	ctx := context.Background()

	t.Run("greeting", func(t *testing.T) {
		g := c.Greeting()
		if !g.Version.AtLeast(2, 12) || g.Package == "" {
			t.Errorf("greeting = %+v", g)
		}
		t.Logf("QEMU %s (%s), capabilities %v", g.Version, g.Package, g.Capabilities)
	})

	t.Run("query-status", func(t *testing.T) {
		var st struct {
			Status  string `json:"status"`
			Running bool   `json:"running"`
		}
		if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
			t.Fatal(err)
		}
		if st.Status != "prelaunch" || st.Running {
			t.Errorf("query-status = %+v, want prelaunch (-S)", st)
		}
	})

	t.Run("go-qemu raw", func(t *testing.T) {
		mon := raw.NewMonitor(c.Monitor())
		v, err := mon.QueryVersion()
		if err != nil {
			t.Fatal(err)
		}
		if got := (Version{int(v.Qemu.Major), int(v.Qemu.Minor), int(v.Qemu.Micro)}); got != c.Greeting().Version {
			t.Errorf("query-version %v, greeting %v", got, c.Greeting().Version)
		}
		st, err := mon.QueryStatus()
		if err != nil {
			t.Fatal(err)
		}
		if st.Status != raw.RunStatePrelaunch {
			t.Errorf("QueryStatus = %v", st.Status)
		}
	})

	t.Run("errors", func(t *testing.T) {
		tests := []struct {
			cmd   string
			args  any
			class string
		}{
			{"no-such-command", nil, "CommandNotFound"},
			{"query-status", map[string]int{"bogus": 1}, "GenericError"},
		}
		for _, tt := range tests {
			err := c.Execute(ctx, tt.cmd, tt.args, nil)
			var qe *Error
			if !errors.As(err, &qe) || qe.Class != tt.class || qe.Command != tt.cmd || qe.Desc == "" {
				t.Errorf("%s: err = %v, want class %s", tt.cmd, err, tt.class)
			}
		}
	})

	t.Run("large reply", func(t *testing.T) {
		// The schema is far over bufio.Scanner's 64 KiB line limit.
		schema, err := c.ExecuteRaw(ctx, "query-qmp-schema", nil)
		if err != nil {
			t.Fatal(err)
		}
		var entries []json.RawMessage
		if err := json.Unmarshal(schema, &entries); err != nil {
			t.Fatal(err)
		}
		if len(schema) <= 64<<10 || len(entries) == 0 {
			t.Errorf("schema: %d bytes, %d entries", len(schema), len(entries))
		}
		t.Logf("query-qmp-schema: %d bytes, %d entries", len(schema), len(entries))
	})

	t.Run("cont and stop", func(t *testing.T) {
		events, cancel := c.Subscribe(16)
		defer cancel()
		for _, step := range []struct{ cmd, event, status string }{
			{"cont", "RESUME", "running"},
			{"stop", "STOP", "paused"},
		} {
			if err := c.Execute(ctx, step.cmd, nil, nil); err != nil {
				t.Fatal(err)
			}
			wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			ev, err := WaitEvent(wctx, events, step.event)
			cancel()
			if err != nil {
				t.Fatalf("after %s: %v", step.cmd, err)
			}
			if ev.Timestamp.IsZero() {
				t.Errorf("%s has no timestamp", ev.Name)
			}
			var st struct{ Status string }
			if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
				t.Fatal(err)
			}
			if st.Status != step.status {
				t.Errorf("after %s: status %q, want %q", step.cmd, st.Status, step.status)
			}
		}
	})
}

func TestQEMUQuit(t *testing.T) {
	q := startQEMU(t)
	c := q.dial(t)
	events, cancel := c.Subscribe(16)
	defer cancel()

	// QEMU may close the socket right after its reply.
	if err := c.Execute(context.Background(), "quit", nil, nil); err != nil && !errors.Is(err, ErrClosed) {
		t.Fatalf("quit: %v", err)
	}
	ctx, cancelCtx := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancelCtx()
	ev, err := WaitEvent(ctx, events, "SHUTDOWN")
	if err != nil {
		t.Fatal(err)
	}
	if ev.Data["guest"] != false || ev.Data["reason"] != "host-qmp-quit" {
		t.Errorf("SHUTDOWN data = %v", ev.Data)
	}
	ev, err = WaitEvent(ctx, events)
	if err != nil || ev.Name != EventDisconnected {
		t.Errorf("after SHUTDOWN: %q, %v; want %s", ev.Name, err, EventDisconnected)
	}
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("Done not closed after EventDisconnected")
	}
	if err := c.Err(); !errors.Is(err, ErrClosed) {
		t.Errorf("Err() = %v", err)
	}
	t.Logf("connection ended with: %v", c.Err())
	select {
	case <-q.exited:
	case <-ctx.Done():
		t.Fatal("QEMU still running after quit")
	}
}

// BenchmarkQueryStatus is a query-status round trip through Client.
func BenchmarkQueryStatus(b *testing.B) {
	c := startQEMU(b).dial(b)
	ctx := context.Background()
	var st struct{ Status string }
	for b.Loop() {
		if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkQueryStatusParallel is BenchmarkQueryStatus from concurrent
// callers sharing one connection.
func BenchmarkQueryStatusParallel(b *testing.B) {
	c := startQEMU(b).dial(b)
	b.RunParallel(func(pb *testing.PB) {
		var st struct{ Status string }
		for pb.Next() {
			if err := c.Execute(context.Background(), "query-status", nil, &st); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkQueryStatusGoQemuRaw goes through go-qemu's typed raw monitor
// on top of our adapter.
func BenchmarkQueryStatusGoQemuRaw(b *testing.B) {
	mon := raw.NewMonitor(startQEMU(b).dial(b).Monitor())
	for b.Loop() {
		if _, err := mon.QueryStatus(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkQueryStatusGoQemuSocketMonitor is go-qemu's own socket layer,
// for comparison.
func BenchmarkQueryStatusGoQemuSocketMonitor(b *testing.B) {
	q := startQEMU(b)
	mon, err := goqmp.NewSocketMonitor("unix", q.path, 30*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	if err := mon.Connect(); err != nil {
		b.Fatal(err)
	}
	defer mon.Disconnect()
	cmd := []byte(`{"execute":"query-status"}`)
	for b.Loop() {
		if _, err := mon.Run(cmd); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkQueryStatusRawSocket is the floor: a hand-written write and
// line read on the socket, no matching, no decoding beyond finding the
// newline.
func BenchmarkQueryStatusRawSocket(b *testing.B) {
	q := startQEMU(b)
	conn, err := net.Dial("unix", q.path)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	if _, err := r.ReadBytes('\n'); err != nil { // greeting
		b.Fatal(err)
	}
	if _, err := conn.Write([]byte(`{"execute":"qmp_capabilities"}` + "\n")); err != nil {
		b.Fatal(err)
	}
	if _, err := r.ReadBytes('\n'); err != nil {
		b.Fatal(err)
	}
	cmd := []byte(`{"execute":"query-status","id":1}` + "\n")
	for b.Loop() {
		if _, err := conn.Write(cmd); err != nil {
			b.Fatal(err)
		}
		line, err := r.ReadBytes('\n')
		if err != nil {
			b.Fatal(err)
		}
		if !bytes.Contains(line, []byte(`"return"`)) {
			b.Fatal(fmt.Errorf("unexpected reply %s", line))
		}
	}
}
