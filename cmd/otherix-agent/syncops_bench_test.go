package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/qmp"
)

// BenchmarkSyncOps measures pause, resume and reset through the real
// agent's API (the standalone binary, a booted test guest: enqueue, lease,
// journal, engine, QMP, completion, answer) beside, in the same run and
// interleaved with them, the raw QMP round trip of the same command on a
// bare QEMU and one fsync on the journal's file system. The goal (issue
// 17): an op's p50 within raw QMP + one fsync + 2 ms. A reset's raw QMP
// is measured on a second bare QEMU, one that never runs (started with
// -S): a machine reset while running starts its firmware again, which
// under TCG keeps a core busy for longer than a round, and the baseline's
// firmware would then take one of the host's cores from the VM being
// measured, which no real host has beside a VM being reset. A paused
// QEMU answers system_reset the same way (its main loop resets every
// device) and stays paused. A second baseline,
// the twin, is a QEMU started with the agent VM's own command line and
// booting the same guest, with no agent: the same command on it shows
// what QEMU itself costs for a VM's devices, apart from the agent. The
// table also shows the command on the agent's own VM (from the agent's
// metrics) and the load.
//
//	go test -run '^$' -bench SyncOps -benchtime 200x ./cmd/otherix-agent/
func BenchmarkSyncOps(b *testing.B) {
	a := startAgent(b, "")
	r := a.cli("", "vm", "create", "bench-1", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--wait")
	if r.code != 0 {
		b.Fatalf("create: %s %s\n%s", r.stdout, r.stderr, tail(a.logText(), 3000))
	}
	// Pause and resume a booted guest, as an operator would: its drivers
	// have set their devices up, which QEMU's stop and cont then walk.
	waitConsole(b, a.console("bench-1"), "OTHERIX-GUEST ready")
	bare := startBareQEMU(b)
	bareIdle := startBareQEMU(b, "-S")
	twin := startTwinQEMU(b, a.dir, a.getVM("bench-1").UUID)
	fsyncDir := filepath.Join(a.dir, "journal")
	client := &http.Client{}
	api := func(op string) time.Duration {
		req, _ := http.NewRequest(http.MethodPost, a.url+"/v1/vms/bench-1/"+op, nil)
		req.Header.Set("Authorization", "Bearer "+a.token)
		t0 := time.Now()
		resp, err := client.Do(req)
		d := time.Since(t0)
		if err != nil {
			b.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("%s: %s %s\n%s", op, resp.Status, body, tail(a.logText(), 6000))
		}
		return d
	}
	ctx := context.Background()
	raw := func(q *qmp.Client, cmd string) time.Duration {
		t0 := time.Now()
		if err := q.Execute(ctx, cmd, nil, nil); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	fsync := func() time.Duration {
		f, err := os.CreateTemp(fsyncDir, "fsync-bench-*")
		if err != nil {
			b.Fatal(err)
		}
		defer os.Remove(f.Name())
		defer f.Close()
		f.Write(make([]byte, 256))
		t0 := time.Now()
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	ops := []syncOp{{"pause", "stop", bare}, {"resume", "cont", bare}, {"reset", "system_reset", bareIdle}}
	apiT := map[string][]time.Duration{}
	rawT := map[string][]time.Duration{}
	twinT := map[string][]time.Duration{}
	var fsyncT []time.Duration
	// A round runs each op through the API and on the bare QEMU; a twin
	// round runs it on the twin and on the bare QEMU, under the same
	// load: one VM-like QEMU and the bare one take each command. The VM
	// of the other kind of round is kept paused meanwhile.
	round := func(ops ...syncOp) {
		for _, op := range ops {
			apiT[op.api] = append(apiT[op.api], api(op.api))
			rawT[op.api] = append(rawT[op.api], raw(op.bare, op.qmp))
		}
		fsyncT = append(fsyncT, fsync())
	}
	twinRound := func(ops ...syncOp) {
		for _, op := range ops {
			twinT[op.api] = append(twinT[op.api], raw(twin, op.qmp))
			raw(op.bare, op.qmp)
		}
	}
	// phases runs pauses and resumes first, then resets: the test
	// guest's firmware resets the machine itself soon after a reset, and
	// QEMU resumes a guest paused meanwhile, which would make the next
	// resume a conflict.
	phases := func(round func(ops ...syncOp)) {
		for range b.N {
			round(ops[0], ops[1])
		}
		for range b.N {
			round(ops[2])
		}
	}
	// keepPaused pauses a VM until it stays paused (a reset's echo may
	// resume it).
	keepPaused := func(pause func(), status func() string) {
		for range 50 {
			pause()
			time.Sleep(300 * time.Millisecond)
			if status() == "paused" {
				return
			}
		}
		b.Fatal("the VM does not stay paused")
	}
	twinStatus := func() string {
		var st struct{ Status string }
		twin.Execute(ctx, "query-status", nil, &st)
		return st.Status
	}
	keepPaused(func() { twin.Execute(ctx, "stop", nil, nil) }, twinStatus)
	api("reset") // warm the connection and the path
	before := scrape(b, a.url)
	cpu0 := cpuTime(b, a.cmd.Process.Pid)
	b.ResetTimer()
	phases(round)
	b.StopTimer()
	agentCPU := (cpuTime(b, a.cmd.Process.Pid) - cpu0) / time.Duration(3*b.N)
	keepPaused(func() { a.cli("", "vm", "pause", "bench-1") }, func() string { return a.getVM("bench-1").Status })
	if err := twin.Execute(ctx, "cont", nil, nil); err != nil {
		b.Fatal(err)
	}
	phases(twinRound)
	after := scrape(b, a.url)
	fs50, fs99 := pct(fsyncT, 50), pct(fsyncT, 99)
	var out strings.Builder
	fmt.Fprintf(&out, "\nsync ops, %d rounds, interleaved (ms); load %s\n", b.N, loadavg())
	fmt.Fprintf(&out, "%-7s %8s %8s %9s %9s %9s %10s %7s %10s %7s %9s\n", "op", "API p50", "API p99", "bare p50", "twin p50", "fsync p50",
		"target", "met", "twin target", "met", "VM's QMP")
	met := func(a, t time.Duration) string {
		if a <= t {
			return "yes"
		}
		return "no"
	}
	for _, op := range ops {
		a50, a99 := pct(apiT[op.api], 50), pct(apiT[op.api], 99)
		q50, t50 := pct(rawT[op.api], 50), pct(twinT[op.api], 50)
		target, twinTarget := q50+fs50+2*time.Millisecond, t50+fs50+2*time.Millisecond
		vmQMP := histogramP50(before, after, op.qmp)
		fmt.Fprintf(&out, "%-7s %8s %8s %9s %9s %9s %10s %7s %10s %7s %9s\n", op.api, ms(a50), ms(a99), ms(q50), ms(t50), ms(fs50),
			ms(target), met(a50, target), ms(twinTarget), met(a50, twinTarget), ms(vmQMP))
		b.ReportMetric(float64(a50)/1e6, op.api+"-p50-ms")
		b.ReportMetric(float64(a99)/1e6, op.api+"-p99-ms")
		b.ReportMetric(float64(q50)/1e6, op.qmp+"-qmp-p50-ms")
		b.ReportMetric(float64(t50)/1e6, op.qmp+"-twin-p50-ms")
	}
	fmt.Fprintf(&out, "fsync of the journal's file system: p50 %s, p99 %s; the agent's CPU time: %s per op\n", ms(fs50), ms(fs99), ms(agentCPU))
	fmt.Fprintf(&out, "bare: the raw QMP command on a QEMU with no devices and no guest (for reset, one started paused, which runs no firmware after it); twin: on a QEMU with the agent VM's command line and guest, no agent (its own rounds, beside the bare QEMU as the API's are)\n")
	fmt.Fprintf(&out, "target: bare p50 + fsync p50 + 2 ms (issue 17); twin target: the same over the twin; VM's QMP: the command on the agent's own VM, from its QMP histogram (buckets interpolated)\n")
	b.ReportMetric(float64(fs50)/1e6, "fsync-p50-ms")
	b.ReportMetric(float64(agentCPU)/1e6, "agent-cpu-ms/op")
	fmt.Print(out.String())
}

// syncOp is an API op, the QMP command it runs and the bare QEMU its
// baseline runs that command on.
type syncOp struct {
	api, qmp string
	bare     *qmp.Client
}

// histogramP50 is the median of a QMP command's durations on the agent's
// VMs between two scrapes of its metrics: Prometheus' histogram_quantile,
// linear within the bucket.
func histogramP50(before, after map[string]float64, cmd string) time.Duration {
	prefix := `otherix_agent_qmp_command_duration_seconds_bucket{command="` + cmd + `",le="`
	type bucket struct{ le, n float64 }
	var bs []bucket
	for k, v := range after {
		le, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		le = strings.TrimSuffix(le, `"}`)
		f, err := strconv.ParseFloat(le, 64)
		if err != nil {
			continue
		}
		bs = append(bs, bucket{f, v - before[k]})
	}
	slices.SortFunc(bs, func(a, b bucket) int { return cmp.Compare(a.le, b.le) })
	if len(bs) == 0 || bs[len(bs)-1].n == 0 {
		return 0
	}
	rank := bs[len(bs)-1].n / 2
	lo, below := 0.0, 0.0
	for _, bk := range bs {
		if bk.n >= rank && !math.IsInf(bk.le, 1) {
			return time.Duration((lo + (bk.le-lo)*(rank-below)/(bk.n-below)) * 1e9)
		}
		lo, below = bk.le, bk.n
	}
	return time.Duration(lo * 1e9)
}

// cpuTime is the user and system CPU time of process pid so far.
func cpuTime(tb testing.TB, pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	// Fields after the command's closing parenthesis: utime and stime
	// are the 12th and 13th, in clock ticks (USER_HZ, 100 on Linux).
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// loadavg is the 1, 5 and 15 minute load averages, as uptime prints them.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[min(max(i-1, 0), len(s)-1)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/1e6) }

// startBareQEMU starts a QEMU with no agent around it (the same machine
// type, TCG, its vCPU running firmware unless extra holds -S) and
// returns a QMP client to it.
func startBareQEMU(tb testing.TB, extra ...string) *qmp.Client {
	tb.Helper()
	dir, err := os.MkdirTemp("/tmp", "oxq")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "qmp.sock")
	f := testguest.ListenUnix(tb, path)
	defer f.Close()
	args := []string{"-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-m", "256",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off", "-mon", "chardev=qmp,mode=control"}
	return runQEMU(tb, append(args, extra...), []*os.File{f}, 0, path)
}
