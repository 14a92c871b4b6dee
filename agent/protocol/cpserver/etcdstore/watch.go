package etcdstore

import (
	"context"
	"encoding/json"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Changed implements cpserver.Store: the channel is closed at the next
// change of a task, a lease (an expiry too) or the desired map, by any
// replica. Node heartbeats do not count: nobody waits on them, and at a
// thousand agents they would wake every long poll several times a
// second.
func (s *Store) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

// NodeChanged implements cpserver.Store: the channel is closed at the
// next change of a task of node or of no node, or an expiry of any
// task's lease (its key holds no node), by any replica.
func (s *Store) NodeChanged(node string) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nodeCh.Wait(node)
}

// notify wakes the waiters of Changed, and those of NodeChanged of nodes
// (of every node when all).
func (s *Store) notify(nodes map[string]bool, all bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	close(s.changed)
	s.changed = make(chan struct{})
	if all {
		s.nodeCh.WakeAll()
		return
	}
	for node := range nodes {
		s.nodeCh.Wake(node)
	}
}

// wakes sorts a watch response's events: wake says Changed's waiters
// wake; nodes are the nodes whose tasks changed, all that every node's
// long polls wake (a task of no node, an expired lease, a value that
// does not decode). A lease key deleted with its task's put (the task
// ended or got a new lease: one transaction, one revision, one watch
// response) is no expiry: the put wakes the task's node.
func (s *Store) wakes(events []*clientv3.Event) (wake bool, nodes map[string]bool, all bool) {
	tasks, leases := s.prefix+"tasks/", s.prefix+"leases/"
	nodes = map[string]bool{}
	type idRev struct {
		id  string
		rev int64
	}
	put := map[idRev]bool{}
	for _, ev := range events {
		if k := string(ev.Kv.Key); strings.HasPrefix(k, tasks) && ev.Type == clientv3.EventTypePut {
			put[idRev{strings.TrimPrefix(k, tasks), ev.Kv.ModRevision}] = true
		}
	}
	for _, ev := range events {
		k := string(ev.Kv.Key)
		switch {
		case strings.HasPrefix(k, s.prefix+"nodes/"), strings.HasPrefix(k, s.prefix+"alive/"),
			strings.HasPrefix(k, s.prefix+"opentask/"), strings.HasPrefix(k, s.prefix+"schema/"):
			continue
		case strings.HasPrefix(k, tasks) && ev.Type == clientv3.EventTypePut:
			var t struct {
				Node string `json:"node"`
			}
			if json.Unmarshal(ev.Kv.Value, &t) != nil || t.Node == "" {
				all = true
			} else {
				nodes[t.Node] = true
			}
		case strings.HasPrefix(k, leases) && ev.Type == clientv3.EventTypeDelete:
			all = all || !put[idRev{strings.TrimPrefix(k, leases), ev.Kv.ModRevision}]
		}
		wake = true
	}
	return wake, nodes, all
}

// watch follows the prefix until ctx ends. A broken watch (no leader, a
// member gone) wakes every waiter, who reads again, and is made anew.
func (s *Store) watch(ctx context.Context) {
	defer close(s.done)
	rev := s.startRev
	for ctx.Err() == nil {
		opts := []clientv3.OpOption{clientv3.WithPrefix()}
		if rev > 0 {
			opts = append(opts, clientv3.WithRev(rev+1))
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for resp := range s.cli.Watch(wctx, s.prefix, opts...) {
			if resp.CompactRevision > 0 {
				rev = 0 // what was missed is lost: waiters read again
			}
			if resp.Err() != nil {
				break
			}
			for _, ev := range resp.Events {
				rev = ev.Kv.ModRevision
			}
			if wake, nodes, all := s.wakes(resp.Events); wake {
				s.notify(nodes, all)
			}
		}
		cancel()
		s.notify(nil, true)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}
