// Package etcdstore is a cpserver.Store in etcd: the state of a control
// plane that several stateless replicas (one per host in cluster mode)
// serve at once.
//
// Layout under the store's prefix:
//
//	tasks/<id>    a task (JSON), listed in creation order (create revision)
//	leases/<id>   the task's current lease id, attached to an etcd lease
//	vms/<uuid>    a VM of the desired map (JSON)
//	vmnode/<node>/<uuid>  the same VM, indexed by its node ("" for none)
//	vmname/<name> the same VM, indexed by its name: the VM holding it
//	placed/<node> rewritten by each create placed on the node, so that
//	              two creates checked against the node's capacity at
//	              once cannot both be stored
//	opentask/<node>/<id>  present while the task is not terminal: the
//	              open tasks of a node ("" for none), which a lease reads
//	schema/opentask  present once opentask/ was built from the tasks
//	vms-known     present once the desired map exists ("an opinion")
//	nodes/<name>  a node's registration and last heartbeat that changed
//	              it (JSON), rewritten at least every NodeRefresh
//	alive/<name>  present while the node's heartbeats keep its lease
//	secrets/<n>   a secret the replicas share (the peer token)
//
// Every read-modify-write is a transaction conditioned on the revisions
// it read, so replicas never overwrite each other's changes. A task's
// lease is an etcd lease: it lives while etcd says so, and an expired one
// deletes its key. No replica compares its clock with another's: a
// record's lease expiry is rewritten on read from the key's presence.
package etcdstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// DefaultMaxTasks is how many tasks a store keeps: past it the oldest
// terminal ones are deleted.
const DefaultMaxTasks = 10000

// DefaultOpTimeout bounds one store operation: without quorum etcd does
// not answer, and a caller gets an error rather than a hang.
const DefaultOpTimeout = 5 * time.Second

// Store is a cpserver.Store in etcd. Make it with New; Close it.
type Store struct {
	cli       *clientv3.Client
	prefix    string
	maxTasks  int
	opTimeout time.Duration
	nodeTTL   int64 // seconds
	refresh   time.Duration

	mu      sync.Mutex
	changed chan struct{}
	nodeCh  cpserver.NodeWaiters

	idxMu   sync.Mutex
	indexed bool // schema/opentask seen or written (migrate)

	stop     context.CancelFunc
	done     chan struct{}
	startRev int64 // the revision the watch follows from
}

// Options tune a Store.
type Options struct {
	// Prefix is the key prefix of the store's state; default "/otherix/".
	Prefix string
	// MaxTasks bounds the tasks kept; default DefaultMaxTasks.
	MaxTasks int
	// OpTimeout bounds one operation; default DefaultOpTimeout.
	OpTimeout time.Duration
	// NodeTTL is how long a node stays alive after its last heartbeat
	// (an etcd lease); default DefaultNodeTTL.
	NodeTTL time.Duration
	// NodeRefresh is how old a node's record may grow while its
	// heartbeats change nothing but their time and usage samples: each
	// such heartbeat only keeps the node's liveness lease; the record
	// is rewritten once it is NodeRefresh old. Default
	// DefaultNodeRefresh.
	NodeRefresh time.Duration
}

// DefaultNodeRefresh bounds the age of a node's record (its
// last_heartbeat and usage samples) while it is alive.
const DefaultNodeRefresh = 5 * time.Minute

// DefaultNodeTTL is three heartbeats at cpserver's default interval.
const DefaultNodeTTL = 3 * cpserver.DefaultHeartbeatInterval

// New returns a store on cli (which the caller closes after the store)
// and starts watching it for Changed. It does not need etcd up: without
// it, operations fail with ErrUnavailable until it answers.
func New(cli *clientv3.Client, o Options) *Store {
	if o.Prefix == "" {
		o.Prefix = "/otherix/"
	}
	if !strings.HasSuffix(o.Prefix, "/") {
		o.Prefix += "/"
	}
	if o.MaxTasks <= 0 {
		o.MaxTasks = DefaultMaxTasks
	}
	if o.OpTimeout <= 0 {
		o.OpTimeout = DefaultOpTimeout
	}
	if o.NodeTTL < time.Second {
		o.NodeTTL = DefaultNodeTTL
	}
	if o.NodeRefresh <= 0 {
		o.NodeRefresh = DefaultNodeRefresh
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Store{cli: cli, prefix: o.Prefix, maxTasks: o.MaxTasks, opTimeout: o.OpTimeout, nodeTTL: int64(o.NodeTTL / time.Second), refresh: o.NodeRefresh,
		changed: make(chan struct{}), stop: cancel, done: make(chan struct{})}
	// Changes from now on wake Changed's waiters, even those made before
	// the watch is established.
	rctx, rcancel := s.op(ctx)
	if resp, err := cli.Get(rctx, s.prefix+"vms-known", clientv3.WithCountOnly()); err == nil {
		s.startRev = resp.Header.Revision
	}
	// Tasks stored before the index get their entries (again at the
	// first lease when etcd does not answer now).
	_ = s.migrate(rctx)
	rcancel()
	go s.watch(ctx)
	return s
}

// Close stops the store's watch.
func (s *Store) Close() error {
	s.stop()
	<-s.done
	return nil
}

// op bounds an operation. A member without a leader refuses it at once
// (WithRequireLeader) rather than queueing a proposal that a returning
// quorum would still apply after the caller was told it failed.
func (s *Store) op(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(clientv3.WithRequireLeader(ctx), s.opTimeout)
}

// wrap marks errors of an unreachable etcd (no quorum, no member
// reachable, no answer in time) with cpserver.ErrUnavailable.
func wrap(ctx context.Context, err error) error {
	if err == nil || !unavailable(ctx, err) {
		return err
	}
	return fmt.Errorf("%w: %w", cpserver.ErrUnavailable, err)
}

func unavailable(ctx context.Context, err error) bool {
	if ctx.Err() != nil || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return ee.Code() == codes.Unavailable || ee.Code() == codes.DeadlineExceeded
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded:
		return true
	}
	return false
}

func (s *Store) taskKey(id string) string  { return s.prefix + "tasks/" + id }
func (s *Store) leaseKey(id string) string { return s.prefix + "leases/" + id }
func (s *Store) vmKey(uuid string) string  { return s.prefix + "vms/" + uuid }

// vmNodeKey indexes a VM under its node; vmNodePrefix lists a node's.
// A node name holding "/" may list another's too: readers check Node.
func (s *Store) vmNodeKey(v cpserver.VM) string { return s.vmNodePrefix(v.Node) + v.UUID }
func (s *Store) vmNodePrefix(node string) string {
	return s.prefix + "vmnode/" + node + "/"
}
func (s *Store) nodeKey(name string) string {
	return s.prefix + "nodes/" + name
}

// AddTask implements cpserver.Store.
func (s *Store) AddTask(ctx context.Context, t cpserver.Task) error {
	b, err := json.Marshal(t)
	if err != nil {
		return err
	}
	ctx, cancel := s.op(ctx)
	defer cancel()
	key := s.taskKey(t.ID)
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(append([]clientv3.Op{clientv3.OpPut(key, string(b))}, s.openOps(nil, t)...)...).
		Commit()
	if err != nil {
		return wrap(ctx, err)
	}
	if !resp.Succeeded {
		return cpserver.ErrExists
	}
	return wrap(ctx, s.prune(ctx))
}

// prune deletes the oldest terminal tasks down to 9/10 of maxTasks once
// there are more than maxTasks.
func (s *Store) prune(ctx context.Context) error {
	n, err := s.cli.Get(ctx, s.prefix+"tasks/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil || n.Count <= int64(s.maxTasks) {
		return err
	}
	over := int(n.Count) - s.maxTasks*9/10
	resp, err := s.cli.Get(ctx, s.prefix+"tasks/", clientv3.WithPrefix(),
		clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend))
	if err != nil {
		return err
	}
	for _, kv := range resp.Kvs {
		if over == 0 {
			break
		}
		var t cpserver.Task
		if json.Unmarshal(kv.Value, &t) != nil || !t.Terminal() {
			continue
		}
		key := string(kv.Key)
		if _, err := s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).
			Then(clientv3.OpDelete(key)).Commit(); err != nil {
			return err
		}
		over--
	}
	return nil
}

// Task implements cpserver.Store.
func (s *Store) Task(ctx context.Context, id string) (cpserver.Task, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	t, _, err := s.read(ctx, id)
	return t, wrap(ctx, err)
}

// taskRead is a task as read, with what a conditioned write needs.
type taskRead struct {
	rev      int64 // the task key's mod revision
	leaseRev int64 // the lease key's mod revision; 0: none
	etcdID   clientv3.LeaseID
	ttl      int64 // the etcd lease's granted TTL, seconds
}

// read gets a task and its lease key in one snapshot.
func (s *Store) read(ctx context.Context, id string) (cpserver.Task, taskRead, error) {
	resp, err := s.cli.Txn(ctx).Then(clientv3.OpGet(s.taskKey(id)), clientv3.OpGet(s.leaseKey(id))).Commit()
	if err != nil {
		return cpserver.Task{}, taskRead{}, err
	}
	tk := resp.Responses[0].GetResponseRange().Kvs
	if len(tk) == 0 {
		return cpserver.Task{}, taskRead{}, cpserver.ErrNotFound
	}
	var t cpserver.Task
	if err := json.Unmarshal(tk[0].Value, &t); err != nil {
		return cpserver.Task{}, taskRead{}, fmt.Errorf("task %s: %w", id, err)
	}
	r := taskRead{rev: tk[0].ModRevision}
	var lease *leaseVal
	if lk := resp.Responses[1].GetResponseRange().Kvs; len(lk) == 1 {
		r.leaseRev, r.etcdID = lk[0].ModRevision, clientv3.LeaseID(lk[0].Lease)
		if v, err := parseLease(lk[0].Value); err == nil {
			lease, r.ttl = &v, v.TTL
		}
	}
	overlay(&t, lease, time.Now())
	return t, r, nil
}

// leaseVal is a lease key's value.
type leaseVal struct {
	ID  string `json:"id"`
	TTL int64  `json:"ttl"`
}

func parseLease(b []byte) (leaseVal, error) {
	var v leaseVal
	err := json.Unmarshal(b, &v)
	return v, err
}

// overlay rewrites a running task's lease expiry from etcd's truth: its
// lease key present (and of the same lease), the lease lives, so the
// expiry is at least a second ahead of this host's clock; absent, it
// expired (or ended): the zero time.
func overlay(t *cpserver.Task, lease *leaseVal, now time.Time) {
	if t.LeaseID == "" {
		return
	}
	if lease == nil || lease.ID != t.LeaseID {
		t.LeaseExpiry = time.Time{}
		return
	}
	if floor := now.Add(time.Second); t.LeaseExpiry.Before(floor) {
		t.LeaseExpiry = floor
	}
}

// Tasks implements cpserver.Store.
func (s *Store) Tasks(ctx context.Context) ([]cpserver.Task, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.prefix+"tasks/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend)),
		clientv3.OpGet(s.prefix+"leases/", clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, wrap(ctx, err)
	}
	leases := map[string]leaseVal{}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		if v, err := parseLease(kv.Value); err == nil {
			leases[strings.TrimPrefix(string(kv.Key), s.prefix+"leases/")] = v
		}
	}
	now := time.Now()
	kvs := resp.Responses[0].GetResponseRange().Kvs
	out := make([]cpserver.Task, 0, len(kvs))
	for _, kv := range kvs {
		var t cpserver.Task
		if err := json.Unmarshal(kv.Value, &t); err != nil {
			return nil, fmt.Errorf("task %s: %w", kv.Key, err)
		}
		var lease *leaseVal
		if v, ok := leases[t.ID]; ok {
			lease = &v
		}
		overlay(&t, lease, now)
		out = append(out, t)
	}
	return out, nil
}

// UpdateTask implements cpserver.Store: read, apply fn, write if neither
// the task nor its lease key changed meanwhile, else again.
func (s *Store) UpdateTask(ctx context.Context, id string, fn func(*cpserver.Task) error) (cpserver.Task, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	for {
		t, ok, err := s.tryUpdate(ctx, id, fn)
		if err != nil || ok {
			return t, wrap(ctx, err)
		}
	}
}

// tryUpdate is one attempt of UpdateTask; ok false: lost a race.
func (s *Store) tryUpdate(ctx context.Context, id string, fn func(*cpserver.Task) error) (cpserver.Task, bool, error) {
	cur, r, err := s.read(ctx, id)
	if err != nil {
		return cpserver.Task{}, false, err
	}
	next := cur
	next.Spec = append(json.RawMessage(nil), cur.Spec...)
	if cur.Progress != nil {
		p := *cur.Progress
		next.Progress = &p
	}
	if cur.Error != nil {
		e := *cur.Error
		next.Error = &e
	}
	if err := fn(&next); err != nil {
		return cpserver.Task{}, false, err
	}
	next.ID = id
	b, err := json.Marshal(next)
	if err != nil {
		return cpserver.Task{}, false, err
	}
	tkey, lkey := s.taskKey(id), s.leaseKey(id)
	ops := []clientv3.Op{clientv3.OpPut(tkey, string(b))}
	var granted clientv3.LeaseID
	leaseChanged := next.LeaseID != cur.LeaseID || !next.LeaseExpiry.Equal(cur.LeaseExpiry)
	switch {
	case next.Terminal() || next.LeaseID == "":
		if r.leaseRev != 0 {
			ops = append(ops, clientv3.OpDelete(lkey))
		}
	case leaseChanged:
		ttl := time.Until(next.LeaseExpiry)
		if ttl <= 0 {
			if r.leaseRev != 0 {
				ops = append(ops, clientv3.OpDelete(lkey))
			}
			break
		}
		secs := int64((ttl + time.Second - 1) / time.Second)
		if next.LeaseID == cur.LeaseID && r.leaseRev != 0 && secs == r.ttl {
			// The same lease extended by its own TTL: a keepalive.
			if _, err := s.cli.KeepAliveOnce(ctx, r.etcdID); err != nil {
				if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
					return cpserver.Task{}, false, err
				}
				return cpserver.Task{}, false, nil // expired meanwhile: read again
			}
			break
		}
		g, err := s.cli.Grant(ctx, secs)
		if err != nil {
			return cpserver.Task{}, false, err
		}
		granted = g.ID
		v, _ := json.Marshal(leaseVal{ID: next.LeaseID, TTL: secs})
		ops = append(ops, clientv3.OpPut(lkey, string(v), clientv3.WithLease(granted)))
	}
	resp, err := s.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.ModRevision(tkey), "=", r.rev),
		clientv3.Compare(clientv3.ModRevision(lkey), "=", r.leaseRev),
	).Then(append(slices.Clip(ops), s.openOps(&cur, next)...)...).Commit()
	if err != nil || !resp.Succeeded {
		if granted != 0 {
			s.revoke(granted)
		}
		return cpserver.Task{}, false, err
	}
	if r.etcdID != 0 && (granted != 0 || len(ops) > 1) {
		s.revoke(r.etcdID) // replaced or deleted: its key is gone
	}
	var lease *leaseVal
	if granted != 0 || (r.leaseRev != 0 && !next.Terminal() && next.LeaseID != "") {
		lease = &leaseVal{ID: next.LeaseID}
	}
	overlay(&next, lease, time.Now())
	return next, true, nil
}

// revoke ends an etcd lease no key uses any more (best effort: it
// expires on its own otherwise).
func (s *Store) revoke(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), s.opTimeout)
	defer cancel()
	s.cli.Revoke(ctx, id)
}

// VMs implements cpserver.Store.
func (s *Store) VMs(ctx context.Context) ([]cpserver.VM, bool, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.prefix+"vms/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend)),
		clientv3.OpGet(s.prefix+"vms-known", clientv3.WithCountOnly()),
	).Commit()
	if err != nil {
		return nil, false, wrap(ctx, err)
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	out := make([]cpserver.VM, 0, len(kvs))
	for _, kv := range kvs {
		var v cpserver.VM
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return nil, false, fmt.Errorf("vm %s: %w", kv.Key, err)
		}
		out = append(out, v)
	}
	return out, resp.Responses[1].GetResponseRange().Count > 0, nil
}

// NodeVMs implements cpserver.Store: the node's index and the index of
// VMs of no node, in one snapshot.
func (s *Store) NodeVMs(ctx context.Context, node string) ([]cpserver.VM, bool, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	ops := []clientv3.Op{clientv3.OpGet(s.prefix+"vms-known", clientv3.WithCountOnly()), clientv3.OpGet(s.vmNodePrefix(node), clientv3.WithPrefix())}
	if node != "" {
		ops = append(ops, clientv3.OpGet(s.vmNodePrefix(""), clientv3.WithPrefix()))
	}
	resp, err := s.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return nil, false, wrap(ctx, err)
	}
	var out []cpserver.VM
	for i, r := range resp.Responses[1:] {
		want := node
		if i == 1 {
			want = ""
		}
		for _, kv := range r.GetResponseRange().Kvs {
			var v cpserver.VM
			if err := json.Unmarshal(kv.Value, &v); err != nil {
				return nil, false, fmt.Errorf("vm %s: %w", kv.Key, err)
			}
			if v.Node == want {
				out = append(out, v)
			}
		}
	}
	return out, resp.Responses[0].GetResponseRange().Count > 0, nil
}

func (s *Store) aliveKey(name string) string { return s.prefix + "alive/" + name }

// PutNode implements cpserver.Store. A node's heartbeat keeps its
// liveness key alive/<name> (an etcd lease of NodeTTL, renewed by a
// keepalive, which is no write): when heartbeats stop, etcd deletes the
// key and the node reads as lost. Its record is written only when it
// changed (cpserver.SameNode) or is NodeRefresh old, so an idle fleet's
// heartbeats cost etcd no writes. A node's registration (no heartbeat
// yet, no state) does not make it alive.
func (s *Store) PutNode(ctx context.Context, n cpserver.Node) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	resp, err := s.cli.Txn(ctx).Then(clientv3.OpGet(s.nodeKey(n.Name)), clientv3.OpGet(s.aliveKey(n.Name))).Commit()
	if err != nil {
		return wrap(ctx, err)
	}
	var prev cpserver.Node
	write := true
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 && json.Unmarshal(kvs[0].Value, &prev) == nil {
		if n.Info == nil {
			n.Info = prev.Info
		}
		write = !cpserver.SameNode(prev, n) || n.LastHeartbeat.Sub(prev.LastHeartbeat) >= s.refresh
	}
	if write {
		b, err := json.Marshal(n)
		if err != nil {
			return err
		}
		if _, err := s.cli.Put(ctx, s.nodeKey(n.Name), string(b)); err != nil {
			return wrap(ctx, err)
		}
	}
	if n.State == "" {
		return nil
	}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 1 && kvs[0].Lease != 0 {
		if _, err := s.cli.KeepAliveOnce(ctx, clientv3.LeaseID(kvs[0].Lease)); err == nil {
			return nil
		} else if unavailable(ctx, err) {
			return wrap(ctx, err)
		}
		// Expired meanwhile: a new lease.
	}
	g, err := s.cli.Grant(ctx, s.nodeTTL)
	if err != nil {
		return wrap(ctx, err)
	}
	_, err = s.cli.Put(ctx, s.aliveKey(n.Name), "1", clientv3.WithLease(g.ID))
	return wrap(ctx, err)
}

// Nodes implements cpserver.Store: a node whose liveness key is gone is
// api.NodeLost.
func (s *Store) Nodes(ctx context.Context) ([]cpserver.Node, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.prefix+"nodes/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend)),
		clientv3.OpGet(s.prefix+"alive/", clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		return nil, wrap(ctx, err)
	}
	alive := map[string]bool{}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		alive[strings.TrimPrefix(string(kv.Key), s.prefix+"alive/")] = true
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	out := make([]cpserver.Node, 0, len(kvs))
	for _, kv := range kvs {
		var n cpserver.Node
		if err := json.Unmarshal(kv.Value, &n); err != nil {
			return nil, fmt.Errorf("node %s: %w", kv.Key, err)
		}
		if n.State != "" && !alive[n.Name] {
			n.State = api.NodeLost
		}
		out = append(out, n)
	}
	return out, nil
}

var _ cpserver.Store = (*Store)(nil)

// Secret returns the cluster's shared secret name (secrets/<name>),
// creating a random one (32 bytes, hex) on first use: the first replica
// to ask writes it in a transaction, every other reads that one.
func (s *Store) Secret(ctx context.Context, name string) (string, error) {
	var buf [32]byte
	if _, err := rand.Read(buf[:]); err != nil {
		return "", err
	}
	key := s.prefix + "secrets/" + name
	ctx, cancel := s.op(ctx)
	defer cancel()
	resp, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, hex.EncodeToString(buf[:]))).
		Else(clientv3.OpGet(key)).Commit()
	if err != nil {
		return "", wrap(ctx, err)
	}
	if resp.Succeeded {
		return hex.EncodeToString(buf[:]), nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return "", fmt.Errorf("secret %s: gone", name)
	}
	return string(kvs[0].Value), nil
}
