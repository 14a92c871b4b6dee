package agent

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/agent/vm"
)

// cpuCapPlacer does with the CPU controller what systemd does with a
// scope's CPUQuota=: it moves each VM's QEMU into a cgroup of its own
// (under cgroup v1's cpu hierarchy, or v2) with the quota ScopeLimits
// gives the VM's cpu_limit. Its weight is set high (1000 where a vCPU is
// 100) so that on this shared, loaded test host the cap, not the
// neighbours, is what holds the VM back.
type cpuCapPlacer struct {
	root string // the cpu hierarchy's cgroup the test makes
	acct string // v1: the cpuacct hierarchy's (the kernel's CPU time)
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
	if !p.v2 && fileExists("/sys/fs/cgroup/cpuacct/cgroup.procs") {
		p.acct = filepath.Join("/sys/fs/cgroup/cpuacct", name)
		if err := os.Mkdir(p.acct, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(p.acct) })
	}
	return p
}

// capNow gives the VM's cgroup the CPU quota of its cpu_limit
// (ScopeLimits); the test does it once the guest booted, which takes
// minutes under TCG at a tenth of a CPU.
func (p *cpuCapPlacer) capNow(t *testing.T, v vm.View) {
	t.Helper()
	dir := filepath.Join(p.root, vm.ShortID(v.Spec.UUID))
	u := ScopeLimits(v.Spec, config.Default("").Limits)
	const period = 100000 // µs
	quota := u.CPUQuotaPercent * period / 100
	files := [][2]string{{"cpu.cfs_period_us", strconv.Itoa(period)}, {"cpu.cfs_quota_us", strconv.FormatUint(quota, 10)}}
	if p.v2 {
		files = [][2]string{{"cpu.max", fmt.Sprintf("%d %d", quota, period)}}
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f[0]), []byte(f[1]), 0o644); err != nil {
			t.Fatalf("%s: %v", f[0], err)
		}
	}
}

// stat returns the kernel's view of the VM's cgroup: its CPU time, and
// the periods its quota throttled it in.
func (p *cpuCapPlacer) stat(t *testing.T, v vm.View) (cpu time.Duration, periods, throttled int64) {
	t.Helper()
	dir := filepath.Join(p.root, vm.ShortID(v.Spec.UUID))
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		t.Fatal(err)
	}
	kv := map[string]int64{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, val, ok := strings.Cut(line, " "); ok {
			kv[k], _ = strconv.ParseInt(val, 10, 64)
		}
	}
	if p.v2 {
		return time.Duration(kv["usage_usec"]) * time.Microsecond, kv["nr_periods"], kv["nr_throttled"]
	}
	b, err = os.ReadFile(filepath.Join(p.acct, vm.ShortID(v.Spec.UUID), "cpuacct.usage"))
	if err != nil {
		t.Fatal(err)
	}
	ns, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return time.Duration(ns), kv["nr_periods"], kv["nr_throttled"]
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func (p *cpuCapPlacer) Place(ctx context.Context, v vm.View) error {
	dir := filepath.Join(p.root, vm.ShortID(v.Spec.UUID))
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		return err
	}
	files := map[string]string{"cpu.shares": "262144"}
	if p.v2 {
		files = map[string]string{"cpu.weight": "10000"}
	}
	for f, val := range files {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(val), 0o644); err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(v.PID)), 0o644); err != nil {
		return err
	}
	if p.acct != "" {
		acct := filepath.Join(p.acct, vm.ShortID(v.Spec.UUID))
		if err := os.Mkdir(acct, 0o755); err != nil && !os.IsExist(err) {
			return err
		}
		if err := os.WriteFile(filepath.Join(acct, "cgroup.procs"), []byte(strconv.Itoa(v.PID)), 0o644); err != nil {
			return err
		}
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
	if dir == "" {
		return nil
	}
	if p.acct != "" {
		os.Remove(filepath.Join(p.acct, filepath.Base(dir)))
	}
	return os.Remove(dir)
}

func (p *cpuCapPlacer) Kind() string { return "test-cpu-cgroup" }

// TestCPUCapMeasured: a guest spinning its one vCPU under cpu_limit 0.1
// uses its cap: the CPU time the agent measures (cpu_seconds over a 20 s
// window, once capped) is what the kernel counted for its cgroup (within 10%), never
// more than 10% over the cap, and within 10% of it when the cap bound in
// nearly every period; its cpu_percent agrees.
func TestCPUCapMeasured(t *testing.T) {
	t.Parallel()
	const limit = 0.1
	placer := newCPUCapPlacer(t)
	hh := newHostWith(t, Options{Placer: placer})
	h := hh.h
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	ud := "#cloud-config\n#otherix-run: echo OTHERIX-TEST spinning; timeout 120 sh -c 'while :; do :; done'\n"
	id := uuid.NewString()
	if _, err := h.Create(ctx, id, api.CreateVM{Name: "capped", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		CPULimit: limit, UserData: ud}, nil, nil); err != nil {
		t.Fatal(err)
	}
	v, _ := h.Engine().Get("capped")
	con := testguest.OpenConsole(v.ConsolePath)
	defer con.Close()
	wait(t, con, "OTHERIX-TEST spinning")
	placer.capNow(t, v)
	col := h.Usage()
	col.Collect(ctx)
	a, _ := col.Get(id)
	kcpuA, periodsA, throttledA := placer.stat(t, v)
	const window = 20 * time.Second
	select {
	case <-time.After(window): // the measurement window
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	col.Collect(ctx)
	b, _ := col.Get(id)
	kcpuB, periodsB, throttledB := placer.stat(t, v)
	elapsed := b.SampledAt.Sub(a.SampledAt).Seconds()
	measured := b.CPUSeconds - a.CPUSeconds
	used := measured / elapsed
	kernel := (kcpuB - kcpuA).Seconds()
	throttled := float64(throttledB-throttledA) / float64(max(periodsB-periodsA, 1))
	t.Logf("cpu_limit %.2f: the agent measured %.2f s of CPU in %.2f s = %.3f CPU (%.1f%% of the cap), cpu_percent %.1f; "+
		"the kernel counted %.2f s; the quota throttled %.0f%% of the periods",
		limit, measured, elapsed, used, used/limit*100, b.CPUPercent, kernel, throttled*100)
	// What the agent measures is what the kernel counted.
	if math.Abs(measured-kernel) > 0.1*kernel {
		t.Errorf("the agent measured %.2f s, the kernel counted %.2f s: more than 10%% apart", measured, kernel)
	}
	// The cap holds. Where it bound in (nearly) every period the VM
	// used it all; on a host too busy to give the VM its cap in some
	// periods, it used less, which the log shows (the kernel's throttling
	// figures say why).
	if used > 1.1*limit {
		t.Errorf("measured %.3f CPU under a cap of %.2f: more than 10%% over", used, limit)
	}
	if throttled >= 0.9 && used < 0.9*limit {
		t.Errorf("measured %.3f CPU under a cap of %.2f that bound in %.0f%% of the periods: more than 10%% under", used, limit, throttled*100)
	}
	if math.Abs(b.CPUPercent/100-used) > 1e-9 {
		t.Errorf("cpu_percent %.3f disagrees with cpu_seconds over the interval (%.3f)", b.CPUPercent, used*100)
	}
	if strings.Contains(con.Text(), "run-exit 1 ") {
		t.Errorf("the guest stopped spinning before the window ended:\n%s", con.Text())
	}
}
