package etcdstore_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver/etcdstore"
	"github.com/otherix/otherix-agent/internal/etcdtest"
)

// TestOpenIndexMigration: tasks stored before the index of open tasks
// by node (no schema/opentask) are not invisible to a lease: opening
// the store builds the index from them, in batches past one
// transaction's operations, then marks it built; an entry that names
// an ended task is dropped at read.
func TestOpenIndexMigration(t *testing.T) {
	c := etcdtest.Start(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	const prefix = "/old/"
	put := func(id, node, status string) {
		t.Helper()
		b, _ := json.Marshal(cpserver.Task{Task: api.Task{ID: id, Type: api.TaskReset, Status: status}, Node: node})
		if _, err := cli.Put(ctx, prefix+"tasks/"+id, string(b)); err != nil {
			t.Fatal(err)
		}
	}
	var want []string
	for i := range 300 {
		id := fmt.Sprintf("t%03d", i)
		switch {
		case i%3 == 0:
			put(id, "n1", api.TaskPending)
			want = append(want, id)
		case i%3 == 1:
			put(id, "n2", api.TaskPending)
		default:
			put(id, "n1", api.TaskSuccess)
		}
	}
	s := newStore(t, c, etcdstore.Options{Prefix: prefix})
	if n, err := cli.Get(ctx, prefix+"schema/opentask", clientv3.WithCountOnly()); err != nil || n.Count != 1 {
		t.Fatalf("schema key after open: %v %v", n, err)
	}
	if n, err := cli.Get(ctx, prefix+"opentask/", clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil || n.Count != 200 {
		t.Fatalf("index entries: %v %v, want 200 (the open tasks)", n, err)
	}
	open, err := s.NodeUnfinished(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, x := range open {
		got = append(got, x.ID)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("n1's open tasks %v, want %v", got, want)
	}
	if all, err := s.Unfinished(ctx); err != nil || len(all) != 200 || all[0].ID != "t000" || all[1].ID != "t001" {
		t.Fatalf("every open task: %d %v", len(all), err)
	}
	// A stale entry (a task ended by a writer without the index) is
	// not answered, and is deleted.
	put(want[0], "n1", api.TaskFailed)
	if open, err = s.NodeUnfinished(ctx, "n1"); err != nil || len(open) != len(want)-1 || open[0].ID != want[1] {
		t.Fatalf("with a stale entry: %d tasks %v", len(open), err)
	}
	if n, _ := cli.Get(ctx, prefix+"opentask/n1/"+want[0], clientv3.WithCountOnly()); n.Count != 0 {
		t.Fatal("stale entry kept")
	}
	// Built once: a store opened again does not rebuild it.
	put("late", "n1", api.TaskPending)
	s2 := newStore(t, c, etcdstore.Options{Prefix: prefix})
	if open, err = s2.NodeUnfinished(ctx, "n1"); err != nil || len(open) != len(want)-1 {
		t.Fatalf("reopened: %d tasks %v, want %d", len(open), err, len(want)-1)
	}
}

// BenchmarkLeaseRead: what a lease of one node reads among 10,000 kept
// tasks (ended) and one open task on each of 1,000 nodes: its node's
// index (NodeUnfinished) beside the whole store (Tasks: what a lease
// and Unfinished read before the index) and every node's index
// (Unfinished), in the same run.
func BenchmarkLeaseRead(b *testing.B) {
	c := etcdtest.Start(b, 1)
	ctx := context.Background()
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	const prefix = "/bench/"
	var ops []clientv3.Op
	for i := range 11000 {
		st, node := api.TaskSuccess, fmt.Sprintf("n%d", i%1000)
		if i >= 10000 {
			st = api.TaskPending
		}
		id := fmt.Sprintf("t%05d", i)
		v, _ := json.Marshal(cpserver.Task{Task: api.Task{ID: id, Type: api.TaskReset, Status: st, VMUUID: id}, Node: node})
		ops = append(ops, clientv3.OpPut(prefix+"tasks/"+id, string(v)))
		if len(ops) == 100 {
			if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
				b.Fatal(err)
			}
			ops = ops[:0]
		}
	}
	s := etcdstore.New(cli, etcdstore.Options{Prefix: prefix, MaxTasks: 20000}) // builds the index
	defer s.Close()
	for _, bc := range []struct {
		name string
		read func() ([]cpserver.Task, error)
	}{
		{"whole-store", func() ([]cpserver.Task, error) { return s.Tasks(ctx) }},
		{"all-open", func() ([]cpserver.Task, error) { return s.Unfinished(ctx) }},
		{"node-index", func() ([]cpserver.Task, error) { return s.NodeUnfinished(ctx, "n7") }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := bc.read(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
