// Package qmptest provides a fake QEMU that speaks QMP on a real unix
// socket, for tests of code that drives QEMU, like net/http/httptest does
// for HTTP.
//
// The server behaves like QEMU where it matters to a client: it sends the
// greeting, refuses every command until qmp_capabilities, echoes ids, sends
// events only to negotiated connections, writes "\r\n"-terminated JSON, and
// knows a few commands out of the box (query-status, query-version, stop,
// cont and quit, with their STOP/RESUME/SHUTDOWN events and quit closing the
// socket). Everything else answers CommandNotFound unless scripted with
// Handle.
package qmptest

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

// QMPError is a scripted QMP error reply: a handler returning it (or an
// error wrapping it) makes the server answer {"error": {"class", "desc"}}.
// Any other error is answered as a GenericError with the error's text.
type QMPError struct {
	Class string
	Desc  string
}

func (e *QMPError) Error() string { return e.Class + ": " + e.Desc }

// ErrNoReply, returned by a handler, makes the server send no reply to the
// command at all (see Hang).
var ErrNoReply = errors.New("qmptest: no reply")

// HandlerFunc answers a command: it gets the command's arguments (nil when
// there are none) and returns the "return" value (nil means {}) or an error.
type HandlerFunc func(args json.RawMessage) (any, error)

// ServerOption configures NewServer.
type ServerOption func(*config)

type config struct {
	version    [3]int
	pkg        string
	caps       []string
	noGreeting bool
	concurrent bool
	status     string
}

// WithVersion sets the QEMU version announced in the greeting and returned
// by query-version (default 7.2.0).
func WithVersion(major, minor, micro int) ServerOption {
	return func(c *config) { c.version = [3]int{major, minor, micro} }
}

// WithCapabilities sets the capabilities announced in the greeting
// (default "oob").
func WithCapabilities(caps ...string) ServerOption {
	return func(c *config) { c.caps = caps }
}

// WithoutGreeting makes the server accept connections and never send the
// greeting, like a wedged QEMU.
func WithoutGreeting() ServerOption {
	return func(c *config) { c.noGreeting = true }
}

// WithConcurrentCommands makes the server run each command's handler in
// its own goroutine, so replies may go out in any order (real QEMU answers
// in order; a client must not rely on it). By default commands of one
// connection are answered one after the other.
func WithConcurrentCommands() ServerOption {
	return func(c *config) { c.concurrent = true }
}

// WithStatus sets the initial run state reported by query-status (default
// "running"; "prelaunch" is what QEMU started with -S reports).
func WithStatus(status string) ServerOption {
	return func(c *config) { c.status = status }
}

// Server is a fake QMP server listening on a unix socket.
type Server struct {
	cfg  config
	dir  string
	path string
	ln   *net.UnixListener
	wg   sync.WaitGroup // accept loop and connection readers

	mu       sync.Mutex
	handlers map[string]HandlerFunc
	before   map[string][]event // events sent before a command's reply
	conns    map[*conn]struct{}
	commands []string
	status   string
	quit     bool
}

type event struct {
	name string
	data any
}

type conn struct {
	s          *Server
	c          *net.UnixConn
	wmu        sync.Mutex
	negotiated bool // guarded by s.mu
}

// NewServer starts a fake QMP server on a unix socket in a fresh directory
// under /tmp (socket paths are limited to 108 bytes, too few for
// t.TempDir()). tb.Cleanup stops it, closes its connections and removes the
// directory. Handlers must return for the cleanup to finish.
func NewServer(tb testing.TB, opts ...ServerOption) *Server {
	tb.Helper()
	cfg := config{
		version: [3]int{7, 2, 0},
		pkg:     "qmptest",
		caps:    []string{"oob"},
		status:  "running",
	}
	for _, o := range opts {
		o(&cfg)
	}
	dir, err := os.MkdirTemp("/tmp", "qmpt")
	if err != nil {
		tb.Fatalf("qmptest: %v", err)
	}
	path := filepath.Join(dir, "qmp.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		os.RemoveAll(dir)
		tb.Fatalf("qmptest: %v", err)
	}
	s := &Server{
		cfg:      cfg,
		dir:      dir,
		path:     path,
		ln:       ln,
		handlers: make(map[string]HandlerFunc),
		before:   make(map[string][]event),
		conns:    make(map[*conn]struct{}),
		status:   cfg.status,
	}
	s.wg.Add(1)
	go s.accept()
	tb.Cleanup(s.close)
	return s
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Handle scripts the answer to cmd, replacing any earlier script or
// built-in behaviour.
func (s *Server) Handle(cmd string, fn func(args json.RawMessage) (any, error)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers[cmd] = fn
}

// Hang makes the server never answer cmd.
func (s *Server) Hang(cmd string) {
	s.Handle(cmd, func(json.RawMessage) (any, error) { return nil, ErrNoReply })
}

// EmitBefore makes the server send an event before every reply to cmd, as
// QEMU does with RESUME before answering cont.
func (s *Server) EmitBefore(cmd, event string, data any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.before[cmd] = append(s.before[cmd], eventOf(event, data))
}

func eventOf(name string, data any) event { return event{name: name, data: data} }

// Emit sends an event now to every connection that has negotiated
// capabilities.
func (s *Server) Emit(event string, data any) {
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		if c.negotiated {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.event(eventOf(event, data))
	}
}

// CloseConns closes every connection: clients see EOF. The server keeps
// accepting new ones.
func (s *Server) CloseConns() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.c.Close()
	}
}

// Commands returns the commands received so far, qmp_capabilities
// included, in the order they arrived.
func (s *Server) Commands() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.commands)
}

// Conns is the number of open connections that have negotiated
// capabilities.
func (s *Server) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.conns {
		if c.negotiated {
			n++
		}
	}
	return n
}

// Status is the run state that query-status reports.
func (s *Server) Status() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

func (s *Server) close() {
	s.mu.Lock()
	s.quit = true
	s.mu.Unlock()
	s.ln.Close()
	s.CloseConns()
	s.wg.Wait()
	os.RemoveAll(s.dir)
}

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		uc, err := s.ln.AcceptUnix()
		if err != nil {
			return // listener closed
		}
		c := &conn{s: s, c: uc}
		s.mu.Lock()
		if s.quit {
			s.mu.Unlock()
			uc.Close()
			continue
		}
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go c.serve()
	}
}

type request struct {
	Execute   string          `json:"execute"`
	ExecOOB   string          `json:"exec-oob"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

func (c *conn) serve() {
	s := c.s
	defer s.wg.Done()
	defer func() {
		c.c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	if s.cfg.noGreeting {
		// Hold the connection open, silent, until it is closed.
		var b [512]byte
		for {
			if _, err := c.c.Read(b[:]); err != nil {
				return
			}
		}
	}
	v := s.cfg.version
	greeting := map[string]any{"QMP": map[string]any{
		"version": map[string]any{
			"qemu":    map[string]int{"major": v[0], "minor": v[1], "micro": v[2]},
			"package": s.cfg.pkg,
		},
		"capabilities": nonNil(s.cfg.caps),
	}}
	if c.write(greeting) != nil {
		return
	}
	dec := json.NewDecoder(c.c)
	for {
		var req request
		if err := dec.Decode(&req); err != nil {
			var syn *json.SyntaxError
			if errors.As(err, &syn) {
				c.reply(nil, nil, &QMPError{Class: "GenericError", Desc: "JSON parse error, " + err.Error()})
			}
			return
		}
		name := req.Execute
		if name == "" {
			name = req.ExecOOB
		}
		s.mu.Lock()
		s.commands = append(s.commands, name)
		negotiated := c.negotiated
		if name == "qmp_capabilities" && !negotiated {
			// Marked before replying so that a client whose Dial
			// returned receives every later Emit.
			c.negotiated = true
		}
		s.mu.Unlock()
		switch {
		case name == "":
			c.reply(req.ID, nil, &QMPError{Class: "GenericError", Desc: "QMP input lacks member 'execute'"})
		case !negotiated && name != "qmp_capabilities":
			c.reply(req.ID, nil, &QMPError{Class: "CommandNotFound", Desc: "Expecting capabilities negotiation with 'qmp_capabilities'"})
		case !negotiated:
			c.reply(req.ID, struct{}{}, nil)
		case s.cfg.concurrent:
			go c.run(name, req)
		default:
			if !c.run(name, req) {
				return
			}
		}
	}
}

// run answers one negotiated command; it reports false when the
// connection is to be closed.
func (c *conn) run(name string, req request) bool {
	s := c.s
	s.mu.Lock()
	fn := s.handlers[name]
	before := slices.Clone(s.before[name])
	s.mu.Unlock()
	var after []event
	closeAfter := false
	if fn == nil {
		fn, after, closeAfter = c.s.builtin(name)
	}
	var args json.RawMessage
	if len(req.Arguments) > 0 && string(req.Arguments) != "null" {
		args = req.Arguments
	}
	ret, err := fn(args)
	if errors.Is(err, ErrNoReply) {
		return true
	}
	for _, ev := range before {
		c.event(ev)
	}
	for _, ev := range after {
		c.event(ev)
	}
	if err := c.reply(req.ID, ret, err); err != nil {
		return false
	}
	if closeAfter {
		// QEMU exits after answering quit: no more connections.
		s.mu.Lock()
		s.quit = true
		s.mu.Unlock()
		s.ln.Close()
		s.CloseConns()
		return false
	}
	return true
}

// builtin returns the default behaviour for a command: its handler, the
// events QEMU sends before the reply, and whether the socket then closes.
func (s *Server) builtin(name string) (HandlerFunc, []event, bool) {
	ok := func(json.RawMessage) (any, error) { return struct{}{}, nil }
	switch name {
	case "qmp_capabilities":
		return func(json.RawMessage) (any, error) {
			return nil, &QMPError{Class: "CommandNotFound", Desc: "Capabilities negotiation is already complete, command ignored"}
		}, nil, false
	case "query-status":
		return func(json.RawMessage) (any, error) {
			st := s.Status()
			return map[string]any{"status": st, "running": st == "running", "singlestep": false}, nil
		}, nil, false
	case "query-version":
		return func(json.RawMessage) (any, error) {
			v := s.cfg.version
			return map[string]any{
				"qemu":    map[string]int{"major": v[0], "minor": v[1], "micro": v[2]},
				"package": s.cfg.pkg,
			}, nil
		}, nil, false
	case "stop":
		s.setStatus("paused")
		return ok, []event{eventOf("STOP", nil)}, false
	case "cont":
		s.setStatus("running")
		return ok, []event{eventOf("RESUME", nil)}, false
	case "quit":
		s.setStatus("shutdown")
		return ok, []event{eventOf("SHUTDOWN", map[string]any{"guest": false, "reason": "host-qmp-quit"})}, true
	}
	return func(json.RawMessage) (any, error) {
		return nil, &QMPError{Class: "CommandNotFound", Desc: fmt.Sprintf("The command %s has not been found", name)}
	}, nil, false
}

func (s *Server) setStatus(st string) {
	s.mu.Lock()
	s.status = st
	s.mu.Unlock()
}

func (c *conn) reply(id json.RawMessage, ret any, err error) error {
	msg := map[string]any{}
	if len(id) > 0 {
		msg["id"] = id
	}
	if err != nil {
		var qe *QMPError
		if !errors.As(err, &qe) {
			qe = &QMPError{Class: "GenericError", Desc: err.Error()}
		}
		msg["error"] = map[string]string{"class": qe.Class, "desc": qe.Desc}
	} else {
		if ret == nil {
			ret = struct{}{}
		}
		msg["return"] = ret
	}
	return c.write(msg)
}

func (c *conn) event(ev event) {
	now := time.Now()
	msg := map[string]any{
		"event":     ev.name,
		"timestamp": map[string]int64{"seconds": now.Unix(), "microseconds": int64(now.Nanosecond() / 1000)},
	}
	if ev.data != nil {
		msg["data"] = ev.data
	}
	c.write(msg)
}

func (c *conn) write(msg any) error {
	b, err := json.Marshal(msg)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err = c.c.Write(append(b, '\r', '\n'))
	return err
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
