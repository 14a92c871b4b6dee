// Command capacity measures what one idle agent costs the control plane:
// requests per minute (long poll + heartbeats) beside a baseline agent
// that polls every second, and the bytes of one heartbeat with -vms VMs,
// as JSON and gzip, beside the baseline of full API views. It runs real
// runners against an in-memory control plane on loopback and prints a
// markdown table, scaled to a -fleet of hosts.
//
// With -cluster N,M,... it measures instead the control plane itself with
// N simulated agents, on the standalone file store and on etcd (three
// replicas on a three-member etcd from Debian's etcd-server), side by
// side: requests and heartbeats per second, node_info sent per agent per
// minute (as the real agent sends it: when it changed, free_bytes rounded
// to whole GiB, beside the rate with free_bytes exact to the byte),
// heartbeat latency and etcd writes per agent per minute
// (docs/cluster.md, "Capacity").
//
//	go run ./agent/runner/capacity -duration 2m
//	go run ./agent/runner/capacity -cluster 100,1000 -duration 1m
package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
	"github.com/otherix/otherix-agent/agent/runner"
)

var (
	cpuProfile, onlyStores string
	taskRate               float64
)

func main() {
	duration := flag.Duration("duration", time.Minute, "measurement window")
	nvms := flag.Int("vms", 100, "VMs on the host")
	fleet := flag.Int("fleet", 10000, "hosts the control plane serves")
	interval := flag.Duration("interval", 10*time.Second, "heartbeat interval the control plane asks for")
	cluster := flag.String("cluster", "", "comma-separated fleet sizes N: measure the control plane with N simulated agents on the file and the etcd store")
	clusterVMs := flag.Int("cluster-vms", 5, "VMs each simulated agent reports (-cluster)")
	writeMiB := flag.Float64("cluster-write-mibs", 1, "MiB/s each simulated host's guests write to its pool on average, shrinking free_bytes (-cluster)")
	flag.StringVar(&cpuProfile, "cpuprofile", "", "with -cluster: write a CPU profile of each row's window to `prefix`-<store>-<N>.pprof")
	flag.Float64Var(&taskRate, "cluster-tasks", 0, "with -cluster: tasks per second queued for random VMs during each window, done at once by their agents")
	flag.StringVar(&onlyStores, "stores", "file,etcd", "with -cluster: the stores to measure")
	flag.Parse()
	if *cluster != "" {
		var ns []int
		for _, f := range strings.Split(*cluster, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 1 {
				fmt.Fprintf(os.Stderr, "capacity: -cluster %q: want sizes like 100,1000\n", *cluster)
				os.Exit(2)
			}
			ns = append(ns, n)
		}
		if err := clusterBench(ns, *duration, *interval, *clusterVMs, int64(*writeMiB*(1<<20))); err != nil {
			fmt.Fprintln(os.Stderr, "capacity:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(*duration, *nvms, *fleet, *interval); err != nil {
		fmt.Fprintln(os.Stderr, "capacity:", err)
		os.Exit(1)
	}
}

type inventory struct{ vms []api.VM }

func (inv inventory) Node(context.Context) protocol.NodeInfo {
	return protocol.NodeInfo{Name: "hv-rack12-07", AgentVersion: "capacity", QEMUVersion: "7.2.0", Arch: "amd64", CPUs: 64, MemoryMB: 512 << 10,
		Pools: []protocol.PoolInfo{{Name: "default", TotalBytes: 4 << 40, FreeBytes: 3 << 40}}, Arches: []string{"amd64"}, Firmwares: []string{"bios", "uefi"}}
}
func (inv inventory) VMs(context.Context) []api.VM { return inv.vms }

type idle struct{}

func (idle) Execute(context.Context, protocol.Task, func(api.Progress)) (protocol.Result, error) {
	return protocol.Result{}, errors.New("no task expected")
}

// agent is one runner against its own control plane.
type agent struct {
	cp     *cptest.Server
	ts     *httptest.Server
	cancel context.CancelFunc
	done   chan error
}

func startAgent(dir string, leaseWait, interval time.Duration, vms []api.VM, compressMin int) (*agent, error) {
	a := &agent{cp: &cptest.Server{Token: "capacity", HeartbeatInterval: interval}, done: make(chan error, 1)}
	a.ts = httptest.NewServer(a.cp)
	tok := filepath.Join(dir, "token")
	if err := os.WriteFile(tok, []byte("capacity"), 0o600); err != nil {
		return nil, err
	}
	c, err := protocol.NewClient(protocol.ClientConfig{BaseURL: a.ts.URL, Node: "hv-rack12-07", TokenFile: tok, AgentVersion: "capacity", CompressMin: compressMin})
	if err != nil {
		return nil, err
	}
	j, err := journal.Open(filepath.Join(dir, "journal"), journal.Options{})
	if err != nil {
		return nil, err
	}
	r := runner.New(c, j, idle{}, inventory{vms}, runner.Config{LeaseWait: leaseWait, InitialStagger: -1})
	ctx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	go func() { a.done <- r.Run(ctx); j.Close() }()
	// Warm up: registered, first heartbeat answered.
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if err := a.cp.WaitFor(wctx, func() bool { return len(a.cp.Heartbeats()) > 0 }); err != nil {
		return nil, err
	}
	return a, nil
}

func (a *agent) stop() {
	a.cancel()
	<-a.done
	a.ts.Close()
}

type counts struct{ lease, heartbeat, other int }

func (a *agent) counts() counts {
	return counts{
		lease:     a.cp.Count(cptest.Lease),
		heartbeat: a.cp.Count(cptest.Heartbeat),
		other:     a.cp.Count(cptest.Register) + a.cp.Count(cptest.Progress) + a.cp.Count(cptest.Complete),
	}
}

func perMinute(n int, d time.Duration) float64 { return float64(n) * float64(time.Minute) / float64(d) }

func run(duration time.Duration, nvms, fleet int, interval time.Duration) error {
	tmp, err := os.MkdirTemp("", "capacity-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	vms := cptest.SampleVMs(nvms)

	// Requests per minute, idle: the real agent (30 s long poll) and a
	// baseline agent polling every second, side by side.
	type row struct {
		name string
		a    *agent
		c0   counts
	}
	var rows []*row
	for i, cfg := range []struct {
		name string
		wait time.Duration
	}{{"agent (long poll 30 s)", 30 * time.Second}, {"baseline (poll every 1 s)", time.Second}} {
		dir := filepath.Join(tmp, fmt.Sprint(i))
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		a, err := startAgent(dir, cfg.wait, interval, vms, 0)
		if err != nil {
			return err
		}
		rows = append(rows, &row{name: cfg.name, a: a, c0: a.counts()})
	}
	begin := time.Now()
	time.Sleep(duration)
	elapsed := time.Since(begin)

	fmt.Printf("## Idle agent, measured over %v (heartbeat interval %v)\n\n", elapsed.Round(time.Second), interval)
	fmt.Println("| agent | lease/min | heartbeat/min | other/min | total/min | fleet of", fleet, "req/s |")
	fmt.Println("|---|---|---|---|---|---|")
	var hbWire float64
	for _, r := range rows {
		c := r.a.counts()
		l, h, o := c.lease-r.c0.lease, c.heartbeat-r.c0.heartbeat, c.other-r.c0.other
		total := perMinute(l+h+o, elapsed)
		fmt.Printf("| %s | %.1f | %.1f | %.1f | %.1f | %.0f |\n", r.name, perMinute(l, elapsed), perMinute(h, elapsed), perMinute(o, elapsed), total, total*float64(fleet)/60)
		if r == rows[0] {
			bytes, gz := r.a.cp.WireBytes(cptest.Heartbeat)
			if n := r.a.cp.Count(cptest.Heartbeat); n > 0 && gz == n {
				hbWire = float64(bytes) / float64(n)
			}
		}
	}
	for _, r := range rows {
		r.a.stop()
	}

	// Bytes per heartbeat.
	statuses := make([]protocol.VMStatus, len(vms))
	for i, vm := range vms {
		statuses[i] = protocol.StatusOf(vm)
	}
	hb := protocol.HeartbeatRequest{ProtocolVersion: protocol.Version, Node: "hv-rack12-07", Seq: 1, State: protocol.NodeReady, VMs: statuses}
	full := struct {
		protocol.HeartbeatRequest
		VMs []api.VM `json:"vms"`
	}{hb, vms}
	fullJSON, fullGz, err := sizes(full)
	if err != nil {
		return err
	}
	stJSON, stGz, err := sizes(hb)
	if err != nil {
		return err
	}
	perSec := float64(fleet) / interval.Seconds()
	fmt.Printf("\n## One heartbeat with %d VMs\n\n", nvms)
	fmt.Println("| body | bytes | fleet of", fleet, "every", interval, "|")
	fmt.Println("|---|---|---|")
	for _, x := range []struct {
		name string
		n    float64
	}{
		{"baseline: full API views, JSON", float64(fullJSON)},
		{"baseline: full API views, gzip", float64(fullGz)},
		{"VM status, JSON", float64(stJSON)},
		{"VM status, gzip (what the agent sends)", float64(stGz)},
		{"measured on the wire from the running agent (gzip)", hbWire},
	} {
		fmt.Printf("| %s | %.0f | %.1f MB/s |\n", x.name, x.n, x.n*perSec/1e6)
	}
	return nil
}

func sizes(v any) (plain, gz int, err error) {
	data, err := json.Marshal(v)
	if err != nil {
		return 0, 0, err
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(data); err != nil {
		return 0, 0, err
	}
	if err := zw.Close(); err != nil {
		return 0, 0, err
	}
	return len(data), buf.Len(), nil
}
