// Package qmp is a client for the QEMU Machine Protocol over a unix socket.
//
// Unlike go-qemu's SocketMonitor it puts a deadline on everything (Dial and
// each command, from a per-command timeout table), matches replies to
// commands by id so that events arriving in between shift nothing, never
// lets a slow event consumer block the socket reader, keeps QEMU's error
// class (*Error), and reads messages of any size. Monitor adapts a Client
// to go-qemu's qmp.Monitor so that go-qemu's typed qmp/raw API can be
// layered on it.
package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Client is one QMP connection. All its methods are safe for concurrent use.
type Client struct {
	conn     net.Conn
	path     string
	opts     options
	log      *zap.Logger
	greeting Greeting

	wsem    chan struct{} // held while one command is being written
	nextID  atomic.Uint64
	dropped atomic.Uint64

	mu      sync.Mutex
	pending map[uint64]chan reply // by command id; each channel has room for its reply
	subs    map[*subscription]struct{}
	closed  bool
	cause   error // why the connection is gone; nil after Close

	done       chan struct{} // closed when the connection is gone
	readerDone chan struct{} // closed when the reader goroutine has returned
}

// request is one command on the wire.
type request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments,omitempty"`
	ID        uint64          `json:"id"`
}

// message is any message from QEMU: greeting, reply or event.
type message struct {
	QMP       *wireGreeting   `json:"QMP"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *wireTimestamp  `json:"timestamp"`
	ID        json.RawMessage `json:"id"`
	Return    json.RawMessage `json:"return"`
	Error     *wireError      `json:"error"`
}

type wireError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

type wireTimestamp struct {
	Seconds      int64 `json:"seconds"`
	Microseconds int64 `json:"microseconds"`
}

// reply is what the reader hands to the command waiting for it.
type reply struct {
	ret json.RawMessage
	err *wireError
}

func (r reply) result(cmd string) (json.RawMessage, error) {
	if r.err != nil {
		return nil, &Error{Class: r.err.Class, Desc: r.err.Desc, Command: cmd}
	}
	return r.ret, nil
}

// Dial connects to the QMP socket at path, reads QEMU's greeting and
// negotiates capabilities. The connect and the handshake are bounded by
// ctx's deadline, or by the default timeout when ctx has none; cancelling
// ctx aborts them. A timeout wraps context.DeadlineExceeded.
func Dial(ctx context.Context, path string, opts ...Option) (*Client, error) {
	o := newOptions(opts)
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.defaultTimeout)
		defer cancel()
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		return nil, fmt.Errorf("qmp: dial %s: %w", path, err)
	}
	c := &Client{
		conn:       conn,
		path:       path,
		opts:       o,
		log:        o.log,
		wsem:       make(chan struct{}, 1),
		pending:    make(map[uint64]chan reply),
		subs:       make(map[*subscription]struct{}),
		done:       make(chan struct{}),
		readerDone: make(chan struct{}),
	}
	dec := json.NewDecoder(conn)
	if err := c.handshake(ctx, dec); err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: handshake on %s: %w", path, err)
	}
	go c.read(dec)
	return c, nil
}

// handshake reads the greeting and negotiates capabilities within ctx.
func (c *Client) handshake(ctx context.Context, dec *json.Decoder) error {
	dl, _ := ctx.Deadline()
	if err := c.conn.SetDeadline(dl); err != nil {
		return err
	}
	// Cancellation (not only the deadline) must interrupt blocked I/O.
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	err := c.negotiate(dec)
	if !stop() {
		// ctx ended while we worked, and the connection's deadline is
		// now in the past: the handshake failed whatever err says.
		if err == nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w: %w", ctx.Err(), err)
	}
	if err != nil {
		return deadlineErr(err)
	}
	return c.conn.SetDeadline(time.Time{})
}

func (c *Client) negotiate(dec *json.Decoder) error {
	var m message
	if err := dec.Decode(&m); err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	if m.QMP == nil {
		return errors.New("first message is not a QMP greeting")
	}
	c.greeting = m.QMP.greeting()

	id := c.nextID.Add(1)
	line, err := json.Marshal(request{Execute: "qmp_capabilities", ID: id})
	if err != nil {
		return err
	}
	if _, err := c.conn.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("send qmp_capabilities: %w", err)
	}
	for {
		var m message
		if err := dec.Decode(&m); err != nil {
			return fmt.Errorf("read qmp_capabilities reply: %w", err)
		}
		if m.Return == nil && m.Error == nil {
			c.log.Debug("qmp: ignoring message during handshake", zap.String("event", m.Event))
			continue
		}
		if string(m.ID) != strconv.FormatUint(id, 10) {
			c.log.Warn("qmp: dropping reply with unknown id during handshake", zap.ByteString("id", m.ID))
			continue
		}
		_, err := reply{ret: m.Return, err: m.Error}.result("qmp_capabilities")
		return err
	}
}

// deadlineErr makes an I/O timeout also match context.DeadlineExceeded.
func deadlineErr(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
	}
	return err
}

// read is the only reader of the socket. It never blocks on anything but
// the socket: replies go to channels with room for them, events are offered
// to subscribers without waiting.
func (c *Client) read(dec *json.Decoder) {
	defer close(c.readerDone)
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			var syn *json.SyntaxError
			if errors.As(err, &syn) {
				err = fmt.Errorf("malformed message at offset %d: %w", dec.InputOffset(), err)
			}
			c.shutdown(err)
			return
		}
		var m message
		if err := json.Unmarshal(raw, &m); err != nil {
			c.log.Warn("qmp: dropping message that is not a QMP object", zap.Error(err))
			continue
		}
		switch {
		case m.Event != "":
			c.dispatch(&m, raw)
		case m.Return != nil || m.Error != nil:
			c.deliver(&m)
		default:
			c.log.Warn("qmp: dropping unexpected message", zap.Int("bytes", len(raw)))
		}
	}
}

// deliver hands a reply to the command waiting for its id.
func (c *Client) deliver(m *message) {
	id, err := strconv.ParseUint(string(m.ID), 10, 64)
	if err != nil {
		fields := []zap.Field{zap.ByteString("id", m.ID)}
		if m.Error != nil {
			fields = append(fields, zap.String("class", m.Error.Class), zap.String("desc", m.Error.Desc))
		}
		c.log.Warn("qmp: dropping reply without a known id", fields...)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ch, ok := c.pending[id]
	if !ok {
		c.log.Warn("qmp: dropping reply nobody waits for", zap.Uint64("id", id))
		return
	}
	delete(c.pending, id)
	// Sent under mu, so a waiter that gave up and removed its entry
	// knows no reply can land in its channel afterwards. It never blocks:
	// the channel has room for exactly this reply.
	ch <- reply{ret: m.Return, err: m.Error}
}

// shutdown records that the connection is gone (cause nil: closed by
// Close), wakes every pending command and tells every subscriber. Only the
// first call has an effect.
func (c *Client) shutdown(cause error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.cause = cause
	c.pending = nil
	close(c.done)
	ev := disconnected(c.errLocked())
	for s := range c.subs {
		s.ch <- ev // the last slot of every subscription is kept for this
		close(s.ch)
	}
	c.subs = nil
	c.mu.Unlock()
	c.conn.Close()
}

// Execute runs cmd with args (nil for none) and, if out is not nil,
// decodes the reply's "return" value into it.
//
// The call is bounded by ctx and by the command's timeout (the table of
// WithCommandTimeouts, else the default timeout), whichever ends first. A
// QMP error reply is returned as *Error; a timeout wraps
// context.DeadlineExceeded (the client stays usable, and the late reply is
// dropped); a lost connection wraps ErrClosed (and the cause, e.g. io.EOF).
// QEMU may close the socket right after answering "quit": callers should
// treat ErrClosed from quit as success.
func (c *Client) Execute(ctx context.Context, cmd string, args any, out any) error {
	ret, err := c.ExecuteRaw(ctx, cmd, args)
	if err != nil || out == nil {
		return err
	}
	if err := json.Unmarshal(ret, out); err != nil {
		return fmt.Errorf("qmp %s: decode reply: %w", cmd, err)
	}
	return nil
}

// ExecuteRaw is Execute returning the raw "return" value.
func (c *Client) ExecuteRaw(ctx context.Context, cmd string, args any) (out json.RawMessage, err error) {
	return c.execute(ctx, cmd, args, nil)
}

// ExecuteWithFiles is Execute with files passed along the command as
// SCM_RIGHTS ancillary data: QMP's add-fd and getfd take the descriptor
// sent with them. The caller keeps (and closes) its copies.
func (c *Client) ExecuteWithFiles(ctx context.Context, cmd string, args any, files []*os.File, out any) error {
	raw, err := c.execute(ctx, cmd, args, files)
	if err != nil {
		return err
	}
	if out != nil && len(raw) > 0 {
		if err := json.Unmarshal(raw, out); err != nil {
			return fmt.Errorf("qmp %s: decode return: %w", cmd, err)
		}
	}
	return nil
}

func (c *Client) execute(ctx context.Context, cmd string, args any, files []*os.File) (out json.RawMessage, err error) {
	if c.opts.observe != nil {
		start := time.Now()
		defer func() { c.opts.observe(cmd, time.Since(start), err) }()
	}
	req := request{Execute: cmd}
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return nil, fmt.Errorf("qmp %s: encode arguments: %w", cmd, err)
		}
		if string(b) != "null" {
			req.Arguments = b
		}
	}
	req.ID = c.nextID.Add(1)
	line, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: encode command: %w", cmd, err)
	}
	line = append(line, '\n')

	parent := ctx
	timeout := c.opts.timeoutFor(cmd)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	if ctx.Err() != nil { // do not send a command nobody will wait for
		return nil, c.timeoutErr(parent, ctx, cmd, timeout)
	}
	ch := make(chan reply, 1)
	c.mu.Lock()
	if c.closed {
		err := &closedError{cmd: cmd, cause: c.cause}
		c.mu.Unlock()
		return nil, err
	}
	c.pending[req.ID] = ch
	c.mu.Unlock()

	if err := c.write(ctx, line, files); err != nil {
		c.forget(req.ID)
		select {
		case <-c.done:
			return nil, c.closedErr(cmd)
		default:
		}
		if ctx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, c.timeoutErr(parent, ctx, cmd, timeout)
		}
		return nil, fmt.Errorf("qmp %s: write: %w", cmd, err)
	}

	select {
	case r := <-ch:
		return r.result(cmd)
	case <-ctx.Done():
		c.forget(req.ID)
		select {
		case r := <-ch: // the reply won the race against the deadline
			return r.result(cmd)
		default:
		}
		return nil, c.timeoutErr(parent, ctx, cmd, timeout)
	case <-c.done:
		select {
		case r := <-ch: // answered just before the connection went
			return r.result(cmd)
		default:
		}
		return nil, c.closedErr(cmd)
	}
}

// write sends one command line, holding the write slot; the write has the
// command's deadline. A write cut short leaves a broken command on the
// stream, so the connection is shut down.
func (c *Client) write(ctx context.Context, line []byte, files []*os.File) error {
	select {
	case c.wsem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return ErrClosed
	}
	defer func() { <-c.wsem }()
	dl, _ := ctx.Deadline() // always set: ExecuteRaw adds the command timeout
	if err := c.conn.SetWriteDeadline(dl); err != nil {
		return err
	}
	var n int
	var err error
	if len(files) > 0 {
		uc, ok := c.conn.(*net.UnixConn)
		if !ok {
			return errors.New("qmp: passing descriptors needs a unix socket")
		}
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		n, _, err = uc.WriteMsgUnix(line, unix.UnixRights(fds...), nil)
	} else {
		n, err = c.conn.Write(line)
	}
	if err != nil && n > 0 {
		c.shutdown(fmt.Errorf("partial write: %w", err))
	}
	return err
}

// forget removes the pending entry of a command that stopped waiting.
func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// timeoutErr tells whose deadline ended a command: the caller's (parent)
// or the command's own timeout. ctx is the command's context.
func (c *Client) timeoutErr(parent, ctx context.Context, cmd string, timeout time.Duration) error {
	if err := parent.Err(); err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	// An I/O deadline can pass before the parent's timer has fired.
	pdl, ok := parent.Deadline()
	if dl, _ := ctx.Deadline(); ok && !pdl.After(dl) {
		return fmt.Errorf("qmp %s: %w", cmd, context.DeadlineExceeded)
	}
	return fmt.Errorf("qmp %s: no reply within %s: %w", cmd, timeout, context.DeadlineExceeded)
}

func (c *Client) closedErr(cmd string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return &closedError{cmd: cmd, cause: c.cause}
}

// Done is closed when the connection is gone: EOF, a socket error, or Close.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err tells why the connection is gone: nil while it is open, ErrClosed
// after Close, else an error wrapping ErrClosed and the cause: io.EOF when
// QEMU closed the socket, syscall.ECONNRESET when it closed it with input
// unread (as QEMU 7.2 does after quit), another error when reading failed.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.errLocked()
}

func (c *Client) errLocked() error {
	switch {
	case !c.closed:
		return nil
	case c.cause == nil:
		return ErrClosed
	default:
		return &closedError{cause: c.cause}
	}
}

// Close closes the connection. Pending commands fail with ErrClosed and
// subscribers get EventDisconnected. It is idempotent and returns once the
// reader goroutine has stopped.
func (c *Client) Close() error {
	c.shutdown(nil)
	<-c.readerDone
	return nil
}

// Greeting is what QEMU announced when the connection opened.
func (c *Client) Greeting() Greeting { return c.greeting }

// Path is the socket path the client dialled.
func (c *Client) Path() string { return c.path }

// Greeting is QEMU's QMP greeting.
type Greeting struct {
	Version      Version
	Package      string   // distribution package version, e.g. "Debian 1:7.2+dfsg-7"
	Capabilities []string // capabilities QEMU offers, e.g. "oob" (none are enabled)
}

// Version is a QEMU version.
type Version struct {
	Major, Minor, Micro int
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro) }

// AtLeast reports whether v is major.minor or later.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || v.Major == major && v.Minor >= minor
}

type wireGreeting struct {
	Version struct {
		QEMU struct {
			Major int `json:"major"`
			Minor int `json:"minor"`
			Micro int `json:"micro"`
		} `json:"qemu"`
		Package string `json:"package"`
	} `json:"version"`
	Capabilities []string `json:"capabilities"`
}

func (w *wireGreeting) greeting() Greeting {
	q := w.Version.QEMU
	return Greeting{
		Version:      Version{Major: q.Major, Minor: q.Minor, Micro: q.Micro},
		Package:      w.Version.Package,
		Capabilities: w.Capabilities,
	}
}
