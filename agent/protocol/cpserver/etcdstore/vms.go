package etcdstore

import (
	"context"
	"encoding/json"
	"fmt"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// The desired map: vms/<uuid>, with two indexes kept in the same
// transactions, vmnode/<node>/<uuid> (a heartbeat's answer) and
// vmname/<name> (the VM holding the name: routing a request by name is
// one read, and two creates of one name cannot both be stored).

func (s *Store) vmNameKey(name string) string { return s.prefix + "vmname/" + name }
func (s *Store) placedKey(node string) string { return s.prefix + "placed/" + node }

// VM implements cpserver.Store.
func (s *Store) VM(ctx context.Context, uuid string) (cpserver.VM, bool, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.vmKey(uuid))
	if err != nil {
		return cpserver.VM{}, false, wrap(ctx, err)
	}
	v, _, ok, err := vmOf(resp.Kvs, uuid)
	return v, ok, err
}

// VMByName implements cpserver.Store: one read of the name's index key.
func (s *Store) VMByName(ctx context.Context, name string) (cpserver.VM, bool, error) {
	if name == "" {
		return cpserver.VM{}, false, nil
	}
	ctx, cancel := s.op(ctx)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.vmNameKey(name))
	if err != nil {
		return cpserver.VM{}, false, wrap(ctx, err)
	}
	v, _, ok, err := vmOf(resp.Kvs, name)
	return v, ok, err
}

// vmOf decodes the VM of a read of one key and its mod revision (0 and
// ok false: absent).
func vmOf(kvs []*mvccpb.KeyValue, what string) (cpserver.VM, int64, bool, error) {
	if len(kvs) == 0 {
		return cpserver.VM{}, 0, false, nil
	}
	var v cpserver.VM
	if err := json.Unmarshal(kvs[0].Value, &v); err != nil {
		return cpserver.VM{}, 0, false, fmt.Errorf("vm %s: %w", what, err)
	}
	return v, kvs[0].ModRevision, true, nil
}

// PutVM implements cpserver.Store: the VM and its indexes in one
// transaction, conditioned on the VM and the name's holder as read (a VM
// that moved leaves its old node's index). The VM takes its name when no
// other VM holds it.
func (s *Store) PutVM(ctx context.Context, vm cpserver.VM) error {
	b, err := json.Marshal(vm)
	if err != nil {
		return err
	}
	ctx, cancel := s.op(ctx)
	defer cancel()
	return wrap(ctx, s.changeVM(ctx, vm.UUID, vm.Name, func(r vmState) []clientv3.Op {
		ops := []clientv3.Op{clientv3.OpPut(s.vmKey(vm.UUID), string(b)), clientv3.OpPut(s.vmNodeKey(vm), string(b))}
		if r.old != nil && r.old.Node != vm.Node {
			ops = append(ops, clientv3.OpDelete(s.vmNodeKey(*r.old)))
		}
		if r.old != nil && r.old.Name != vm.Name && r.holds(r.old.Name, vm.UUID) {
			ops = append(ops, clientv3.OpDelete(s.vmNameKey(r.old.Name)))
		}
		if vm.Name != "" && (r.holder[vm.Name] == "" || r.holds(vm.Name, vm.UUID)) {
			ops = append(ops, clientv3.OpPut(s.vmNameKey(vm.Name), string(b)))
		}
		return ops
	}))
}

// DeleteVM implements cpserver.Store: the VM, its indexes, and its name
// when it holds it.
func (s *Store) DeleteVM(ctx context.Context, uuid string) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	return wrap(ctx, s.changeVM(ctx, uuid, "", func(r vmState) []clientv3.Op {
		if r.old == nil {
			return nil
		}
		ops := []clientv3.Op{clientv3.OpDelete(s.vmKey(uuid)), clientv3.OpDelete(s.vmNodeKey(*r.old))}
		if r.holds(r.old.Name, uuid) {
			ops = append(ops, clientv3.OpDelete(s.vmNameKey(r.old.Name)))
		}
		return ops
	}))
}

// vmState is a VM as read (old nil: absent) with the holders of the
// names read ("": none) and the revisions a write is conditioned on.
type vmState struct {
	old    *cpserver.VM
	holder map[string]string
	cmps   []clientv3.Cmp
}

func (r vmState) holds(name, uuid string) bool { return name != "" && r.holder[name] == uuid }

// readVM reads a VM and the holders of name and of the VM's own name,
// in as few reads as it can (one when the VM keeps its name).
func (s *Store) readVM(ctx context.Context, uuid, name string) (vmState, error) {
	r := vmState{holder: map[string]string{}}
	ops := []clientv3.Op{clientv3.OpGet(s.vmKey(uuid))}
	if name != "" {
		ops = append(ops, clientv3.OpGet(s.vmNameKey(name)))
	}
	resp, err := s.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return r, err
	}
	v, rev, ok, err := vmOf(resp.Responses[0].GetResponseRange().Kvs, uuid)
	if err != nil {
		return r, err
	}
	r.cmps = append(r.cmps, clientv3.Compare(clientv3.ModRevision(s.vmKey(uuid)), "=", rev))
	if ok {
		r.old = &v
	}
	names := map[string]*clientv3.TxnResponse{}
	if name != "" {
		names[name] = resp
	}
	if ok && v.Name != "" && v.Name != name {
		// Deleted, or renamed: the old name's holder too.
		got, err := s.cli.Txn(ctx).Then(clientv3.OpGet(s.vmKey(uuid)), clientv3.OpGet(s.vmNameKey(v.Name))).Commit()
		if err != nil {
			return r, err
		}
		names[v.Name] = got
	}
	for n, resp := range names {
		h, hrev, _, err := vmOf(resp.Responses[1].GetResponseRange().Kvs, n)
		if err != nil {
			return r, err
		}
		r.holder[n] = h.UUID
		r.cmps = append(r.cmps, clientv3.Compare(clientv3.ModRevision(s.vmNameKey(n)), "=", hrev))
	}
	return r, nil
}

// changeVM reads a VM (readVM) and commits ops(state), with the desired
// map marked known, if neither the VM nor the names read changed
// meanwhile; else again.
func (s *Store) changeVM(ctx context.Context, uuid, name string, ops func(vmState) []clientv3.Op) error {
	for {
		r, err := s.readVM(ctx, uuid, name)
		if err != nil {
			return err
		}
		resp, err := s.cli.Txn(ctx).If(r.cmps...).
			Then(append(ops(r), clientv3.OpPut(s.prefix+"vms-known", "1"))...).
			Commit()
		if err != nil || resp.Succeeded {
			return err
		}
	}
}

// AddCreate implements cpserver.Store: the task, the VM with its indexes
// and its name, and the node's placed/<node> key in one transaction,
// conditioned on the name being free (or the VM's), the VM as read and
// placed/<node> as read when check ran: a create stored on the node
// meanwhile makes it read and check again.
func (s *Store) AddCreate(ctx context.Context, t cpserver.Task, vm cpserver.VM, check cpserver.CreateCheck) error {
	tb, err := json.Marshal(t)
	if err != nil {
		return err
	}
	vb, err := json.Marshal(vm)
	if err != nil {
		return err
	}
	ctx, cancel := s.op(ctx)
	defer cancel()
	for {
		done, err := s.tryCreate(ctx, t, vm, tb, vb, check)
		if err != nil || done {
			if err == nil {
				err = s.prune(ctx)
			}
			return wrap(ctx, err)
		}
	}
}

// tryCreate is one attempt of AddCreate; done false: lost a race.
func (s *Store) tryCreate(ctx context.Context, t cpserver.Task, vm cpserver.VM, tb, vb []byte, check cpserver.CreateCheck) (bool, error) {
	tkey, nkey, pkey := s.taskKey(t.ID), s.vmNameKey(vm.Name), s.placedKey(vm.Node)
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.vmKey(vm.UUID), clientv3.WithKeysOnly()),
		clientv3.OpGet(nkey),
		clientv3.OpGet(pkey, clientv3.WithKeysOnly()),
		clientv3.OpGet(s.nodeKey(vm.Node)),
		clientv3.OpGet(s.aliveKey(vm.Node), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		return false, err
	}
	rev := func(i int) int64 {
		if kvs := resp.Responses[i].GetResponseRange().Kvs; len(kvs) == 1 {
			return kvs[0].ModRevision
		}
		return 0
	}
	holder, _, _, err := vmOf(resp.Responses[1].GetResponseRange().Kvs, vm.Name)
	if err != nil {
		return false, err
	}
	if vm.Name != "" && rev(1) != 0 && holder.UUID != vm.UUID {
		return false, fmt.Errorf("%w: %q is vm %s's", cpserver.ErrNameTaken, vm.Name, holder.UUID)
	}
	if check != nil {
		n := cpserver.Node{Name: vm.Node}
		if kvs := resp.Responses[3].GetResponseRange().Kvs; len(kvs) == 1 {
			if err := json.Unmarshal(kvs[0].Value, &n); err != nil {
				return false, fmt.Errorf("node %s: %w", vm.Node, err)
			}
			if n.State != "" && rev(4) == 0 {
				n.State = api.NodeLost
			}
		}
		open, err := s.Unfinished(ctx)
		if err != nil {
			return false, err
		}
		if err := check(n, open); err != nil {
			return false, err
		}
	}
	ops := []clientv3.Op{clientv3.OpPut(tkey, string(tb)), clientv3.OpPut(s.vmKey(vm.UUID), string(vb)),
		clientv3.OpPut(s.vmNodeKey(vm), string(vb)), clientv3.OpPut(pkey, t.ID), clientv3.OpPut(s.prefix+"vms-known", "1")}
	if vm.Name != "" {
		ops = append(ops, clientv3.OpPut(nkey, string(vb)))
	}
	ops = append(ops, s.openOps(nil, t)...)
	got, err := s.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.CreateRevision(tkey), "=", 0),
		clientv3.Compare(clientv3.ModRevision(s.vmKey(vm.UUID)), "=", rev(0)),
		clientv3.Compare(clientv3.ModRevision(nkey), "=", rev(1)),
		clientv3.Compare(clientv3.ModRevision(pkey), "=", rev(2)),
	).Then(ops...).Else(clientv3.OpGet(tkey, clientv3.WithCountOnly())).Commit()
	if err != nil {
		return false, err
	}
	if !got.Succeeded && got.Responses[0].GetResponseRange().Count > 0 {
		return false, cpserver.ErrExists
	}
	return got.Succeeded, nil
}
