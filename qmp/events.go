package qmp

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// EventDisconnected is the name of the synthetic event every subscriber
// receives, as its last, when the connection is gone. For a QEMU process
// an unexpected EOF on its QMP socket means it died.
const EventDisconnected = "OTHERIX_DISCONNECTED"

// Event is a QMP event. Data is shared by all subscribers: treat it as
// read-only. For EventDisconnected, Data["error"] holds the error value
// (wrapping ErrClosed and the cause, as Client.Err returns it) and Raw is
// nil.
type Event struct {
	Name      string
	Data      map[string]any
	Timestamp time.Time
	Raw       json.RawMessage // the whole message as QEMU sent it
}

type subscription struct {
	ch chan Event
	n  int // events the channel may hold; one more slot is kept for EventDisconnected
}

// Subscribe returns a channel that receives every event from now on, with
// room for n events (at least 1), and a func that ends the subscription and
// closes the channel. The reader never waits for a subscriber: an event
// that finds the buffer full is dropped for that subscriber and counted in
// Dropped. When the connection goes, the channel receives EventDisconnected
// and is closed (at once when it is gone already).
//
// Subscribe before sending a command whose completion is an event.
func (c *Client) Subscribe(n int) (<-chan Event, func()) {
	if n < 1 {
		n = 1
	}
	s := &subscription{ch: make(chan Event, n+1), n: n}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		s.ch <- disconnected(c.errLocked())
		close(s.ch)
		return s.ch, func() {}
	}
	c.subs[s] = struct{}{}
	var once sync.Once
	return s.ch, func() {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			if _, ok := c.subs[s]; ok {
				delete(c.subs, s)
				close(s.ch)
			}
		})
	}
}

// Dropped is the number of events dropped so far because a subscriber's
// buffer was full, over all subscribers.
func (c *Client) Dropped() uint64 { return c.dropped.Load() }

// dispatch offers an event to every subscriber without blocking.
func (c *Client) dispatch(m *message, raw json.RawMessage) {
	ev := Event{Name: m.Event, Raw: raw}
	if len(m.Data) > 0 {
		if err := json.Unmarshal(m.Data, &ev.Data); err != nil {
			c.log.Warn("qmp: event data is not an object", zap.String("event", m.Event), zap.Error(err))
		}
	}
	if ts := m.Timestamp; ts != nil {
		ev.Timestamp = time.Unix(ts.Seconds, ts.Microseconds*int64(time.Microsecond))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for s := range c.subs {
		// Only the reader sends (under mu), so the length can only
		// shrink between the check and the send.
		if len(s.ch) < s.n {
			s.ch <- ev
			continue
		}
		c.dropped.Add(1)
		c.log.Debug("qmp: subscriber full, event dropped", zap.String("event", ev.Name))
	}
}

func disconnected(cause error) Event {
	return Event{
		Name:      EventDisconnected,
		Data:      map[string]any{"error": cause},
		Timestamp: time.Now(),
	}
}

// WaitEvent reads ch (from Subscribe) until an event named one of names
// arrives (any event when names is empty) and returns it. It fails with an
// error wrapping ErrClosed when the connection goes first (returning the
// EventDisconnected event, unless names asks for it) and with ctx's error
// when ctx ends first.
func WaitEvent(ctx context.Context, ch <-chan Event, names ...string) (Event, error) {
	for {
		select {
		case <-ctx.Done():
			return Event{}, fmt.Errorf("qmp: waiting for event %s: %w", strings.Join(names, "|"), ctx.Err())
		case ev, ok := <-ch:
			if !ok {
				return Event{}, fmt.Errorf("qmp: waiting for event %s: subscription ended: %w", strings.Join(names, "|"), ErrClosed)
			}
			if len(names) == 0 || slices.Contains(names, ev.Name) {
				return ev, nil
			}
			if ev.Name == EventDisconnected {
				err, _ := ev.Data["error"].(error)
				if err == nil {
					err = ErrClosed
				}
				return ev, fmt.Errorf("qmp: waiting for event %s: %w", strings.Join(names, "|"), err)
			}
		}
	}
}
