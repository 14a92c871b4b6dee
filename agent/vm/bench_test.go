package vm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/qmp"
)

// Benchmarks of the engine beside a baseline measured in the same run:
//
//	go test -run '^$' -bench . -benchtime 20x ./agent/vm
//
// StartToQMPReady: the engine's Start (argv, files, exec, QMP handshake,
// query-status, state persisted) vs a bare qemu-system-x86_64 with the
// same argv and descriptors plus a QMP handshake.
// PauseResume: a pause+resume round trip through the engine vs the same two
// QMP commands on a bare QMP connection.

func BenchmarkStartToQMPReady(b *testing.B) {
	h := newBenchHarness(b)
	v := h.define("bench-start", "")
	ctx := context.Background()

	b.Run("bare-qemu", func(b *testing.B) {
		spec := v.Spec
		m, _ := h.e.lookup("bench-start")
		os.MkdirAll(m.run, 0o700)
		for i := 0; i < b.N; i++ {
			args, specs, err := BuildArgs(&spec, m.paths(), Platform{Accel: h.e.Accel()})
			if err != nil {
				b.Fatal(err)
			}
			files, _, err := m.openFiles(ctx, specs, spec.NICs)
			if err != nil {
				b.Fatal(err)
			}
			start := time.Now()
			cmd := exec.Command(h.e.Binary(ArchAMD64), args...)
			cmd.ExtraFiles = files
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: nobody}
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			for _, f := range files {
				f.Close()
			}
			c, err := qmp.Dial(ctx, m.paths().QMPSocket)
			if err != nil {
				b.Fatal(err)
			}
			var st struct{ Status string }
			c.Execute(ctx, "query-status", nil, &st)
			b.ReportMetric(float64(time.Since(start).Microseconds())/1000, "ms/start")
			b.StopTimer()
			c.Execute(ctx, "quit", nil, nil)
			c.Close()
			cmd.Wait()
			b.StartTimer()
		}
	})
	b.Run("engine", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			start := time.Now()
			if _, err := h.e.Start(ctx, "bench-start"); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(time.Since(start).Microseconds())/1000, "ms/start")
			b.StopTimer()
			if _, err := h.e.Poweroff(ctx, "bench-start"); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	})
}

func BenchmarkPauseResume(b *testing.B) {
	h := newBenchHarness(b)
	ctx := context.Background()
	h.define("bench-engine", "")
	raw := h.define("bench-raw", "")
	if _, err := h.e.Start(ctx, "bench-engine"); err != nil {
		b.Fatal(err)
	}
	// The baseline VM is started by the engine, then the engine lets go of
	// it so the benchmark owns its QMP socket.
	rv, err := h.e.Start(ctx, "bench-raw")
	if err != nil {
		b.Fatal(err)
	}
	m, _ := h.e.lookup("bench-raw")
	m.detach()
	b.Cleanup(func() { syscall.Kill(rv.PID, syscall.SIGKILL) })
	c, err := qmp.Dial(ctx, filepath.Join(h.run, ShortID(raw.Spec.UUID), "qmp.sock"))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()

	b.Run("raw-qmp", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			if err := c.Execute(ctx, "stop", nil, nil); err != nil {
				b.Fatal(err)
			}
			if err := c.Execute(ctx, "cont", nil, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("engine", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			if _, err := h.e.Pause(ctx, "bench-engine"); err != nil {
				b.Fatal(err)
			}
			if _, err := h.e.Resume(ctx, "bench-engine"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// newBenchHarness is newHarness for benchmarks.
func newBenchHarness(b *testing.B) *harness {
	b.Helper()
	run, err := os.MkdirTemp("/tmp", "oxb")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(run) })
	h := &harness{t: b, state: b.TempDir(), run: run, pool: b.TempDir(), changes: make(chan View, 256)}
	h.cfg = Config{StateDir: h.state, RunDir: h.run, Credential: nobody}
	h.open()
	return h
}
