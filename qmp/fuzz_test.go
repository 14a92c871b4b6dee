package qmp

import (
	"bufio"
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// FuzzStream feeds arbitrary bytes to the client from a fake QEMU on a
// real unix socket. The first byte picks where the bytes go:
//
//	0: after the handshake and after the client's first command (id 2)
//	1: instead of the greeting
//	2: instead of the reply to qmp_capabilities
//
// Whatever QEMU sends, the client must not panic, Dial and Execute must
// return, Done must close once the peer has closed the socket, every
// subscription must end with EventDisconnected, and a later command must
// fail with ErrClosed. Run it with e.g.
//
//	go test ./qmp -run '^$' -fuzz FuzzStream -fuzztime 60s
func FuzzStream(f *testing.F) {
	const greeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}` + "\r\n"
	for _, s := range []struct {
		mode byte
		data string
	}{
		{0, `{"return": {"status": "running", "singlestep": false, "running": true}, "id": 2}` + "\r\n"},
		{0, `{"timestamp": {"seconds": 1700000000, "microseconds": 12}, "event": "STOP"}` + "\r\n" + `{"return": {}, "id": 2}` + "\r\n"},
		{0, `{"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}, "id": 2}` + "\r\n"},
		{0, `{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}, "timestamp": {"seconds": -1, "microseconds": -1}}`},
		{0, `{"return": [], "id": "2"}{"return": 1, "id": 2.0}{"id": 18446744073709551615, "return": {}}`},
		{0, `{"event": "", "data": [1,2,3]}` + "\n" + `[1,2,3]` + "\n" + `"str"` + "\n" + `{"QMP": {}}`},
		{0, `{"return": {"status": "running"`},
		{0, "\x00\xff{]}"},
		{1, greeting + `{"return": {}, "id": 1}` + "\r\n"},
		{1, `{"QMP": {"version": {"qemu": {"major": "7"}}}}`},
		{1, `{"return": {}, "id": 1}`},
		{2, `{"event": "RESUME"}` + "\n" + `{"return": {}, "id": 9}` + "\n" + `{"return": {}, "id": 1}` + "\r\n"},
		{2, `{"error": {"class": "GenericError", "desc": "nope"}, "id": 1}`},
	} {
		f.Add(append([]byte{s.mode}, s.data...))
	}
	ln, err := net.Listen("unix", filepath.Join(f.TempDir(), "qmp.sock"))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { ln.Close() })
	path := ln.Addr().String()

	f.Fuzz(func(t *testing.T, data []byte) {
		mode := byte(0)
		if len(data) > 0 {
			mode, data = data[0]%3, data[1:]
		}
		peer := make(chan error, 1)
		go func() { peer <- fakeQEMU(ln, mode, greeting, data) }()

		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := Dial(ctx, path, WithDefaultTimeout(5*time.Second))
		if err != nil {
			if ctx.Err() != nil {
				t.Fatalf("Dial hung until its deadline: %v", err)
			}
			if err := <-peer; err != nil {
				t.Fatalf("fake qemu: %v", err)
			}
			return
		}
		defer c.Close()
		events, _ := c.Subscribe(4)

		var st struct {
			Status  string `json:"status"`
			Running bool   `json:"running"`
		}
		err = c.Execute(ctx, "query-status", nil, &st)
		if ctx.Err() != nil {
			t.Fatalf("Execute hung until its deadline: %v", err)
		}
		if err := <-peer; err != nil {
			t.Fatalf("fake qemu: %v", err)
		}
		select {
		case <-c.Done():
		case <-ctx.Done():
			t.Fatal("Done did not close after the peer closed the socket")
		}
		if c.Err() == nil || !errors.Is(c.Err(), ErrClosed) {
			t.Fatalf("Err after Done = %v, want ErrClosed", c.Err())
		}
		var last Event
		for ev := range events {
			last = ev
		}
		if last.Name != EventDisconnected {
			t.Fatalf("last event %q, want %s", last.Name, EventDisconnected)
		}
		if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrClosed) {
			t.Fatalf("Execute after the peer closed: %v, want ErrClosed", err)
		}
	})
}

// fakeQEMU accepts one connection and plays QEMU for mode (see
// FuzzStream), sending data where the mode says, then closes the socket.
// Reads have a deadline so that a client that sends nothing cannot hang it.
func fakeQEMU(ln net.Listener, mode byte, greeting string, data []byte) error {
	conn, err := ln.Accept()
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(conn)
	send := func(s []byte) bool {
		_, err := conn.Write(s)
		return err == nil
	}
	if mode == 1 {
		send(data)
		return nil
	}
	if !send([]byte(greeting)) {
		return nil
	}
	if _, err := r.ReadBytes('\n'); err != nil { // qmp_capabilities
		return nil
	}
	if mode == 2 {
		send(data)
		return nil
	}
	if !send([]byte(`{"return": {}, "id": 1}` + "\r\n")) {
		return nil
	}
	if _, err := r.ReadBytes('\n'); err != nil { // query-status, id 2
		return nil
	}
	send(data)
	return nil
}
