package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/otherix/otherix-agent/qmp/qmptest"
)

// dial connects to s and closes the client when the test ends.
func dial(t *testing.T, s *qmptest.Server, opts ...Option) *Client {
	t.Helper()
	c, err := Dial(context.Background(), s.Path(), opts...)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func pendingCount(c *Client) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending)
}

func TestDialHandshake(t *testing.T) {
	s := qmptest.NewServer(t, qmptest.WithVersion(8, 1, 3), qmptest.WithCapabilities("oob"))
	c := dial(t, s)

	g := c.Greeting()
	if got, want := g.Version, (Version{8, 1, 3}); got != want {
		t.Errorf("greeting version = %v, want %v", got, want)
	}
	if got := strings.Join(g.Capabilities, ","); got != "oob" {
		t.Errorf("capabilities = %q, want oob", got)
	}
	if !g.Version.AtLeast(8, 1) || g.Version.AtLeast(8, 2) || !g.Version.AtLeast(7, 9) {
		t.Errorf("AtLeast wrong for %v", g.Version)
	}
	if got := strings.Join(s.Commands(), ","); got != "qmp_capabilities" {
		t.Errorf("server saw %q, want qmp_capabilities", got)
	}
	var st struct{ Status string }
	if err := c.Execute(context.Background(), "query-status", nil, &st); err != nil {
		t.Fatal(err)
	}
	if st.Status != "running" {
		t.Errorf("status = %q, want running", st.Status)
	}
}

func TestArguments(t *testing.T) {
	s := qmptest.NewServer(t)
	seen := make(chan string, 1)
	s.Handle("echo", func(args json.RawMessage) (any, error) {
		seen <- string(args)
		return json.RawMessage(args), nil
	})
	c := dial(t, s)
	ctx := context.Background()

	tests := []struct {
		name string
		args any
		want string // arguments as the server saw them
	}{
		{"nil", nil, ""},
		{"typed nil", (*struct{})(nil), ""},
		{"map", map[string]any{"device": "cd0", "force": true}, `{"device":"cd0","force":true}`},
		{"struct", struct {
			ID int `json:"id"`
		}{7}, `{"id":7}`},
		{"raw", json.RawMessage(`{"a":[1,2]}`), `{"a":[1,2]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ret, err := c.ExecuteRaw(ctx, "echo", tt.args)
			if err != nil {
				t.Fatal(err)
			}
			if got := <-seen; got != tt.want {
				t.Errorf("server got arguments %q, want %q", got, tt.want)
			}
			if tt.want != "" && string(ret) != tt.want {
				t.Errorf("return = %s, want %s", ret, tt.want)
			}
		})
	}
	if err := c.Execute(ctx, "echo", make(chan int), nil); err == nil {
		t.Error("unencodable arguments: want error")
	}
}

// TestRepliesMatchedByID has the server answer three concurrent commands
// in the reverse-ish order 2, 0, 1 with events before and between the
// replies: every caller must get its own reply, and subscribers every
// event in order.
func TestRepliesMatchedByID(t *testing.T) {
	s := qmptest.NewServer(t, qmptest.WithConcurrentCommands())
	const n = 3
	received := make(chan int, n)
	release := make([]chan struct{}, n)
	for i := range release {
		release[i] = make(chan struct{})
	}
	t.Cleanup(func() {
		for _, r := range release {
			select {
			case <-r:
			default:
				close(r)
			}
		}
	})
	s.Handle("echo", func(args json.RawMessage) (any, error) {
		var a struct{ N int }
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		received <- a.N
		<-release[a.N]
		return map[string]int{"n": a.N}, nil
	})
	s.EmitBefore("echo", "ECHOING", nil)

	c := dial(t, s)
	events, cancel := c.Subscribe(32)
	defer cancel()
	s.Emit("EARLY", map[string]any{"x": 1})

	type result struct {
		n   int
		err error
	}
	results := make([]chan result, n)
	for i := range n {
		results[i] = make(chan result, 1)
		go func() {
			var out struct{ N int }
			err := c.Execute(context.Background(), "echo", map[string]int{"n": i}, &out)
			results[i] <- result{out.N, err}
		}()
	}
	for range n {
		<-received
	}
	if got := pendingCount(c); got != n {
		t.Errorf("pending = %d, want %d", got, n)
	}

	wantEvents := []string{"EARLY"}
	for _, i := range []int{2, 0, 1} {
		s.Emit("BETWEEN", map[string]int{"n": i})
		close(release[i])
		r := <-results[i]
		if r.err != nil {
			t.Fatalf("echo %d: %v", i, r.err)
		}
		if r.n != i {
			t.Errorf("echo %d got the reply for %d", i, r.n)
		}
		wantEvents = append(wantEvents, fmt.Sprintf("BETWEEN/%d", i), "ECHOING")
	}
	if got := pendingCount(c); got != 0 {
		t.Errorf("pending after replies = %d, want 0", got)
	}

	var got []string
	for range wantEvents {
		ev := <-events
		name := ev.Name
		if v, ok := ev.Data["n"]; ok {
			name = fmt.Sprintf("%s/%v", name, v)
		}
		if ev.Timestamp.IsZero() || len(ev.Raw) == 0 {
			t.Errorf("event %s lacks timestamp or raw", ev.Name)
		}
		got = append(got, name)
	}
	if strings.Join(got, " ") != strings.Join(wantEvents, " ") {
		t.Errorf("events = %v\nwant %v", got, wantEvents)
	}
}

func TestConcurrentExecute(t *testing.T) {
	s := qmptest.NewServer(t)
	s.EmitBefore("query-status", "NOISE", nil)
	c := dial(t, s)
	_, cancel := c.Subscribe(1) // a subscriber that never reads
	defer cancel()

	const workers, each = 8, 25
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range each {
				var st struct{ Status string }
				if err := c.Execute(context.Background(), "query-status", nil, &st); err != nil {
					errs <- err
					return
				}
				if st.Status != "running" {
					errs <- fmt.Errorf("status %q", st.Status)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := len(s.Commands()); got != 1+workers*each {
		t.Errorf("server saw %d commands, want %d", got, 1+workers*each)
	}
}

func TestTimeouts(t *testing.T) {
	s := qmptest.NewServer(t)
	s.Hang("hang")
	c := dial(t, s, WithCommandTimeouts(map[string]time.Duration{"hang": 50 * time.Millisecond}))

	deadline := func(d time.Duration) func() (context.Context, context.CancelFunc) {
		return func() (context.Context, context.CancelFunc) { return context.WithTimeout(context.Background(), d) }
	}
	cancelled := func() (context.Context, context.CancelFunc) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		return ctx, cancel
	}
	tests := []struct {
		name    string
		ctx     func() (context.Context, context.CancelFunc)
		cmd     string
		want    error
		message string
	}{
		{"per-command timeout", deadline(time.Hour), "hang", context.DeadlineExceeded, "qmp hang: no reply within 50ms"},
		{"ctx deadline", deadline(50 * time.Millisecond), "hang-too", context.DeadlineExceeded, "qmp hang-too: context deadline exceeded"},
		{"ctx deadline passed", deadline(-time.Second), "hang-too", context.DeadlineExceeded, "qmp hang-too: context deadline exceeded"},
		{"ctx cancelled", cancelled, "hang-too", context.Canceled, "qmp hang-too: context canceled"},
	}
	s.Hang("hang-too") // falls back to the 10s default: ctx ends first
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := tt.ctx()
			defer cancel()
			err := c.Execute(ctx, tt.cmd, nil, nil)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if errors.Is(err, ErrClosed) {
				t.Errorf("timeout must not look like a lost connection: %v", err)
			}
			if !strings.Contains(err.Error(), tt.message) {
				t.Errorf("err = %q, want it to contain %q", err, tt.message)
			}
			if got := pendingCount(c); got != 0 {
				t.Errorf("pending = %d after timeout, want 0", got)
			}
			// The client stays usable.
			if err := c.Execute(context.Background(), "query-status", nil, nil); err != nil {
				t.Errorf("query-status after timeout: %v", err)
			}
		})
	}
	if c.Err() != nil {
		t.Errorf("Err() = %v, want nil", c.Err())
	}
}

// TestLateReplyDropped answers a command after its caller gave up: the
// reply must be logged and dropped, and the next command must get its own.
func TestLateReplyDropped(t *testing.T) {
	s := qmptest.NewServer(t)
	release := make(chan struct{})
	s.Handle("slow", func(json.RawMessage) (any, error) {
		<-release
		return "late", nil
	})
	s.Handle("fast", func(json.RawMessage) (any, error) { return "fast", nil })
	core, logs := observer.New(zap.DebugLevel)
	c := dial(t, s, WithLogger(zap.New(core)))

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := c.Execute(ctx, "slow", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow: err = %v, want deadline exceeded", err)
	}
	close(release)
	// The server answers in order: "late" is on the wire before "fast".
	var got string
	if err := c.Execute(context.Background(), "fast", nil, &got); err != nil {
		t.Fatal(err)
	}
	if got != "fast" {
		t.Errorf("fast got %q", got)
	}
	if n := logs.FilterMessage("qmp: dropping reply nobody waits for").Len(); n != 1 {
		t.Errorf("logged %d dropped replies, want 1 (logs: %v)", n, logs.All())
	}
}

func TestLargeMessages(t *testing.T) {
	s := qmptest.NewServer(t)
	big := strings.Repeat("0123456789abcdef", 1<<16) // 1 MiB
	s.Handle("big", func(json.RawMessage) (any, error) { return map[string]string{"blob": big}, nil })
	c := dial(t, s)
	events, cancel := c.Subscribe(4)
	defer cancel()

	var out struct{ Blob string }
	if err := c.Execute(context.Background(), "big", nil, &out); err != nil {
		t.Fatal(err)
	}
	if len(out.Blob) != 1<<20 || out.Blob != big {
		t.Errorf("reply blob: %d bytes, want %d", len(out.Blob), 1<<20)
	}

	s.Emit("BIG_EVENT", map[string]string{"blob": big})
	ev, err := WaitEvent(context.Background(), events, "BIG_EVENT")
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := ev.Data["blob"].(string); got != big {
		t.Errorf("event blob: %d bytes, want %d", len(got), len(big))
	}
	// The stream is still in step after the large messages.
	if err := c.Execute(context.Background(), "query-status", nil, nil); err != nil {
		t.Fatal(err)
	}
}

func TestErrorClass(t *testing.T) {
	s := qmptest.NewServer(t)
	s.Handle("fails", func(json.RawMessage) (any, error) {
		return nil, &qmptest.QMPError{Class: "DeviceNotFound", Desc: "Device 'cd9' not found"}
	})
	s.Handle("plain", func(json.RawMessage) (any, error) { return nil, errors.New("boom") })
	c := dial(t, s)

	tests := []struct {
		cmd, class, desc string
	}{
		{"fails", "DeviceNotFound", "Device 'cd9' not found"},
		{"plain", "GenericError", "boom"},
		{"no-such-command", "CommandNotFound", "The command no-such-command has not been found"},
		{"qmp_capabilities", "CommandNotFound", "Capabilities negotiation is already complete, command ignored"},
	}
	for _, tt := range tests {
		t.Run(tt.cmd, func(t *testing.T) {
			err := c.Execute(context.Background(), tt.cmd, nil, nil)
			var qe *Error
			if !errors.As(err, &qe) {
				t.Fatalf("err = %v (%T), want *qmp.Error", err, err)
			}
			want := Error{Class: tt.class, Desc: tt.desc, Command: tt.cmd}
			if *qe != want {
				t.Errorf("got %+v, want %+v", *qe, want)
			}
			if got, want := err.Error(), fmt.Sprintf("qmp %s: %s: %s", tt.cmd, tt.class, tt.desc); got != want {
				t.Errorf("Error() = %q, want %q", got, want)
			}
		})
	}
}

// TestSlowSubscriber: a subscriber that never reads must not hold up the
// reader; its overflow is counted.
func TestSlowSubscriber(t *testing.T) {
	s := qmptest.NewServer(t)
	c := dial(t, s)
	slow, cancelSlow := c.Subscribe(1)
	defer cancelSlow()
	fast, cancelFast := c.Subscribe(200)
	defer cancelFast()

	const n = 100
	for i := range n {
		s.Emit("TICK", map[string]int{"i": i})
	}
	// Replies flow although the slow subscriber reads nothing. The reply
	// follows the events on the wire, so they have all been dispatched.
	for range 3 {
		if err := c.Execute(context.Background(), "query-status", nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := c.Dropped(), uint64(n-1); got != want {
		t.Errorf("Dropped() = %d, want %d", got, want)
	}
	if got := len(fast); got != n {
		t.Errorf("fast subscriber has %d events, want %d", got, n)
	}

	c.Close()
	// The slow subscriber still gets its one event, then the disconnect.
	var got []string
	for ev := range slow {
		got = append(got, ev.Name)
	}
	if want := "TICK " + EventDisconnected; strings.Join(got, " ") != want {
		t.Errorf("slow subscriber got %v, want %s", got, want)
	}
}

func TestEOF(t *testing.T) {
	s := qmptest.NewServer(t)
	received := make(chan struct{})
	s.Handle("hang", func(json.RawMessage) (any, error) {
		close(received)
		return nil, qmptest.ErrNoReply
	})
	c := dial(t, s)
	events, cancel := c.Subscribe(8)
	defer cancel()

	errc := make(chan error, 1)
	go func() { errc <- c.Execute(context.Background(), "hang", nil, nil) }()
	<-received
	s.CloseConns()

	err := <-errc
	if !errors.Is(err, ErrClosed) || !errors.Is(err, io.EOF) {
		t.Errorf("pending command: err = %v, want ErrClosed and io.EOF", err)
	}
	<-c.Done()
	if err := c.Err(); !errors.Is(err, io.EOF) || !errors.Is(err, ErrClosed) {
		t.Errorf("Err() = %v, want io.EOF and ErrClosed", err)
	}

	ev, err := WaitEvent(context.Background(), events, "SHUTDOWN")
	if ev.Name != EventDisconnected || !errors.Is(err, ErrClosed) || !errors.Is(err, io.EOF) {
		t.Errorf("WaitEvent = %q, %v; want %s, ErrClosed/EOF", ev.Name, err, EventDisconnected)
	}
	if _, ok := <-events; ok {
		t.Error("subscription channel not closed after EventDisconnected")
	}

	// Everything after the loss fails fast.
	if err := c.Execute(context.Background(), "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Execute after EOF: %v, want ErrClosed", err)
	}
	late, _ := c.Subscribe(1)
	if ev := <-late; ev.Name != EventDisconnected {
		t.Errorf("late subscriber got %q, want %s", ev.Name, EventDisconnected)
	}
	if _, ok := <-late; ok {
		t.Error("late subscription not closed")
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close after EOF: %v", err)
	}
	if err := c.Err(); !errors.Is(err, io.EOF) {
		t.Errorf("Close changed Err() to %v", err)
	}
}

func TestClose(t *testing.T) {
	s := qmptest.NewServer(t)
	received := make(chan struct{})
	s.Handle("hang", func(json.RawMessage) (any, error) {
		close(received)
		return nil, qmptest.ErrNoReply
	})
	c := dial(t, s)
	events, _ := c.Subscribe(1)

	errc := make(chan error, 1)
	go func() { errc <- c.Execute(context.Background(), "hang", nil, nil) }()
	<-received
	for range 2 { // idempotent
		if err := c.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Errorf("pending command: %v, want ErrClosed", err)
	}
	if err := c.Err(); err != ErrClosed {
		t.Errorf("Err() = %v, want ErrClosed", err)
	}
	if ev := <-events; ev.Name != EventDisconnected {
		t.Errorf("subscriber got %q, want %s", ev.Name, EventDisconnected)
	}
	if err := c.Execute(context.Background(), "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Execute after Close: %v, want ErrClosed", err)
	}
}

func TestSubscribeCancel(t *testing.T) {
	s := qmptest.NewServer(t)
	c := dial(t, s)
	events, cancel := c.Subscribe(4)
	cancel()
	cancel() // idempotent
	if _, ok := <-events; ok {
		t.Error("channel open after cancel")
	}
	s.Emit("AFTER_CANCEL", nil)
	if err := c.Execute(context.Background(), "query-status", nil, nil); err != nil {
		t.Fatal(err)
	}
	if c.Dropped() != 0 {
		t.Errorf("Dropped() = %d: cancelled subscriber still counted", c.Dropped())
	}
}

func TestWaitEvent(t *testing.T) {
	s := qmptest.NewServer(t)
	c := dial(t, s)
	events, cancel := c.Subscribe(8)
	defer cancel()

	s.Emit("A", nil)
	s.Emit("B", map[string]any{"k": "v"})
	ev, err := WaitEvent(context.Background(), events, "B", "C")
	if err != nil || ev.Name != "B" || ev.Data["k"] != "v" {
		t.Fatalf("WaitEvent = %+v, %v; want B", ev, err)
	}
	s.Emit("D", nil)
	if ev, err := WaitEvent(context.Background(), events); err != nil || ev.Name != "D" {
		t.Fatalf("WaitEvent(any) = %q, %v; want D", ev.Name, err)
	}

	ctx, cancelCtx := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancelCtx()
	if _, err := WaitEvent(ctx, events, "NEVER"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitEvent with expired ctx: %v", err)
	}

	c.Close()
	if ev, err := WaitEvent(context.Background(), events, EventDisconnected); err != nil || ev.Name != EventDisconnected {
		t.Errorf("waiting for the disconnect itself: %q, %v", ev.Name, err)
	}
	if _, err := WaitEvent(context.Background(), events, "X"); !errors.Is(err, ErrClosed) {
		t.Errorf("WaitEvent on closed channel: %v, want ErrClosed", err)
	}
}

func TestDialTimeout(t *testing.T) {
	s := qmptest.NewServer(t, qmptest.WithoutGreeting())

	t.Run("ctx deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		c, err := Dial(ctx, s.Path())
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Dial = %v, %v; want deadline exceeded", c, err)
		}
	})
	t.Run("default timeout", func(t *testing.T) {
		_, err := Dial(context.Background(), s.Path(), WithDefaultTimeout(100*time.Millisecond))
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Dial = %v; want deadline exceeded", err)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		timer := time.AfterFunc(50*time.Millisecond, cancel)
		defer timer.Stop()
		_, err := Dial(ctx, s.Path())
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Dial = %v; want context canceled", err)
		}
	})
	t.Run("no socket", func(t *testing.T) {
		_, err := Dial(context.Background(), s.Path()+".missing")
		if err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Dial = %v; want a connect error", err)
		}
	})
}
