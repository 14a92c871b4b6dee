package etcdstore

import (
	"context"
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

func (s *Store) notify() {
	s.mu.Lock()
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
}

// watch follows the prefix until ctx ends. A broken watch (no leader, a
// member gone) wakes every waiter, who reads again, and is made anew.
func (s *Store) watch(ctx context.Context) {
	defer close(s.done)
	nodes, alive := s.prefix+"nodes/", s.prefix+"alive/"
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
			wake := false
			for _, ev := range resp.Events {
				rev = ev.Kv.ModRevision
				k := string(ev.Kv.Key)
				wake = wake || !strings.HasPrefix(k, nodes) && !strings.HasPrefix(k, alive)
			}
			if wake {
				s.notify()
			}
		}
		cancel()
		s.notify()
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}
