package cpserver_test

import (
	"bytes"
	"compress/gzip"
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

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// stores are the Store implementations every behaviour is checked on.
func stores(t *testing.T) map[string]func() cpserver.Store {
	dir := t.TempDir()
	n := 0
	return map[string]func() cpserver.Store{
		"etcd": func() cpserver.Store {
			n++
			return etcdStore(t, fmt.Sprintf("/test/%s/%d/", t.Name(), n))
		},
		"mem": func() cpserver.Store { return &cpserver.MemStore{} },
		"file": func() cpserver.Store {
			fs, err := cpserver.NewFileStore(filepath.Join(dir, t.Name()+".json"), nil)
			if err != nil {
				t.Fatal(err)
			}
			return fs
		},
	}
}

func client(t *testing.T, url, token string) *protocol.Client {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := protocol.NewClient(protocol.ClientConfig{BaseURL: url, Node: "n1", TokenFile: p})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestLeaseLifecycle: a task goes pending → leased → extended →
// redelivered → expired and re-leased → completed, over real HTTP, the
// same on every store.
func TestLeaseLifecycle(t *testing.T) {
	for name, mk := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			srv := &cpserver.Server{Store: mk(), Token: "tok", LeaseTTL: 45 * time.Second}
			ts := httptest.NewServer(srv)
			defer ts.Close()
			c := client(t, ts.URL, "tok")

			// A long poll answers as soon as a task is queued (before or
			// while it waits).
			got := make(chan *protocol.LeaseResponse, 1)
			errc := make(chan error, 1)
			go func() {
				resp, err := c.Lease(ctx, 20*time.Second, 4)
				got <- resp
				errc <- err
			}()
			task, err := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStop, VMName: "v", VMUUID: "u"}, Spec: json.RawMessage(`{"force":true}`)})
			if err != nil {
				t.Fatal(err)
			}
			resp := <-got
			if err := <-errc; err != nil || len(resp.Tasks) != 1 {
				t.Fatalf("lease: %+v %v", resp, err)
			}
			tk := resp.Tasks[0]
			if tk.ID != task.ID || tk.Attempt != 1 || tk.LeaseID == "" || tk.LeaseTTLSeconds != 45 || string(tk.Spec) != `{"force":true}` {
				t.Errorf("leased %+v", tk)
			}
			if resp, err := c.Lease(ctx, 0, 4); err != nil || len(resp.Tasks) != 0 {
				t.Errorf("nothing more: %+v %v", resp, err)
			}
			pr, err := c.Progress(ctx, tk.ID, tk.LeaseID, &api.Progress{Phase: "p", Done: 1, Total: 2})
			if err != nil || pr.LeaseTTLSeconds != 45 || pr.Cancelled {
				t.Errorf("progress: %+v %v", pr, err)
			}
			if rec, _ := srv.Task(ctx, tk.ID); rec.Progress == nil || rec.Progress.Phase != "p" {
				t.Errorf("progress not recorded: %+v", rec.Progress)
			}
			// A redelivery carries the same lease.
			srv.Redeliver(ctx, tk.ID)
			if resp, _ := c.Lease(ctx, 0, 4); len(resp.Tasks) != 1 || resp.Tasks[0].LeaseID != tk.LeaseID || resp.Tasks[0].Attempt != 1 {
				t.Errorf("redelivery: %+v", resp)
			}
			// Expiry: a new lease, the next attempt; the old lease is lost.
			srv.Expire(ctx, tk.ID)
			if _, err := c.Progress(ctx, tk.ID, tk.LeaseID, nil); !isStatus(err, http.StatusConflict) {
				t.Errorf("progress on an expired lease: %v", err)
			}
			resp2, _ := c.Lease(ctx, 0, 4)
			if len(resp2.Tasks) != 1 || resp2.Tasks[0].LeaseID == tk.LeaseID || resp2.Tasks[0].Attempt != 2 {
				t.Fatalf("after expiry: %+v", resp2)
			}
			// Cancel reaches the agent through progress.
			srv.Cancel(ctx, tk.ID)
			if pr, err := c.Progress(ctx, tk.ID, resp2.Tasks[0].LeaseID, nil); err != nil || !pr.Cancelled {
				t.Errorf("progress after cancel: %+v %v", pr, err)
			}
			// A completion on the older lease is the truth; a repeat is
			// acknowledged and changes nothing.
			done := protocol.CompleteRequest{LeaseID: tk.LeaseID, Attempt: 1, Status: api.TaskSuccess, VM: &api.VM{Name: "v", Status: api.StatusStopped}}
			for range 2 {
				if err := c.Complete(ctx, tk.ID, done); err != nil {
					t.Fatal(err)
				}
			}
			final, _ := srv.Wait(ctx, tk.ID)
			if final.Status != api.TaskSuccess || final.Result == nil || final.Spec != nil || final.Deliveries != 3 {
				t.Errorf("final %+v", final)
			}
			if err := c.Complete(ctx, "never-issued", done); !isStatus(err, http.StatusNotFound) {
				t.Errorf("completion of an unknown task: %v", err)
			}
			// A task cancelled while pending is never offered.
			p, _ := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStart, VMName: "v", VMUUID: "u"}})
			if c, _ := srv.Cancel(ctx, p.ID); c.Status != api.TaskCancelled {
				t.Errorf("cancelled pending: %+v", c)
			}
			if resp, _ := c.Lease(ctx, 0, 4); len(resp.Tasks) != 0 {
				t.Errorf("cancelled task offered: %+v", resp)
			}
		})
	}
}

func isStatus(err error, code int) bool {
	var h *protocol.HTTPError
	return errors.As(err, &h) && h.StatusCode == code
}

// TestDesiredAndAdoption: no opinion until a desired map exists; desired
// phases follow tasks; a heartbeat's unknown VM is adopted as it is.
func TestDesiredAndAdoption(t *testing.T) {
	for name, mk := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			srv := &cpserver.Server{Store: mk(), DesiredFollowsTasks: true, AdoptUnknownVMs: name == "file", HeartbeatInterval: 7 * time.Second}
			hb, err := srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n1"})
			if err != nil || hb.IntervalSeconds != 7 || (name != "file") != (hb.Desired == nil) {
				t.Fatalf("first heartbeat: %+v %v", hb, err)
			}
			create, _ := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskCreate, VMName: "a", VMUUID: "ua"}})
			srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStop, VMName: "b", VMUUID: "ub"}})
			hb, _ = srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n1", VMs: []protocol.VMStatus{{Name: "c", UUID: "uc", Status: api.StatusPaused}}})
			want := map[string]string{"ua": api.PhaseRunning, "ub": api.PhaseStopped}
			if name == "file" {
				want["uc"] = api.PhaseRunning
			}
			if !equal(hb.Desired, want) {
				t.Errorf("desired %v, want %v", hb.Desired, want)
			}
			if id, ok := srv.UUIDOf(ctx, "a"); !ok || id != "ua" {
				t.Errorf("UUIDOf(a) = %q %v", id, ok)
			}
			// A failed create forgets its VM.
			srv.Lease(ctx, protocol.LeaseRequest{Max: 1})
			if _, err := srv.Complete(ctx, create.ID, protocol.CompleteRequest{Status: api.TaskFailed}); err != nil {
				t.Fatal(err)
			}
			hb, _ = srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n1"})
			if _, ok := hb.Desired["ua"]; ok {
				t.Errorf("failed create still desired: %v", hb.Desired)
			}
		})
	}
}

func equal(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestFileStoreRestart: tasks and the desired map survive a new store on
// the same file; a sealed spec opens again with the sealer.
func TestFileStoreRestart(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "state.json")
	fs, err := cpserver.NewFileStore(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	fs.SetSealer(rot13{})
	srv := &cpserver.Server{Store: fs, DesiredFollowsTasks: true}
	task, _ := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskCreate, VMName: "a", VMUUID: "ua"}, Spec: json.RawMessage(`{"user_data":"secret-marker"}`)})
	b, _ := os.ReadFile(path)
	if strings.Contains(string(b), "secret-marker") {
		t.Fatalf("spec in clear at rest: %s", b)
	}
	fs2, err := cpserver.NewFileStore(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := fs2.SetSealer(rot13{}); err != nil {
		t.Fatal(err)
	}
	got, err := fs2.Task(ctx, task.ID)
	if err != nil || !strings.Contains(string(got.Spec), "secret-marker") || got.Status != api.TaskPending {
		t.Fatalf("after restart: %+v %v", got, err)
	}
	if vms, known, _ := fs2.VMs(ctx); !known || len(vms) != 1 || vms[0].Name != "a" || vms[0].Phase != api.PhaseRunning {
		t.Fatalf("desired after restart: %+v %v", vms, known)
	}
}

// TestFileStoreConcurrentChanges: changes made at once (a fleet's first
// heartbeats adopting their VMs, tasks queued and ended meanwhile) share
// the file's writes, and every one of them is in the file when its call
// returns.
func TestFileStoreConcurrentChanges(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "state.json")
	fs, err := cpserver.NewFileStore(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv := &cpserver.Server{Store: fs}
	const n = 100
	errs := make(chan error, 3*n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs <- fs.PutVM(ctx, cpserver.VM{UUID: fmt.Sprintf("u%03d", i), Phase: api.PhaseRunning}) })
		wg.Go(func() {
			task, err := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{ID: fmt.Sprintf("t%03d", i), Type: api.TaskStop, VMUUID: "x"}})
			if err == nil && i%2 == 0 {
				_, err = srv.Cancel(ctx, task.ID)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	fs2, err := cpserver.NewFileStore(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if vms, _, _ := fs2.VMs(ctx); len(vms) != n {
		t.Errorf("%d VMs in the file, want %d", len(vms), n)
	}
	tasks, _ := fs2.Tasks(ctx)
	cancelled := 0
	for _, tk := range tasks {
		if tk.Status == api.TaskCancelled {
			cancelled++
		}
	}
	if len(tasks) != n || cancelled != n/2 {
		t.Errorf("%d tasks (%d cancelled) in the file, want %d (%d)", len(tasks), cancelled, n, n/2)
	}
}

type rot13 struct{}

func (rot13) Seal(plain, purpose string) (string, error)  { return rot(plain), nil }
func (rot13) Open(sealed, purpose string) (string, error) { return rot(sealed), nil }

func rot(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z':
			return 'a' + (r-'a'+13)%26
		case r >= 'A' && r <= 'Z':
			return 'A' + (r-'A'+13)%26
		}
		return r
	}, s)
}

// TestHTTPEdges: token, gzip bodies, 429 with Retry-After, bad status.
func TestHTTPEdges(t *testing.T) {
	ctx := context.Background()
	srv := &cpserver.Server{Token: "tok", MaxPendingTasks: 1}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	if _, err := client(t, ts.URL, "bad").Heartbeat(ctx, protocol.HeartbeatRequest{}); !protocol.IsAuth(err) {
		t.Errorf("bad token: %v", err)
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write([]byte(`{"protocol_version":1,"node":"n1","seq":1,"state":"ready","vms":[]}`))
	zw.Close()
	req, _ := http.NewRequest("POST", ts.URL+protocol.PathHeartbeat, &buf)
	req.Header.Set("Authorization", "Bearer tok")
	req.Header.Set("Content-Encoding", "gzip")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("gzip heartbeat: %v %v", resp, err)
	}
	resp.Body.Close()
	if nodes, _ := srv.Nodes(ctx); len(nodes) != 1 || nodes[0].Name != "n1" {
		t.Errorf("nodes %+v", nodes)
	}
	srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStart, VMUUID: "u"}})
	_, err = srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStart, VMUUID: "u"}})
	var busy *cpserver.TooManyTasksError
	if !errors.As(err, &busy) {
		t.Errorf("over the limit: %v", err)
	}
	if _, err := srv.Complete(ctx, "whatever", protocol.CompleteRequest{Status: "done"}); !errors.Is(err, cpserver.ErrBadStatus) {
		t.Errorf("bad status: %v", err)
	}
}

// TestNodeScoped: a task goes only to its node's lease requests (an
// unscoped one to any), a heartbeat's desired map holds only its node's
// VMs, and with NodeScoped an adopted VM belongs to the node that
// reported it.
func TestNodeScoped(t *testing.T) {
	for name, mk := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			srv := &cpserver.Server{Store: mk(), DesiredFollowsTasks: true, AdoptUnknownVMs: true, NodeScoped: true}
			t1, _ := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskCreate, VMName: "a", VMUUID: "ua"}, Node: "n1"})
			t2, _ := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskCreate, VMName: "b", VMUUID: "ub"}, Node: "n2"})
			// A stop without a node keeps the VM on its node.
			t3, _ := srv.Enqueue(ctx, cpserver.Task{Task: api.Task{Type: api.TaskStop, VMName: "b", VMUUID: "ub"}})
			got := func(node string) []string {
				resp, err := srv.Lease(ctx, protocol.LeaseRequest{Node: node, Max: 10})
				if err != nil {
					t.Fatal(err)
				}
				var ids []string
				for _, tk := range resp.Tasks {
					ids = append(ids, tk.ID)
				}
				return ids
			}
			if ids := got("n1"); len(ids) != 2 || ids[0] != t1.ID || ids[1] != t3.ID {
				t.Errorf("n1 leased %v, want %s %s", ids, t1.ID, t3.ID)
			}
			if ids := got("n2"); len(ids) != 1 || ids[0] != t2.ID {
				t.Errorf("n2 leased %v, want %s", ids, t2.ID)
			}
			hb, _ := srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n2", VMs: []protocol.VMStatus{{Name: "c", UUID: "uc", Status: api.StatusRunning}}})
			if want := map[string]string{"ub": api.PhaseStopped, "uc": api.PhaseRunning}; !equal(hb.Desired, want) {
				t.Errorf("n2 desired %v, want %v", hb.Desired, want)
			}
			hb, _ = srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n1"})
			if want := map[string]string{"ua": api.PhaseRunning}; !equal(hb.Desired, want) {
				t.Errorf("n1 desired %v, want %v", hb.Desired, want)
			}
		})
	}
}

// TestNodeRecordAndMovedVM: a heartbeat without node_info keeps the
// registered one and records its VMs; a VM placed on another node leaves
// the first node's answer, and a heartbeat still reporting it does not
// adopt it back.
func TestNodeRecordAndMovedVM(t *testing.T) {
	for name, mk := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			srv := &cpserver.Server{Store: mk(), DesiredFollowsTasks: true, AdoptUnknownVMs: true, NodeScoped: true}
			if _, err := srv.Register(ctx, protocol.RegisterRequest{Node: protocol.NodeInfo{Name: "n1", CPUs: 8}}); err != nil {
				t.Fatal(err)
			}
			running := []protocol.VMStatus{{Name: "a", UUID: "ua", Status: api.StatusRunning}}
			hb, err := srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n1", State: protocol.NodeReady, VMs: running})
			if want := map[string]string{"ua": api.PhaseRunning}; err != nil || !equal(hb.Desired, want) {
				t.Fatalf("adopting heartbeat: %v %v, want %v", hb.Desired, err, want)
			}
			nodes, err := srv.Nodes(ctx)
			if err != nil || len(nodes) != 1 || nodes[0].Info == nil || nodes[0].Info.CPUs != 8 || len(nodes[0].VMs) != 1 || nodes[0].State != protocol.NodeReady {
				t.Fatalf("nodes %+v %v", nodes, err)
			}
			// node_info again when it changed.
			srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n1", State: protocol.NodeReady, VMs: running, NodeInfo: &protocol.NodeInfo{Name: "n1", CPUs: 16}})
			if nodes, _ = srv.Nodes(ctx); nodes[0].Info == nil || nodes[0].Info.CPUs != 16 {
				t.Errorf("node_info not recorded: %+v", nodes[0].Info)
			}
			if err := srv.SetDesired(ctx, cpserver.VM{UUID: "ua", Name: "a", Phase: api.PhaseStopped, Node: "n2"}); err != nil {
				t.Fatal(err)
			}
			hb, _ = srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n1", State: protocol.NodeReady, VMs: running})
			if len(hb.Desired) != 0 || hb.Desired == nil {
				t.Errorf("n1 desired %v after the VM moved, want {}", hb.Desired)
			}
			hb, _ = srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n2", State: protocol.NodeReady})
			if want := map[string]string{"ua": api.PhaseStopped}; !equal(hb.Desired, want) {
				t.Errorf("n2 desired %v, want %v", hb.Desired, want)
			}
			if node := srv.NodeOf(ctx, "ua"); node != "n2" {
				t.Errorf("NodeOf(ua) = %q, want n2", node)
			}
			if err := srv.SetDesired(ctx, cpserver.VM{UUID: "ua"}); err != nil {
				t.Fatal(err)
			}
			if hb, _ = srv.Heartbeat(ctx, protocol.HeartbeatRequest{Node: "n2", State: protocol.NodeReady}); len(hb.Desired) != 0 {
				t.Errorf("n2 desired %v after the VM was forgotten", hb.Desired)
			}
		})
	}
}
