package agent

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/internal/leakcheck"
)

// BenchmarkUsageCost prints what collecting usage costs the agent: the
// same Host with 100 paused VMs of the real guest (real QEMU, real QMP,
// /proc), measured for a window with collection off, then for an equal
// window sampling every $OTHERIX_BENCH_USAGE_INTERVAL (default 1s, ten
// times the default rate, so that a short window holds many passes), in
// one run. The agent's CPU is the process's user+system time (its QEMUs
// are other processes); its memory the Go heap in use and the process's
// RSS at each window's end.
//
//	go test -run '^$' -bench UsageCost -benchtime 1x ./agent/
func BenchmarkUsageCost(b *testing.B) {
	nVMs := envInt(b, "OTHERIX_BENCH_VMS", 100)
	window := envDuration(b, "OTHERIX_BENCH_WINDOW", 30*time.Second)
	interval := envDuration(b, "OTHERIX_BENCH_USAGE_INTERVAL", time.Second)

	run, err := os.MkdirTemp("/tmp", "oxb")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(run)
	cfg := config.Default(b.TempDir())
	cfg.NodeName = "bench-1"
	cfg.RunDir = run
	cfg.QEMU.User = "nobody"
	cfg.Limits.MinFreeBytes = 1 << 20
	cfg.Limits.ConcurrentCreates = 4
	cfg.Usage.Interval = interval
	srv := httptest.NewServer(http.FileServer(http.Dir(testguest.Dir(b))))
	defer srv.Close()
	h, err := NewHost(context.Background(), cfg, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		var pids []int
		for _, v := range h.Engine().List() {
			if v.PID > 0 {
				pids = append(pids, v.PID)
			}
		}
		if err := leakcheck.Kill(pids...); err != nil {
			b.Error(err)
		}
		h.Close()
	}()

	// 100 VMs, each paused as soon as QEMU answers.
	ctx := context.Background()
	start := time.Now()
	errs := make(chan error, nVMs)
	sem := make(chan struct{}, 4)
	for i := range nVMs {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			name := fmt.Sprintf("bench-%03d", i)
			if _, err := h.Create(ctx, uuid.NewString(), api.CreateVM{Name: name, ImageURL: srv.URL + "/guest.qcow2", Arch: "amd64",
				VCPUs: 1, MemoryMB: 128, NoCloudInit: true}, nil, nil); err != nil {
				errs <- fmt.Errorf("create %s: %w", name, err)
				return
			}
			if _, err := h.Engine().Pause(ctx, name); err != nil {
				errs <- fmt.Errorf("pause %s: %w", name, err)
				return
			}
			errs <- nil
		}()
	}
	for range nVMs {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
	b.Logf("%d VMs created and paused in %v", nVMs, time.Since(start).Round(time.Second))

	measure := func(collect bool) cost {
		runtime.GC()
		cctx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		before := rusage(b)
		t0 := time.Now()
		if collect {
			wg.Add(1)
			go func() { defer wg.Done(); h.Usage().Run(cctx) }()
		}
		time.Sleep(window)
		cancel()
		wg.Wait()
		c := cost{wall: time.Since(t0), cpu: rusage(b) - before}
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		c.heap, c.rss = ms.HeapInuse, selfRSS(b)
		return c
	}
	b.ResetTimer()
	off := measure(false)
	on := measure(true)
	b.StopTimer()
	if n := len(h.Usage().All()); n != nVMs {
		b.Fatalf("%d VMs sampled, want %d", n, nVMs)
	}
	passes := float64(on.wall / interval)
	extra := on.cpu - off.cpu
	perPass := extra / time.Duration(passes)
	atDefault := float64(perPass) / float64(config.Default("").Usage.Interval) * 100
	b.Logf("agent with %d paused VMs, %v windows, sampling every %v:", nVMs, window, interval)
	b.Logf("  collection off: cpu %v (%.2f%% of one CPU), heap %d MiB, rss %d MiB", off.cpu.Round(time.Millisecond), off.percent(), off.heap>>20, off.rss>>20)
	b.Logf("  collection on:  cpu %v (%.2f%% of one CPU), heap %d MiB, rss %d MiB", on.cpu.Round(time.Millisecond), on.percent(), on.heap>>20, on.rss>>20)
	b.Logf("  cost: %v of CPU per pass over %d VMs (%v per VM); at the default %v interval %.2f%% of one CPU",
		perPass.Round(time.Microsecond), nVMs, (perPass / time.Duration(nVMs)).Round(time.Microsecond), config.Default("").Usage.Interval, atDefault)
	b.ReportMetric(float64(perPass.Microseconds())/1000, "ms-cpu/pass")
	b.ReportMetric(atDefault, "%cpu@10s")
	b.ReportMetric(off.percent(), "%cpu-off")
	b.ReportMetric(on.percent(), "%cpu-on")
	b.ReportMetric(float64(int64(on.rss)-int64(off.rss))/(1<<20), "MiB-rss-delta")
}

type cost struct {
	wall, cpu time.Duration
	heap, rss uint64
}

func (c cost) percent() float64 { return float64(c.cpu) / float64(c.wall) * 100 }

// rusage is the process's CPU time so far (user + system).
func rusage(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// selfRSS is the process's resident set (VmRSS).
func selfRSS(b *testing.B) uint64 {
	s, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(s), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func envInt(b *testing.B, key string, def int) int {
	if s := os.Getenv(key); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			b.Fatalf("%s=%q", key, s)
		}
		return n
	}
	return def
}

func envDuration(b *testing.B, key string, def time.Duration) time.Duration {
	if s := os.Getenv(key); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			b.Fatalf("%s=%q", key, s)
		}
		return d
	}
	return def
}
