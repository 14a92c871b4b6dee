package etcdstore

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// The index of unfinished tasks by node: opentask/<node>/<id> (empty
// value) exists while the task is not terminal, put and deleted in the
// transaction that changes the task. A lease reads its node's index and
// those tasks only, so its cost grows with the node's open tasks, not
// with the tasks kept. schema/opentask says the index was built: a store
// opened on tasks stored before the index builds it once (migrate).

// openBatch bounds the operations of one transaction (etcd's default
// --max-txn-ops is 128).
const openBatch = 100

func (s *Store) openPrefix(node string) string  { return s.prefix + "opentask/" + node + "/" }
func (s *Store) openKey(node, id string) string { return s.openPrefix(node) + id }
func (s *Store) schemaKey() string              { return s.prefix + "schema/opentask" }

// openOps are the index's operations for a task going from was (nil:
// new) to now.
func (s *Store) openOps(was *cpserver.Task, now cpserver.Task) []clientv3.Op {
	wasOpen, nowOpen := was != nil && !was.Terminal(), !now.Terminal()
	var ops []clientv3.Op
	if wasOpen && (!nowOpen || was.Node != now.Node) {
		ops = append(ops, clientv3.OpDelete(s.openKey(was.Node, now.ID)))
	}
	if nowOpen && (!wasOpen || was.Node != now.Node) {
		ops = append(ops, clientv3.OpPut(s.openKey(now.Node, now.ID), ""))
	}
	return ops
}

// migrate builds the index from the stored tasks unless schema/opentask
// says it was built, then sets it. Several replicas migrating at once
// write the same keys. A task that ends while it runs may keep an entry:
// NodeUnfinished drops entries whose task is not open on their node.
func (s *Store) migrate(ctx context.Context) error {
	s.idxMu.Lock()
	defer s.idxMu.Unlock()
	if s.indexed {
		return nil
	}
	resp, err := s.cli.Get(ctx, s.schemaKey(), clientv3.WithCountOnly())
	if err != nil {
		return err
	}
	if resp.Count == 0 {
		if err := s.buildIndex(ctx); err != nil {
			return err
		}
	}
	s.indexed = true
	return nil
}

// buildIndex puts an index entry for every open task, in batches, then
// the schema key.
func (s *Store) buildIndex(ctx context.Context) error {
	resp, err := s.cli.Get(ctx, s.prefix+"tasks/", clientv3.WithPrefix())
	if err != nil {
		return err
	}
	var ops []clientv3.Op
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		_, err := s.cli.Txn(ctx).Then(ops...).Commit()
		ops = ops[:0]
		return err
	}
	for _, kv := range resp.Kvs {
		var t cpserver.Task
		if json.Unmarshal(kv.Value, &t) != nil || t.Terminal() {
			continue
		}
		ops = append(ops, clientv3.OpPut(s.openKey(t.Node, t.ID), ""))
		if len(ops) == openBatch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	_, err = s.cli.Put(ctx, s.schemaKey(), "1")
	return err
}

// openEntry is an index entry as read.
type openEntry struct {
	node, id string
	rev      int64 // the entry's mod revision
}

// NodeUnfinished implements cpserver.Store: the index of node and that
// of no node, then those tasks and their lease keys, in batches.
func (s *Store) NodeUnfinished(ctx context.Context, node string) ([]cpserver.Task, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	if err := s.migrate(ctx); err != nil {
		return nil, wrap(ctx, err)
	}
	nodes := []string{node}
	if node != "" {
		nodes = append(nodes, "")
	}
	var ops []clientv3.Op
	for _, n := range nodes {
		ops = append(ops, clientv3.OpGet(s.openPrefix(n), clientv3.WithPrefix(), clientv3.WithKeysOnly()))
	}
	resp, err := s.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return nil, wrap(ctx, err)
	}
	var entries []openEntry
	for i, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().Kvs {
			id := strings.TrimPrefix(string(kv.Key), s.openPrefix(nodes[i]))
			if strings.Contains(id, "/") {
				continue // a node whose name extends this one's with "/"
			}
			entries = append(entries, openEntry{node: nodes[i], id: id, rev: kv.ModRevision})
		}
	}
	out, err := s.openTasks(ctx, entries)
	return out, wrap(ctx, err)
}

// Unfinished implements cpserver.Store: every node's index, then those
// tasks, rather than every kept task.
func (s *Store) Unfinished(ctx context.Context) ([]cpserver.Task, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	if err := s.migrate(ctx); err != nil {
		return nil, wrap(ctx, err)
	}
	all := s.prefix + "opentask/"
	resp, err := s.cli.Get(ctx, all, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, wrap(ctx, err)
	}
	entries := make([]openEntry, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		// Task ids hold no "/"; a node name may.
		rest := strings.TrimPrefix(string(kv.Key), all)
		i := strings.LastIndex(rest, "/")
		if i < 0 {
			continue
		}
		entries = append(entries, openEntry{node: rest[:i], id: rest[i+1:], rev: kv.ModRevision})
	}
	out, err := s.openTasks(ctx, entries)
	return out, wrap(ctx, err)
}

// openTasks reads the tasks of entries, oldest first, and drops the
// entries whose task is gone, ended or on another node.
func (s *Store) openTasks(ctx context.Context, entries []openEntry) ([]cpserver.Task, error) {
	type read struct {
		t   cpserver.Task
		rev int64 // the task's create revision: queue order
	}
	var got []read
	var stale []openEntry
	now := time.Now()
	for len(entries) > 0 {
		batch := entries[:min(len(entries), openBatch/2)]
		entries = entries[len(batch):]
		ops := make([]clientv3.Op, 0, 2*len(batch))
		for _, e := range batch {
			ops = append(ops, clientv3.OpGet(s.taskKey(e.id)), clientv3.OpGet(s.leaseKey(e.id)))
		}
		resp, err := s.cli.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return nil, err
		}
		for i, e := range batch {
			tk := resp.Responses[2*i].GetResponseRange().Kvs
			if len(tk) == 0 {
				stale = append(stale, e)
				continue
			}
			var t cpserver.Task
			if err := json.Unmarshal(tk[0].Value, &t); err != nil {
				return nil, fmt.Errorf("task %s: %w", e.id, err)
			}
			if t.Terminal() || t.Node != e.node {
				stale = append(stale, e)
				continue
			}
			var lease *leaseVal
			if lk := resp.Responses[2*i+1].GetResponseRange().Kvs; len(lk) == 1 {
				if v, err := parseLease(lk[0].Value); err == nil {
					lease = &v
				}
			}
			overlay(&t, lease, now)
			got = append(got, read{t, tk[0].CreateRevision})
		}
	}
	s.dropStale(ctx, stale)
	slices.SortFunc(got, func(a, b read) int { return cmp.Compare(a.rev, b.rev) })
	out := make([]cpserver.Task, len(got))
	for i, r := range got {
		out[i] = r.t
	}
	return out, nil
}

// dropStale deletes index entries that name no open task of their node,
// each unless it was written again meanwhile (best effort: the next
// read drops what this one did not).
func (s *Store) dropStale(ctx context.Context, stale []openEntry) {
	for _, e := range stale {
		key := s.openKey(e.node, e.id)
		s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", e.rev)).
			Then(clientv3.OpDelete(key)).Commit()
	}
}
