package etcdstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver/etcdstore"
	"github.com/otherix/otherix-agent/internal/etcdtest"
	"github.com/otherix/otherix-agent/internal/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Main(m)) }

func newStore(t *testing.T, c *etcdtest.Cluster, o etcdstore.Options) *etcdstore.Store {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s := etcdstore.New(cli, o)
	t.Cleanup(func() {
		s.Close()
		cli.Close()
	})
	return s
}

func protoClient(t *testing.T, url, node string) *protocol.Client {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte("tok"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := protocol.NewClient(protocol.ClientConfig{BaseURL: url, Node: node, TokenFile: p})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestLeaseExpiresInEtcd: a lease nobody extends ends when its etcd
// lease does (no clock compared): a waiting long poll on another replica
// wakes and hands the task out again, attempt 2; progress on the old
// lease is refused.
func TestLeaseExpiresInEtcd(t *testing.T) {
	c := etcdtest.Start(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a := &cpserver.Server{Store: newStore(t, c, etcdstore.Options{}), Token: "tok", LeaseTTL: 2 * time.Second}
	b := &cpserver.Server{Store: newStore(t, c, etcdstore.Options{}), Token: "tok", LeaseTTL: 2 * time.Second, MaxWait: 30 * time.Second}
	tsA, tsB := httptest.NewServer(a), httptest.NewServer(b)
	defer tsA.Close()
	defer tsB.Close()
	task, err := a.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStart, VMName: "v", VMUUID: "u"}})
	if err != nil {
		t.Fatal(err)
	}
	first, err := protoClient(t, tsA.URL, "n1").Lease(ctx, 0, 1)
	if err != nil || len(first.Tasks) != 1 || first.Tasks[0].ID != task.ID {
		t.Fatalf("first lease: %+v %v", first, err)
	}
	// Extended on the other replica: the same etcd lease goes on.
	cb := protoClient(t, tsB.URL, "n1")
	if _, err := cb.Progress(ctx, task.ID, first.Tasks[0].LeaseID, nil); err != nil {
		t.Fatalf("progress via b: %v", err)
	}
	start := time.Now()
	again, err := cb.Lease(ctx, 25*time.Second, 1)
	if err != nil || len(again.Tasks) != 1 || again.Tasks[0].Attempt != 2 || again.Tasks[0].LeaseID == first.Tasks[0].LeaseID {
		t.Fatalf("after expiry: %+v %v", again, err)
	}
	t.Logf("re-leased %v after the last extension (ttl 2s)", time.Since(start).Round(10*time.Millisecond))
	if _, err := cb.Progress(ctx, task.ID, first.Tasks[0].LeaseID, nil); !isStatus(err, http.StatusConflict) {
		t.Errorf("progress on the expired lease: %v", err)
	}
	if err := cb.Complete(ctx, task.ID, protocol.CompleteRequest{LeaseID: again.Tasks[0].LeaseID, Attempt: 2, Status: api.TaskSuccess}); err != nil {
		t.Fatal(err)
	}
	if got, err := a.Wait(ctx, task.ID); err != nil || got.Status != api.TaskSuccess {
		t.Fatalf("wait on a: %+v %v", got, err)
	}
}

func isStatus(err error, code int) bool {
	var h *protocol.HTTPError
	return errors.As(err, &h) && h.StatusCode == code
}

// TestReplicasLeaseOnce: tasks queued on one replica and leased by
// agents polling three replicas at once are each delivered exactly once.
func TestReplicasLeaseOnce(t *testing.T) {
	c := etcdtest.Start(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var srvs []*cpserver.Server
	for range 3 {
		srvs = append(srvs, &cpserver.Server{Store: newStore(t, c, etcdstore.Options{})})
	}
	const n = 30
	for i := range n {
		if _, err := srvs[0].Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStart, VMUUID: fmt.Sprint("u", i)}}); err != nil {
			t.Fatal(err)
		}
	}
	var mu sync.Mutex
	seen := map[string]int{}
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Go(func() {
			srv := srvs[i%3]
			for {
				resp, err := srv.Lease(ctx, protocol.LeaseRequest{Max: 2})
				if err != nil {
					t.Error(err)
					return
				}
				if len(resp.Tasks) == 0 {
					return
				}
				mu.Lock()
				for _, tk := range resp.Tasks {
					seen[tk.ID]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(seen) != n {
		t.Errorf("%d tasks leased, want %d", len(seen), n)
	}
	for id, k := range seen {
		if k != 1 {
			t.Errorf("task %s leased %d times", id, k)
		}
	}
}

// TestQuorumLost: without quorum an operation fails with ErrUnavailable
// within the op timeout (no hang); with quorum back the state is intact.
func TestQuorumLost(t *testing.T) {
	c := etcdtest.Start(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	s := newStore(t, c, etcdstore.Options{})
	srv := &cpserver.Server{Store: s}
	task, err := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStart, VMUUID: "u"}})
	if err != nil {
		t.Fatal(err)
	}
	c.Members[0].Kill()
	// The member may have led: the others elect a new leader first.
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStop, VMUUID: "u"}}); err != nil {
		t.Fatalf("one member down: %v", err)
	}
	killed := c.KillQuorum()
	// Once the survivor knows it has no leader it refuses at once, and
	// what it refused never applies. (Before that, a write may wait in
	// its log and apply when quorum returns although its caller timed
	// out: etcd's ambiguity, see docs/cluster.md.)
	for _, m := range c.Members {
		for m.Running() {
			if has, err := m.HasLeader(ctx); err != nil || !has {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	start := time.Now()
	_, err = srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStop, VMUUID: "u"}})
	if !errors.Is(err, cpserver.ErrUnavailable) {
		t.Fatalf("no quorum: %v", err)
	}
	t.Logf("refused in %v", time.Since(start).Round(time.Millisecond))
	// An agent is told 503 cluster_unavailable with Retry-After.
	ts := httptest.NewServer(srv)
	defer ts.Close()
	resp, err := http.Post(ts.URL+protocol.PathHeartbeat, "application/json", strings.NewReader(`{"node":"n1","vms":[]}`))
	if err != nil {
		t.Fatal(err)
	}
	var env api.ErrorEnvelope
	json.NewDecoder(resp.Body).Decode(&env)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || env.Error.Code != "cluster_unavailable" || resp.Header.Get("Retry-After") == "" {
		t.Errorf("heartbeat without quorum: %d %+v %q", resp.StatusCode, env, resp.Header.Get("Retry-After"))
	}
	for _, m := range append(killed, c.Members[0]) {
		if err := m.Restart(); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	var got cpserver.Task
	for {
		got, err = srv.Task(ctx, task.ID)
		if err == nil || !errors.Is(err, cpserver.ErrUnavailable) || ctx.Err() != nil {
			break
		}
	}
	if err != nil || got.Status != api.TaskPending {
		t.Fatalf("after quorum is back: %+v %v", got, err)
	}
	if all, _ := srv.Tasks(ctx); len(all) != 2 {
		t.Errorf("%d tasks after the outage, want 2", len(all))
	}
}

// TestPrune: past MaxTasks the oldest terminal tasks go, unfinished ones
// stay.
func TestPrune(t *testing.T) {
	c := etcdtest.Start(t, 3)
	ctx := context.Background()
	s := newStore(t, c, etcdstore.Options{MaxTasks: 10})
	srv := &cpserver.Server{Store: s}
	var ids []string
	for i := range 12 {
		tk, err := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStart, VMUUID: fmt.Sprint("u", i)}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, tk.ID)
		if i < 5 {
			srv.Cancel(ctx, tk.ID)
		}
	}
	all, _ := s.Tasks(ctx)
	if len(all) > 10 {
		t.Errorf("%d tasks kept, max 10", len(all))
	}
	for _, id := range ids[5:] {
		if _, err := s.Task(ctx, id); err != nil {
			t.Errorf("unfinished task %s: %v", id, err)
		}
	}
	if _, err := s.Task(ctx, ids[0]); !errors.Is(err, cpserver.ErrNotFound) {
		t.Errorf("oldest terminal task kept: %v", err)
	}
}

// TestNodeLost: a node whose heartbeats stop reads as lost once its
// etcd liveness lease ends (no clock compared), and ready again at its
// next heartbeat.
func TestNodeLost(t *testing.T) {
	c := etcdtest.Start(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	srv := &cpserver.Server{Store: newStore(t, c, etcdstore.Options{NodeTTL: 2 * time.Second})}
	if _, err := srv.Register(ctx, protocol.RegisterRequest{Node: protocol.NodeInfo{Name: "n1", CPUs: 4}}); err != nil {
		t.Fatal(err)
	}
	state := func() string {
		nodes, err := srv.Nodes(ctx)
		if err != nil || len(nodes) != 1 {
			t.Fatalf("nodes %+v %v", nodes, err)
		}
		return nodes[0].State
	}
	beat := func() {
		if _, err := srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n1", State: protocol.NodeReady}); err != nil {
			t.Fatal(err)
		}
	}
	beat()
	beat() // the second keeps the same lease alive
	if s := state(); s != protocol.NodeReady {
		t.Fatalf("after a heartbeat: %q", s)
	}
	start := time.Now()
	for state() != api.NodeLost {
		if ctx.Err() != nil {
			t.Fatal("never lost")
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("lost %v after the last heartbeat (ttl 2s)", time.Since(start).Round(100*time.Millisecond))
	beat()
	if s := state(); s != protocol.NodeReady {
		t.Fatalf("back: %q", s)
	}
	if nodes, _ := srv.Nodes(ctx); nodes[0].Info == nil || nodes[0].Info.CPUs != 4 {
		t.Errorf("registration lost: %+v", nodes[0])
	}
}

// TestIdleHeartbeatNoWrite: a heartbeat that changes nothing but its
// time and usage samples writes nothing to etcd (its liveness lease is
// kept alive); a changed VM status is written, and so is a record older
// than NodeRefresh.
func TestIdleHeartbeatNoWrite(t *testing.T) {
	c := etcdtest.Start(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	const refresh = 3 * time.Second
	srv := &cpserver.Server{Store: newStore(t, c, etcdstore.Options{NodeRefresh: refresh})}
	rev := func() int64 {
		resp, err := cli.Get(ctx, "/otherix/nodes/n1")
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("node key: %+v %v", resp, err)
		}
		return resp.Kvs[0].ModRevision
	}
	beat := func(status string, cpu float64) {
		t.Helper()
		vms := []protocol.VMStatus{{Name: "a", UUID: "ua", Status: status, Usage: &api.UsageSummary{CPUSeconds: cpu}}}
		if _, err := srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n1", State: protocol.NodeReady, VMs: vms}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := srv.Register(ctx, protocol.RegisterRequest{Node: protocol.NodeInfo{Name: "n1", CPUs: 4}}); err != nil {
		t.Fatal(err)
	}
	beat(api.StatusRunning, 1)
	written := rev()
	start := time.Now()
	beat(api.StatusRunning, 2)
	beat(api.StatusRunning, 3)
	if time.Since(start) < refresh && rev() != written {
		t.Errorf("an idle heartbeat rewrote the node record")
	}
	if nodes, _ := srv.Nodes(ctx); len(nodes) != 1 || nodes[0].State != protocol.NodeReady || nodes[0].Info == nil || nodes[0].Info.CPUs != 4 {
		t.Errorf("nodes %+v", nodes)
	}
	beat(api.StatusStopped, 3)
	if r := rev(); r == written {
		t.Errorf("a changed VM status was not written")
	} else {
		written = r
	}
	time.Sleep(refresh)
	beat(api.StatusStopped, 3)
	if rev() == written {
		t.Errorf("a record older than NodeRefresh was not rewritten")
	}
}

// TestSecretShared: replicas asking for a shared secret at once all get
// the one the first of them wrote.
func TestSecretShared(t *testing.T) {
	c := etcdtest.Start(t, 1)
	ctx := context.Background()
	stores := []*etcdstore.Store{newStore(t, c, etcdstore.Options{}), newStore(t, c, etcdstore.Options{})}
	got := make([]string, 6)
	errs := make([]error, 6)
	var wg sync.WaitGroup
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], errs[i] = stores[i%2].Secret(ctx, "peer-token")
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for _, s := range got {
		if s != got[0] || len(s) != 64 {
			t.Fatalf("secrets %q", got)
		}
	}
	if other, err := stores[0].Secret(ctx, "other"); err != nil || other == got[0] {
		t.Errorf("another secret: %q, %v", other, err)
	}
}
