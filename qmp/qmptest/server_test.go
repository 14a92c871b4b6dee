package qmptest_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/qmp/qmptest"
)

// wire is a bare QMP client: one JSON message per line, as QEMU sends.
type wire struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func open(t *testing.T, s *qmptest.Server) *wire {
	t.Helper()
	c, err := net.Dial("unix", s.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &wire{t: t, c: c, r: bufio.NewReader(c)}
}

func (w *wire) send(line string) {
	w.t.Helper()
	if _, err := io.WriteString(w.c, line+"\n"); err != nil {
		w.t.Fatal(err)
	}
}

// recv reads one line and decodes it into a generic map.
func (w *wire) recv() map[string]any {
	w.t.Helper()
	line, err := w.r.ReadString('\n')
	if err != nil {
		w.t.Fatalf("read: %v", err)
	}
	if !strings.HasSuffix(line, "\r\n") {
		w.t.Errorf("line %q does not end in CRLF", line)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(line), &m); err != nil {
		w.t.Fatalf("decode %q: %v", line, err)
	}
	return m
}

func errorClass(m map[string]any) string {
	e, _ := m["error"].(map[string]any)
	s, _ := e["class"].(string)
	return s
}

func TestProtocol(t *testing.T) {
	s := qmptest.NewServer(t, qmptest.WithVersion(9, 0, 1), qmptest.WithStatus("prelaunch"))
	w := open(t, s)

	g := w.recv()
	qmp, _ := g["QMP"].(map[string]any)
	ver, _ := qmp["version"].(map[string]any)["qemu"].(map[string]any)
	if ver["major"] != 9.0 || ver["minor"] != 0.0 || ver["micro"] != 1.0 {
		t.Errorf("greeting = %v", g)
	}

	// Nothing but qmp_capabilities before negotiation, like QEMU.
	w.send(`{"execute":"query-status","id":"early"}`)
	if m := w.recv(); errorClass(m) != "CommandNotFound" || m["id"] != "early" {
		t.Errorf("command before negotiation: %v", m)
	}
	if s.Conns() != 0 {
		t.Errorf("Conns() = %d before negotiation", s.Conns())
	}
	w.send(`{"execute":"qmp_capabilities","id":1}`)
	if m := w.recv(); m["id"] != 1.0 || m["return"] == nil {
		t.Errorf("qmp_capabilities reply: %v", m)
	}
	if s.Conns() != 1 {
		t.Errorf("Conns() = %d after negotiation", s.Conns())
	}

	w.send(`{"execute":"query-status","id":{"any":"json"}}`)
	m := w.recv()
	if id, _ := m["id"].(map[string]any); id["any"] != "json" {
		t.Errorf("id not echoed: %v", m)
	}
	if ret, _ := m["return"].(map[string]any); ret["status"] != "prelaunch" || ret["running"] != false {
		t.Errorf("query-status: %v", m)
	}

	w.send(`{"execute":"cont","id":2}`)
	if m := w.recv(); m["event"] != "RESUME" || m["timestamp"] == nil {
		t.Errorf("want RESUME before the reply, got %v", m)
	}
	if m := w.recv(); m["id"] != 2.0 {
		t.Errorf("cont reply: %v", m)
	}
	if s.Status() != "running" {
		t.Errorf("status after cont = %q", s.Status())
	}

	w.send(`{"arguments":{}}`)
	if m := w.recv(); errorClass(m) != "GenericError" {
		t.Errorf("command without execute: %v", m)
	}

	s.Emit("POWERDOWN", nil)
	if m := w.recv(); m["event"] != "POWERDOWN" {
		t.Errorf("emitted event: %v", m)
	}

	w.send(`{"execute":"quit","id":3}`)
	if m := w.recv(); m["event"] != "SHUTDOWN" || m["data"].(map[string]any)["reason"] != "host-qmp-quit" {
		t.Errorf("want SHUTDOWN, got %v", m)
	}
	if m := w.recv(); m["id"] != 3.0 {
		t.Errorf("quit reply: %v", m)
	}
	if _, err := w.r.ReadString('\n'); !errors.Is(err, io.EOF) {
		t.Errorf("after quit: %v, want EOF", err)
	}
	if c, err := net.Dial("unix", s.Path()); err == nil {
		c.Close()
		t.Error("server still accepts connections after quit")
	}

	// "" is the message that lacked "execute".
	want := []string{"query-status", "qmp_capabilities", "query-status", "cont", "", "quit"}
	if got := s.Commands(); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("Commands() = %q, want %q", got, want)
	}
}

func TestHandleAndHang(t *testing.T) {
	s := qmptest.NewServer(t)
	s.Handle("query-status", func(json.RawMessage) (any, error) {
		return map[string]any{"status": "paused", "running": false}, nil
	})
	s.Handle("boom", func(args json.RawMessage) (any, error) {
		return nil, errors.New("bad: " + string(args))
	})
	s.Hang("never")
	s.EmitBefore("boom", "WARN", map[string]int{"n": 1})
	w := open(t, s)
	w.recv()
	w.send(`{"execute":"qmp_capabilities"}`)
	w.recv()

	w.send(`{"execute":"never","id":1}`)
	w.send(`{"execute":"query-status","id":2}`)
	if m := w.recv(); m["id"] != 2.0 || m["return"].(map[string]any)["status"] != "paused" {
		t.Errorf("scripted query-status (after a hung command): %v", m)
	}
	w.send(`{"execute":"boom","arguments":{"x":1},"id":3}`)
	if m := w.recv(); m["event"] != "WARN" {
		t.Errorf("want WARN before the reply, got %v", m)
	}
	m := w.recv()
	if errorClass(m) != "GenericError" || m["error"].(map[string]any)["desc"] != `bad: {"x":1}` {
		t.Errorf("boom: %v", m)
	}

	s.CloseConns()
	if _, err := w.r.ReadString('\n'); !errors.Is(err, io.EOF) {
		t.Errorf("after CloseConns: %v, want EOF", err)
	}
	// The server still accepts new connections.
	w2 := open(t, s)
	if g := w2.recv(); g["QMP"] == nil {
		t.Errorf("greeting on new connection: %v", g)
	}
}
