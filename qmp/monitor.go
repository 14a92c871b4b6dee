package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// Monitor adapts a Client to go-qemu's qmp.Monitor interface, so that
// go-qemu's typed API can be layered on our socket layer:
//
//	mon := raw.NewMonitor(client.Monitor())
//	st, err := mon.QueryStatus()
//
// Run has no context in that interface: each command is bounded by its
// timeout from the client's table (or the default timeout) instead of
// blocking forever. QMP errors come back as *Error.
type Monitor struct {
	mu   sync.Mutex
	c    *Client
	path string
	opts []Option
}

var _ goqmp.Monitor = (*Monitor)(nil)

// Monitor returns an adapter over this (connected) client. Disconnect
// closes the client; a later Connect dials the same socket again.
func (c *Client) Monitor() *Monitor {
	return &Monitor{c: c, path: c.path, opts: []Option{func(o *options) { *o = c.opts }}}
}

// NewMonitor returns an adapter that dials path (with opts) on Connect.
func NewMonitor(path string, opts ...Option) *Monitor {
	return &Monitor{path: path, opts: opts}
}

// Client returns the current client, nil when not connected.
func (m *Monitor) Client() *Client {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.c
}

func (m *Monitor) client() (*Client, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.c == nil {
		return nil, fmt.Errorf("qmp: monitor not connected: %w", ErrClosed)
	}
	return m.c, nil
}

// Connect dials the socket, bounded by the default timeout. It does
// nothing when the client is connected already.
func (m *Monitor) Connect() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.c != nil {
		select {
		case <-m.c.Done():
		default:
			return nil
		}
	}
	c, err := Dial(context.Background(), m.path, m.opts...)
	if err != nil {
		return err
	}
	m.c = c
	return nil
}

// Disconnect closes the client.
func (m *Monitor) Disconnect() error {
	m.mu.Lock()
	c := m.c
	m.c = nil
	m.mu.Unlock()
	if c == nil {
		return nil
	}
	return c.Close()
}

// Run executes a command given as go-qemu encodes it,
// {"execute": ..., "arguments": ...}, and returns the reply as QEMU sent
// it minus the id: {"return": ...}.
func (m *Monitor) Run(command []byte) ([]byte, error) {
	c, err := m.client()
	if err != nil {
		return nil, err
	}
	var cmd struct {
		Execute   string          `json:"execute"`
		Arguments json.RawMessage `json:"arguments"`
	}
	if err := json.Unmarshal(command, &cmd); err != nil {
		return nil, fmt.Errorf("qmp: decode command: %w", err)
	}
	if cmd.Execute == "" {
		return nil, errors.New("qmp: command lacks \"execute\"")
	}
	var args any
	if len(cmd.Arguments) > 0 {
		args = cmd.Arguments
	}
	ret, err := c.ExecuteRaw(context.Background(), cmd.Execute, args)
	if err != nil {
		return nil, err
	}
	return json.Marshal(struct {
		Return json.RawMessage `json:"return"`
	}{ret})
}

// Events streams events as go-qemu's Event until ctx ends or the
// connection goes; then the channel is closed. A consumer that falls
// behind loses events (see Client.Subscribe) rather than stalling the
// connection.
func (m *Monitor) Events(ctx context.Context) (<-chan goqmp.Event, error) {
	c, err := m.client()
	if err != nil {
		return nil, err
	}
	sub, cancel := c.Subscribe(64)
	out := make(chan goqmp.Event)
	go func() {
		defer close(out)
		defer cancel()
		for {
			var ev Event
			select {
			case <-ctx.Done():
				return
			case e, ok := <-sub:
				if !ok || e.Name == EventDisconnected {
					return
				}
				ev = e
			}
			ge := goqmp.Event{Event: ev.Name, Data: ev.Data}
			if !ev.Timestamp.IsZero() {
				ge.Timestamp.Seconds = ev.Timestamp.Unix()
				ge.Timestamp.Microseconds = int64(ev.Timestamp.Nanosecond() / 1000)
			}
			select {
			case out <- ge:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}
