package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver/etcdstore"
	"github.com/otherix/otherix-agent/internal/etcdtest"
)

// clusterBench drives n simulated agents (the protocol's client: register,
// a heartbeat every interval with vms VMs, a 30 s long-poll lease) against
// the control plane on the standalone file store (one server) and on
// etcd (three replicas on a three-member etcd, the agents spread over
// them), and prints requests per second, heartbeat latency and etcd
// writes per agent per minute.
func clusterBench(ns []int, duration, interval time.Duration, vms int, writeRate int64) error {
	tmp, err := os.MkdirTemp("", "capacity-cluster-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	etcd, err := etcdtest.New(filepath.Join(tmp, "etcd"), 3)
	if err != nil {
		return err
	}
	defer etcd.Stop()
	// Interrupted, the members go too (they are this process's children).
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		if _, ok := <-sigs; ok {
			etcd.Stop()
			os.Exit(1)
		}
	}()
	tok := filepath.Join(tmp, "token")
	if err := os.WriteFile(tok, []byte("capacity"), 0o600); err != nil {
		return err
	}
	fmt.Printf("\n## Control plane with N simulated agents, measured over %v each (heartbeat every %v with %d VMs and their usage, node_info when it changed with guests writing %.1f MiB/s per host, lease long poll 30 s)\n\n",
		duration, interval, vms, float64(writeRate)/(1<<20))
	head, rule := "| store | N | req/s | heartbeat/s | node_info/agent/min (free_bytes exact to the byte) | heartbeat p50 | heartbeat p99 | errors | etcd writes/agent/min |", "|---|---|---|---|---|---|---|---|---|"
	if taskRate > 0 {
		head, rule = head+fmt.Sprintf(" tasks/s done (%.1f/s queued) | task p50 | task p99 | enqueue errors |", taskRate), rule+"---|---|---|---|"
	}
	fmt.Println(head)
	fmt.Println(rule)
	for _, n := range ns {
		for _, kind := range []string{"standalone (file)", "cluster (etcd, 3 replicas)"} {
			if !slices.Contains(strings.Split(onlyStores, ","), storeShort(kind)) {
				continue
			}
			row, err := benchOne(kind, n, duration, interval, vms, writeRate, tmp, tok, etcd)
			if err != nil {
				return fmt.Errorf("%s, N=%d: %w", kind, n, err)
			}
			fmt.Println(row)
		}
	}
	if duration < etcdstore.DefaultNodeRefresh {
		fmt.Printf("\nAn idle node's record is rewritten every %v (etcdstore.DefaultNodeRefresh), beyond this window: %.1f more etcd writes/agent/min in steady state.\n",
			etcdstore.DefaultNodeRefresh, float64(time.Minute)/float64(etcdstore.DefaultNodeRefresh))
	}
	return nil
}

// counting counts the requests a handler serves.
type counting struct {
	h http.Handler
	n *atomic.Int64
}

func (c counting) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.n.Add(1)
	c.h.ServeHTTP(w, r)
}

func benchOne(kind string, n int, duration, interval time.Duration, vms int, writeRate int64, tmp, tok string, etcd *etcdtest.Cluster) (string, error) {
	var reqs atomic.Int64
	var urls []string
	var cleanup []func()
	defer func() {
		for _, f := range slices.Backward(cleanup) {
			f()
		}
	}()
	var cli *clientv3.Client
	var servers []*cpserver.Server
	var hosts []*simHost
	var queued sync.Map // task id -> time.Time enqueued
	var taskMu sync.Mutex
	var taskLat []time.Duration
	prefix := fmt.Sprintf("/capacity/%d/", n)
	if kind == "standalone (file)" {
		fs, err := cpserver.NewFileStore(filepath.Join(tmp, fmt.Sprintf("state-%d.json", n)), nil)
		if err != nil {
			return "", err
		}
		// The same server as on etcd; only the store differs.
		srv := &cpserver.Server{Store: fs, Token: "capacity", HeartbeatInterval: interval, DesiredFollowsTasks: true, AdoptUnknownVMs: true, NodeScoped: true}
		servers = append(servers, srv)
		ts := httptest.NewServer(counting{srv, &reqs})
		cleanup = append(cleanup, closeServer(ts))
		urls = append(urls, ts.URL)
	} else {
		var err error
		cli, err = etcdstore.Dial(etcdstore.DialConfig{Endpoints: etcd.Endpoints()})
		if err != nil {
			return "", err
		}
		cleanup = append(cleanup, func() { cli.Close() })
		for range 3 {
			st := etcdstore.New(cli, etcdstore.Options{Prefix: prefix, NodeTTL: 3 * interval})
			cleanup = append(cleanup, func() { st.Close() })
			srv := &cpserver.Server{Store: st, Token: "capacity", HeartbeatInterval: interval, DesiredFollowsTasks: true, AdoptUnknownVMs: true, NodeScoped: true}
			servers = append(servers, srv)
			ts := httptest.NewServer(counting{srv, &reqs})
			cleanup = append(cleanup, closeServer(ts))
			urls = append(urls, ts.URL)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	cleanup = append(cleanup, func() { cancel(); wg.Wait() })
	var mu sync.Mutex
	var lat []time.Duration
	var errs, beats, infos, exactInfos atomic.Int64
	measuring := atomic.Bool{}
	ready := make(chan struct{}, n)
	var first sync.WaitGroup // every agent's first heartbeat answered
	first.Add(n)
	for i := range n {
		c, err := protocol.NewClient(protocol.ClientConfig{BaseURL: urls[i%len(urls)], Node: fmt.Sprintf("hv-%04d", i), TokenFile: tok, AgentVersion: "capacity", AllowInsecureHTTP: true})
		if err != nil {
			return "", err
		}
		node := fmt.Sprintf("hv-%04d", i)
		host := newSimHost(node, vms, writeRate)
		hosts = append(hosts, host)
		wg.Go(func() {
			if _, err := c.Register(ctx, host.info()); err != nil {
				errs.Add(1)
			}
			ready <- struct{}{}
			wg.Go(func() {
				for ctx.Err() == nil {
					resp, err := c.Lease(ctx, 30*time.Second, 1)
					if err != nil && ctx.Err() == nil {
						errs.Add(1)
						time.Sleep(time.Second)
						continue
					}
					// A task (-cluster-tasks) is done at once.
					for _, tk := range leased(resp) {
						if err := c.Complete(ctx, tk.ID, protocol.CompleteRequest{LeaseID: tk.LeaseID, Attempt: tk.Attempt, Status: api.TaskSuccess, FinishedAt: time.Now().UTC()}); err != nil {
							if ctx.Err() == nil {
								errs.Add(1)
							}
							continue
						}
						if at, ok := queued.LoadAndDelete(tk.ID); ok && measuring.Load() {
							taskMu.Lock()
							taskLat = append(taskLat, time.Since(at.(time.Time)))
							taskMu.Unlock()
						}
					}
				}
			})
			// Spread the fleet over the interval, as the agent's
			// stagger does.
			t := time.NewTimer(rand.N(interval))
			defer t.Stop()
			for seq := uint64(1); ; seq++ {
				select {
				case <-ctx.Done():
					if seq == 1 {
						first.Done()
					}
					return
				case <-t.C:
				}
				t.Reset(interval)
				start := time.Now()
				req, nodeJSON, exact := host.heartbeat(seq, interval)
				_, err := c.Heartbeat(ctx, req)
				if err == nil {
					host.acked(nodeJSON)
				}
				if seq == 1 {
					first.Done()
				}
				if !measuring.Load() {
					continue
				}
				if err != nil {
					if ctx.Err() == nil && errs.Add(1) == 1 {
						fmt.Fprintf(os.Stderr, "capacity: %s, N=%d: first heartbeat error: %v\n", kind, n, err)
					}
					continue
				}
				beats.Add(1)
				if req.NodeInfo != nil {
					infos.Add(1)
				}
				if exact {
					exactInfos.Add(1)
				}
				mu.Lock()
				lat = append(lat, time.Since(start))
				mu.Unlock()
			}
		})
	}
	for range n {
		<-ready
	}
	// Warm-up: every agent's first heartbeat (and the adoption of its
	// VMs) answered before the window.
	warm := time.Now()
	first.Wait()
	fmt.Fprintf(os.Stderr, "capacity: %s, N=%d: first heartbeats of all agents answered in %v\n", kind, n, time.Since(warm).Round(time.Second))
	rev := func() int64 {
		if cli == nil {
			return 0
		}
		resp, err := cli.Get(ctx, "/capacity-rev")
		if err != nil {
			return 0
		}
		return resp.Header.Revision
	}
	rev0, req0 := rev(), reqs.Load()
	errs.Store(0)
	stopProfile, err := startProfile(kind, n)
	if err != nil {
		return "", err
	}
	measuring.Store(true)
	begin := time.Now()
	taskErrs := enqueueTasks(ctx, servers, hosts, duration, &queued)
	elapsed := time.Since(begin)
	measuring.Store(false)
	stopProfile()
	rev1, req1 := rev(), reqs.Load()
	mu.Lock()
	slices.Sort(lat)
	p50, p99 := pct(lat, 0.50), pct(lat, 0.99)
	mu.Unlock()
	writes := "-"
	if cli != nil {
		writes = fmt.Sprintf("%.2f", float64(rev1-rev0)/float64(n)/elapsed.Minutes())
	}
	perAgent := func(x int64) float64 { return float64(x) / float64(n) / elapsed.Minutes() }
	tasks := ""
	if taskRate > 0 {
		taskMu.Lock()
		slices.Sort(taskLat)
		tasks = fmt.Sprintf(" %.1f | %v | %v | %d |", float64(len(taskLat))/elapsed.Seconds(), pct(taskLat, 0.5).Round(100*time.Microsecond), pct(taskLat, 0.99).Round(100*time.Microsecond), taskErrs)
		taskMu.Unlock()
	}
	return fmt.Sprintf("| %s | %d | %.1f | %.1f | %.2f (exact: %.2f) | %v | %v | %d | %s |%s", kind, n,
		float64(req1-req0)/elapsed.Seconds(), float64(beats.Load())/elapsed.Seconds(), perAgent(infos.Load()), perAgent(exactInfos.Load()),
		p50.Round(100*time.Microsecond), p99.Round(100*time.Microsecond), errs.Load(), writes, tasks), nil
}

func storeShort(kind string) string {
	if kind == "standalone (file)" {
		return "file"
	}
	return "etcd"
}

// startProfile starts a CPU profile of one row's window when -cpuprofile
// asks for it; the returned function ends it.
func startProfile(kind string, n int) (func(), error) {
	if cpuProfile == "" {
		return func() {}, nil
	}
	f, err := os.Create(fmt.Sprintf("%s-%s-%d.pprof", cpuProfile, storeShort(kind), n))
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}

// leased returns a lease answer's tasks (none for nil).
func leased(resp *protocol.LeaseResponse) []protocol.Task {
	if resp == nil {
		return nil
	}
	return resp.Tasks
}

// enqueueTasks queues taskRate tasks per second (vm.reset: no desired
// phase changes) for random VMs of random hosts, each through a random
// replica, for d, and returns the enqueue errors. Without -cluster-tasks
// it only waits d.
func enqueueTasks(ctx context.Context, servers []*cpserver.Server, hosts []*simHost, d time.Duration, queued *sync.Map) int {
	end := time.After(d)
	if taskRate <= 0 {
		<-end
		return 0
	}
	tick := time.NewTicker(time.Duration(float64(time.Second) / taskRate))
	defer tick.Stop()
	errs := 0
	for {
		select {
		case <-end:
			return errs
		case <-tick.C:
		}
		h := hosts[rand.N(len(hosts))]
		vm := h.vms[rand.N(len(h.vms))]
		id := uuid.NewString()
		queued.Store(id, time.Now())
		if _, err := servers[rand.N(len(servers))].Enqueue(ctx, cpserver.Task{Task: api.Task{ID: id, Type: api.TaskReset, VMName: vm.Name, VMUUID: vm.UUID}, Node: h.node}); err != nil {
			queued.Delete(id)
			errs++
		}
	}
}

// closeServer ends a test server with long polls still open: it drops
// the connections and does not wait for handlers still queued on a
// loaded store (the next row must not wait on this one's backlog).
func closeServer(ts *httptest.Server) func() {
	return func() {
		ts.CloseClientConnections()
		go ts.Close()
	}
}

func pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(float64(len(sorted))*p))]
}
