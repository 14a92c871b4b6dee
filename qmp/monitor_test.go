package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	goqmp "github.com/digitalocean/go-qemu/qmp"
	"github.com/digitalocean/go-qemu/qmp/raw"

	"github.com/otherix/otherix-agent/qmp/qmptest"
)

func TestMonitorAdapter(t *testing.T) {
	s := qmptest.NewServer(t, qmptest.WithVersion(7, 2, 5), qmptest.WithStatus("prelaunch"))
	c := dial(t, s)
	mon := raw.NewMonitor(c.Monitor())

	st, err := mon.QueryStatus()
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != raw.RunStatePrelaunch || st.Running {
		t.Errorf("QueryStatus = %+v, want prelaunch", st)
	}
	v, err := mon.QueryVersion()
	if err != nil {
		t.Fatal(err)
	}
	if v.Qemu.Major != 7 || v.Qemu.Minor != 2 || v.Qemu.Micro != 5 {
		t.Errorf("QueryVersion = %+v, want 7.2.5", v.Qemu)
	}

	// Arguments pass through; errors keep their class.
	args := make(chan string, 1)
	s.Handle("eject", func(a json.RawMessage) (any, error) {
		args <- string(a)
		return nil, &qmptest.QMPError{Class: "DeviceNotFound", Desc: "Device 'cd0' not found"}
	})
	force := true
	err = mon.Eject(nil, nil, &force)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "DeviceNotFound" || qe.Command != "eject" {
		t.Errorf("Eject err = %v, want DeviceNotFound from eject", err)
	}
	if got := <-args; got != `{"force":true}` {
		t.Errorf("eject arguments = %s", got)
	}
	if _, err := mon.QueryKVM(); !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Errorf("QueryKVM err = %v, want CommandNotFound", err)
	}
}

func TestMonitorEvents(t *testing.T) {
	s := qmptest.NewServer(t)
	m := NewMonitor(s.Path())
	var _ goqmp.Monitor = m
	if _, err := m.Run([]byte(`{"execute":"query-status"}`)); !errors.Is(err, ErrClosed) {
		t.Errorf("Run before Connect: %v, want ErrClosed", err)
	}
	if err := m.Connect(); err != nil {
		t.Fatal(err)
	}
	defer m.Disconnect()
	if err := m.Connect(); err != nil { // no-op when connected
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	events, err := m.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Events are subscribed by the time Events returns.
	s.Emit("STOP", nil)
	s.Emit("BLOCK_JOB_COMPLETED", map[string]any{"device": "job0", "len": 42})
	if ev := <-events; ev.Event != "STOP" || ev.Timestamp.Seconds == 0 {
		t.Errorf("first event = %+v, want STOP with a timestamp", ev)
	}
	if ev := <-events; ev.Event != "BLOCK_JOB_COMPLETED" || ev.Data["device"] != "job0" || ev.Data["len"] != 42.0 {
		t.Errorf("second event = %+v", ev)
	}
	cancel()
	for range events { // closed once ctx ends
	}

	out, err := m.Run([]byte(`{"execute":"query-status","arguments":{}}`))
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"return":{"running":true,"singlestep":false,"status":"running"}}`; string(out) != want {
		t.Errorf("Run = %s, want %s", out, want)
	}
	if _, err := m.Run([]byte(`{"arguments":{}}`)); err == nil {
		t.Error("Run without execute: want error")
	}

	// Events end when the connection goes.
	events, err = m.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	s.CloseConns()
	for range events {
	}

	// Reconnect after Disconnect.
	if err := m.Disconnect(); err != nil {
		t.Fatal(err)
	}
	if err := m.Connect(); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.NewMonitor(m).QueryStatus(); err != nil {
		t.Errorf("QueryStatus after reconnect: %v", err)
	}
}
