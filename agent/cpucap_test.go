package agent

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/leakcheck"
)

// cpuCapPlacer does with the CPU controller what systemd does with a
// scope's CPUQuota=: it moves each VM's QEMU into a cgroup of its own
// (under cgroup v1's cpu hierarchy, or v2) with the quota ScopeLimits
// gives the VM's cpu_limit. Its weight is set high (1000 where a vCPU is
// 100) so that on this shared, loaded test host the cap, not the
// neighbours, is what holds the VM back.
type cpuCapPlacer struct {
	root string // the cpu hierarchy's cgroup the test makes
	v2   bool

	mu  sync.Mutex
	dir map[string]string
}

// newCPUCapPlacer makes a cgroup for the test's VMs in the cpu hierarchy.
func newCPUCapPlacer(t *testing.T) *cpuCapPlacer {
	t.Helper()
	p := &cpuCapPlacer{dir: map[string]string{}}
	name := fmt.Sprintf("otherix-cpucap-%d", os.Getpid())
	switch {
	case fileExists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") || fileExists("/sys/fs/cgroup/cpu/cgroup.procs"):
		p.root = filepath.Join("/sys/fs/cgroup/cpu", name)
	case fileExists("/sys/fs/cgroup/cgroup.subtree_control"):
		p.root, p.v2 = filepath.Join("/sys/fs/cgroup", name), true
	default:
		t.Fatal("this test needs the cgroup cpu controller")
	}
	if err := os.Mkdir(p.root, 0o755); err != nil {
		t.Fatalf("create a cpu cgroup (needs root): %v", err)
	}
	if p.v2 {
		os.WriteFile(filepath.Join(p.root, "cgroup.subtree_control"), []byte("+cpu"), 0o644)
	}
	t.Cleanup(func() { os.Remove(p.root) })
	return p
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func (p *cpuCapPlacer) Place(ctx context.Context, v vm.View) error {
	dir := filepath.Join(p.root, vm.ShortID(v.Spec.UUID))
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		return err
	}
	u := ScopeLimits(v.Spec, config.Default("").Limits)
	const period = 100000 // µs
	files := map[string]string{"cpu.shares": "10240"}
	if u.CPUQuotaPercent > 0 {
		files["cpu.cfs_period_us"] = strconv.Itoa(period)
		files["cpu.cfs_quota_us"] = strconv.FormatUint(u.CPUQuotaPercent*period/100, 10)
	}
	if p.v2 {
		files = map[string]string{"cpu.weight": "1000"}
		if u.CPUQuotaPercent > 0 {
			files["cpu.max"] = fmt.Sprintf("%d %d", u.CPUQuotaPercent*period/100, period)
		}
	}
	for _, f := range []string{"cpu.shares", "cpu.weight", "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.max"} {
		if val, ok := files[f]; ok {
			if err := os.WriteFile(filepath.Join(dir, f), []byte(val), 0o644); err != nil {
				return fmt.Errorf("%s: %w", f, err)
			}
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(v.PID)), 0o644); err != nil {
		return err
	}
	p.mu.Lock()
	p.dir[v.Spec.Name] = dir
	p.mu.Unlock()
	return nil
}

func (p *cpuCapPlacer) Remove(ctx context.Context, v vm.View) error {
	p.mu.Lock()
	dir := p.dir[v.Spec.Name]
	delete(p.dir, v.Spec.Name)
	p.mu.Unlock()
	if dir != "" {
		return os.Remove(dir)
	}
	return nil
}

func (p *cpuCapPlacer) Kind() string { return "test-cpu-cgroup" }

// TestCPUCapMeasured: a guest spinning its one vCPU under cpu_limit 0.2
// uses 0.2 CPU, and the usage the agent measures (cpu_seconds over a
// 20 s window) is within 10% of that cap; its cpu_percent agrees.
func TestCPUCapMeasured(t *testing.T) {
	t.Parallel()
	const limit = 0.2
	placer := newCPUCapPlacer(t)
	run, err := os.MkdirTemp("/tmp", "oxc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	cfg := config.Default(t.TempDir())
	cfg.NodeName, cfg.RunDir, cfg.QEMU.User = "node-1", run, "nobody"
	cfg.Limits.MinFreeBytes = 1 << 20
	srv := httptest.NewServer(http.FileServer(http.Dir(testguest.Dir(t))))
	t.Cleanup(srv.Close)
	h, err := NewHost(context.Background(), cfg, Options{Logger: zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)), Placer: placer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		var pids []int
		for _, v := range h.Engine().List() {
			if v.PID > 0 {
				pids = append(pids, v.PID)
			}
		}
		if err := leakcheck.Kill(pids...); err != nil {
			t.Error(err)
		}
		h.Close()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	ud := "#cloud-config\n#otherix-run: echo OTHERIX-TEST spinning; timeout 120 sh -c 'while :; do :; done'\n"
	id := uuid.NewString()
	if _, err := h.Create(ctx, id, api.CreateVM{Name: "capped", ImageURL: srv.URL + "/guest.qcow2", Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		CPULimit: limit, UserData: ud}, nil, nil); err != nil {
		t.Fatal(err)
	}
	v, _ := h.Engine().Get("capped")
	con := testguest.OpenConsole(v.ConsolePath)
	defer con.Close()
	wait(t, con, "OTHERIX-TEST spinning")
	col := h.Usage()
	col.Collect(ctx)
	a, _ := col.Get(id)
	const window = 20 * time.Second
	select {
	case <-time.After(window): // the measurement window
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	col.Collect(ctx)
	b, _ := col.Get(id)
	elapsed := b.SampledAt.Sub(a.SampledAt).Seconds()
	used := (b.CPUSeconds - a.CPUSeconds) / elapsed
	t.Logf("cpu_limit %.2f: QEMU used %.2f s of CPU in %.2f s = %.3f CPU (%.1f%% of the cap); cpu_percent %.1f",
		limit, b.CPUSeconds-a.CPUSeconds, elapsed, used, used/limit*100, b.CPUPercent)
	if math.Abs(used-limit) > 0.1*limit {
		t.Errorf("measured %.3f CPU under a cap of %.2f: more than 10%% off", used, limit)
	}
	if math.Abs(b.CPUPercent/100-used) > 1e-9 {
		t.Errorf("cpu_percent %.3f disagrees with cpu_seconds over the interval (%.3f)", b.CPUPercent, used*100)
	}
	if strings.Contains(con.Text(), "run-exit 1 ") {
		t.Errorf("the guest stopped spinning before the window ended:\n%s", con.Text())
	}
}
