package cpserver_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// readCounter is a Store that records which tasks its callers read.
type readCounter struct {
	cpserver.Store
	mu    sync.Mutex
	scans int             // calls of Tasks and Unfinished: every task
	read  map[string]bool // ids NodeUnfinished and UpdateTask touched
}

func (r *readCounter) Tasks(ctx context.Context) ([]cpserver.Task, error) {
	r.mu.Lock()
	r.scans++
	r.mu.Unlock()
	return r.Store.Tasks(ctx)
}

func (r *readCounter) Unfinished(ctx context.Context) ([]cpserver.Task, error) {
	r.mu.Lock()
	r.scans++
	r.mu.Unlock()
	return r.Store.Unfinished(ctx)
}

func (r *readCounter) NodeUnfinished(ctx context.Context, node string) ([]cpserver.Task, error) {
	ts, err := r.Store.NodeUnfinished(ctx, node)
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, t := range ts {
		r.read[t.ID] = true
	}
	return ts, err
}

func (r *readCounter) UpdateTask(ctx context.Context, id string, fn func(*cpserver.Task) error) (cpserver.Task, error) {
	r.mu.Lock()
	r.read[id] = true
	r.mu.Unlock()
	return r.Store.UpdateTask(ctx, id, fn)
}

// TestLeaseReadsOnlyItsNode: among many finished tasks and other nodes'
// open ones, a lease of n1 reads only n1's open tasks and those of no
// node (the store's index by node), never the whole store, and gets
// them in queue order; the index follows a create, completion, a node
// change and a re-queue.
func TestLeaseReadsOnlyItsNode(t *testing.T) {
	for name, mk := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			st := mk()
			add := func(node, status string) string {
				t.Helper()
				id := uuid.NewString()
				if err := st.AddTask(ctx, cpserver.Task{Task: api.Task{ID: id, Type: api.TaskReset, Status: status}, Node: node}); err != nil {
					t.Fatal(err)
				}
				return id
			}
			var mine []string
			for i := range 400 {
				node := fmt.Sprintf("n%d", 2+i%20)
				if i%8 == 0 {
					add(node, api.TaskPending) // other nodes' open tasks
				} else {
					add(node, api.TaskSuccess)
				}
				if i%100 == 50 {
					mine = append(mine, add("n1", api.TaskPending))
				}
			}
			// A create stored with its VM (AddCreate) is indexed too.
			cr, u := uuid.NewString(), uuid.NewString()
			if err := st.AddCreate(ctx, cpserver.Task{Task: api.Task{ID: cr, Type: api.TaskCreate, Status: api.TaskPending, VMUUID: u}, Node: "n1"},
				cpserver.VM{UUID: u, Name: "vm-" + u[:8], Phase: api.PhaseRunning, Node: "n1"}, nil); err != nil {
				t.Fatal(err)
			}
			mine = append(mine, cr, add("", api.TaskPending))
			moved := add("n2", api.TaskPending)
			ended := add("n1", api.TaskPending)

			rc := &readCounter{Store: st, read: map[string]bool{}}
			srv := &cpserver.Server{Store: rc, Token: "tok"}
			// The index follows a completion and a node change.
			if _, err := rc.Store.UpdateTask(ctx, ended, func(x *cpserver.Task) error { x.Status = api.TaskCancelled; return nil }); err != nil {
				t.Fatal(err)
			}
			if _, err := rc.Store.UpdateTask(ctx, moved, func(x *cpserver.Task) error { x.Node = "n1"; return nil }); err != nil {
				t.Fatal(err)
			}
			mine = append(mine, moved)
			resp, err := srv.Lease(ctx, protocol.LeaseRequest{Node: "n1", Max: 10})
			if err != nil {
				t.Fatal(err)
			}
			if got := ids(resp.Tasks); fmt.Sprint(got) != fmt.Sprint(mine) {
				t.Fatalf("leased %v, want %v in queue order", got, mine)
			}
			want := map[string]bool{}
			for _, id := range mine {
				want[id] = true
			}
			if rc.scans != 0 {
				t.Fatalf("the lease read every task %d times", rc.scans)
			}
			for id := range rc.read {
				if !want[id] {
					t.Fatalf("the lease of n1 read task %s of another node or ended", id)
				}
			}
			// Ended, then queued again: back in n1's index, in its place.
			if _, err := rc.Store.UpdateTask(ctx, mine[0], func(x *cpserver.Task) error { x.Status = api.TaskSuccess; return nil }); err != nil {
				t.Fatal(err)
			}
			open, err := st.NodeUnfinished(ctx, "n1")
			if err != nil || len(open) != 0 && open[0].ID == mine[0] {
				t.Fatalf("after completion: %v %v", ids2(open), err)
			}
			if _, err := rc.Store.UpdateTask(ctx, mine[0], func(x *cpserver.Task) error { x.Status = api.TaskPending; return nil }); err != nil {
				t.Fatal(err)
			}
			if open, err = st.NodeUnfinished(ctx, "n1"); err != nil || fmt.Sprint(ids2(open)) != fmt.Sprint(mine) {
				t.Fatalf("after re-queue: %v %v, want %v", ids2(open), err, mine)
			}
		})
	}
}

func ids(ts []protocol.Task) []string {
	out := []string{}
	for _, t := range ts {
		out = append(out, t.ID)
	}
	return out
}

func ids2(ts []cpserver.Task) []string {
	out := []string{}
	for _, t := range ts {
		out = append(out, t.ID)
	}
	return out
}
