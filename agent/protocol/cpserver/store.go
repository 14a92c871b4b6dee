package cpserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
)

// Task is the control plane's record of one task: its view (api.Task) and
// its lease.
type Task struct {
	api.Task
	// Spec is what the agent receives (it may hold user-data); it is
	// dropped once the task is terminal.
	Spec        json.RawMessage `json:"spec,omitempty"`
	Attempt     int             `json:"attempt"`
	LeaseID     string          `json:"lease_id,omitempty"`
	LeaseExpiry time.Time       `json:"lease_expiry,omitzero"`
	// Cancel asks the agent, in its next progress answer, to cancel.
	Cancel bool `json:"cancel,omitempty"`
	// CancelSent: a lease answer carried the cancel to the agent
	// (LeaseResponse.Cancel); reset with each new lease.
	CancelSent bool `json:"cancel_sent,omitempty"`
	// Deliveries counts the lease answers that carried the task.
	Deliveries int `json:"deliveries,omitempty"`
	// Redeliver is how many more lease answers carry the current lease
	// again, as a retransmitted answer would (fault injection).
	Redeliver int `json:"redeliver,omitempty"`
	// Volatile says the store need not keep the task across a crash of
	// the control plane: nobody but a caller waiting on it (a sync op)
	// would ever look at it again.
	Volatile bool `json:"volatile,omitempty"`
	// Node is the node that runs the task (its VM's node): only that
	// node's lease requests get it. "" is any node (single-node).
	Node string `json:"node,omitempty"`
	// Placement is a vm.create's placement (cluster mode), kept on its
	// VM of the desired map.
	Placement *api.Placement `json:"placement,omitempty"`
}

// Terminal reports whether the task ended (success, failed, cancelled).
func (t *Task) Terminal() bool {
	switch t.Status {
	case api.TaskSuccess, api.TaskFailed, api.TaskCancelled:
		return true
	}
	return false
}

// VM is a VM the control plane places on a node, with its desired phase.
type VM struct {
	UUID  string `json:"uuid"`
	Name  string `json:"name,omitempty"`
	Phase string `json:"phase"` // api.PhaseRunning or api.PhaseStopped
	// Node is the node the VM belongs to; "" is any node (single-node).
	Node string `json:"node,omitempty"`
	// Placement is why the VM is on Node (cluster mode).
	Placement *api.Placement `json:"placement,omitempty"`
}

// Node is what the control plane knows of an agent: its registration and
// its last heartbeat.
type Node struct {
	Name          string              `json:"name"`
	Info          *protocol.NodeInfo  `json:"info,omitempty"`
	State         string              `json:"state,omitempty"`
	LastHeartbeat time.Time           `json:"last_heartbeat,omitzero"`
	VMs           []protocol.VMStatus `json:"vms,omitempty"`
}

// SameNode reports whether two records of a node say the same but for
// the heartbeat's time and the VMs' usage samples: a heartbeat that
// changes nothing else need not be written where writes cost (etcd).
func SameNode(a, b Node) bool {
	if a.Name != b.Name || a.State != b.State || len(a.VMs) != len(b.VMs) || (a.Info == nil) != (b.Info == nil) {
		return false
	}
	if a.Info != nil && !sameJSON(a.Info, b.Info) {
		return false
	}
	// In any order: an agent lists its VMs being created after the
	// others, in no set order.
	was := make(map[string]string, len(a.VMs))
	for _, v := range a.VMs {
		v.Usage = nil
		was[v.UUID] = jsonOf(v)
	}
	for _, v := range b.VMs {
		v.Usage = nil
		if s, ok := was[v.UUID]; !ok || s != jsonOf(v) {
			return false
		}
	}
	return true
}

func sameJSON(a, b any) bool { return jsonOf(a) == jsonOf(b) }

// jsonOf encodes v; "" for what does not encode.
func jsonOf(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(b)
}

// ErrNotFound is a store's answer for an unknown task.
var ErrNotFound = errors.New("no such task")

// ErrUnavailable wraps a store's failure to reach its backend (a
// replicated store without quorum): answered 503 cluster_unavailable with
// Retry-After, and retried by the agent.
var ErrUnavailable = errors.New("control plane store unavailable")

// Store holds a control plane's state: tasks (with their leases), the
// desired map (VMs and their phases) and nodes. Every method is safe for
// concurrent use. The Server keeps no state of its own beyond a store, so
// a store shared by several servers (a replicated one) makes them
// replicas.
type Store interface {
	// AddTask stores a new task after every other (ids are unique).
	AddTask(ctx context.Context, t Task) error
	// UpdateTask applies fn to the task atomically and stores the result:
	// fn sees the current record; an error from fn aborts the update and
	// is returned as is. ErrNotFound for an unknown id.
	UpdateTask(ctx context.Context, id string, fn func(*Task) error) (Task, error)
	// Task returns one task, or ErrNotFound.
	Task(ctx context.Context, id string) (Task, error)
	// Tasks returns the kept tasks, oldest first.
	Tasks(ctx context.Context) ([]Task, error)
	// Unfinished returns the tasks not yet terminal, oldest first.
	Unfinished(ctx context.Context) ([]Task, error)
	// NodeUnfinished returns the tasks not yet terminal of node or of no
	// node, oldest first, without reading the others (a lease's look):
	// its cost grows with the node's open tasks, not the tasks kept.
	NodeUnfinished(ctx context.Context, node string) ([]Task, error)

	// VMs returns the desired map. known is false while the store has
	// never held one ("no opinion").
	VMs(ctx context.Context) (vms []VM, known bool, err error)
	// NodeVMs returns the VMs of the desired map that belong to node or
	// to no node, without reading the others (a heartbeat's answer).
	NodeVMs(ctx context.Context, node string) (vms []VM, known bool, err error)
	// VM returns one VM of the desired map; ok false when absent.
	VM(ctx context.Context, uuid string) (vm VM, ok bool, err error)
	// PutVM adds or replaces a VM of the desired map.
	PutVM(ctx context.Context, vm VM) error
	// DeleteVM removes a VM from the desired map (no error when absent).
	DeleteVM(ctx context.Context, uuid string) error
	// VMByName returns the VM of the desired map that holds name, from
	// an index (one read, not the map); ok false when none does.
	// VM names are unique: a VM holds its name from AddCreate (or
	// the PutVM that first stored it, when no other VM held it) until
	// it is deleted.
	VMByName(ctx context.Context, name string) (vm VM, ok bool, err error)
	// AddCreate stores a vm.create task t and puts its VM vm in the
	// desired map in one atomic step, reserving vm.Name for vm.UUID:
	// ErrNameTaken (nothing stored) when another VM holds the name,
	// ErrExists when t.ID is taken. check, when not nil, is called with
	// vm's node (its record; Name alone when unknown) and the unfinished
	// tasks; no other AddCreate for that node is stored between the
	// read check sees and the commit (a store reads and checks again
	// when one was). An error from check aborts and is returned as is.
	AddCreate(ctx context.Context, t Task, vm VM, check CreateCheck) error

	// PutNode records a node's registration or heartbeat. n.Info nil
	// keeps the recorded Info (a heartbeat without node_info). It does
	// not wake Changed's waiters: nobody waits on nodes. A store may
	// skip writing a heartbeat that changed nothing but its time and
	// usage samples (SameNode) and keep only the node's liveness.
	PutNode(ctx context.Context, n Node) error
	// Nodes returns the known nodes.
	Nodes(ctx context.Context) ([]Node, error)

	// Changed returns a channel closed at the store's next change (a
	// waiter waits on it, then looks again).
	Changed() <-chan struct{}
	// NodeChanged returns a channel closed at the next change of a task
	// of node or of no node (a lease's long poll waits on it, then looks
	// again): a task change wakes its node's long polls, not the fleet's.
	NodeChanged(node string) <-chan struct{}
}

// CreateCheck is AddCreate's check of a create against its node: the
// node's record and the unfinished tasks as they are when it is stored.
type CreateCheck func(node Node, open []Task) error

// ErrNameTaken is AddCreate's answer for a VM name another VM holds.
var ErrNameTaken = errors.New("vm name taken")

// MemStore is a Store in memory. The zero value is ready to use.
type MemStore struct {
	// MaxTasks, when positive, bounds the tasks kept: past it the oldest
	// terminal tasks are forgotten.
	MaxTasks int

	mu      sync.Mutex
	tasks   map[string]*Task
	order   []string
	open    []string            // ids of the tasks not terminal, oldest first
	openBy  map[string][]string // node -> ids of its open tasks, oldest first
	seq     map[string]uint64   // id -> its place in queue order
	nextSeq uint64
	vms     map[string]VM       // nil: no opinion yet
	byNode  map[string][]string // node -> uuids of its VMs in vms
	names   map[string]string   // name -> uuid of the VM holding it
	nodes   map[string]Node
	changed chan struct{}
	nodeCh  NodeWaiters
}

func (m *MemStore) lock() {
	m.mu.Lock()
	if m.tasks == nil {
		m.tasks = map[string]*Task{}
		m.nodes = map[string]Node{}
		m.byNode = map[string][]string{}
		m.names = map[string]string{}
		m.changed = make(chan struct{})
	}
}

// notify wakes the waiters of Changed; mu held.
func (m *MemStore) notify() {
	close(m.changed)
	m.changed = make(chan struct{})
}

// notifyTask wakes the waiters of Changed and those of NodeChanged of
// the nodes of a task changed (every node for a task of no node); mu
// held.
func (m *MemStore) notifyTask(nodes ...string) {
	m.notify()
	for _, node := range nodes {
		if node == "" {
			m.nodeCh.WakeAll()
			return
		}
		m.nodeCh.Wake(node)
	}
}

// NodeChanged implements Store.
func (m *MemStore) NodeChanged(node string) <-chan struct{} {
	m.lock()
	defer m.mu.Unlock()
	return m.nodeCh.Wait(node)
}

// ErrExists is AddTask's answer for a task id already stored.
var ErrExists = errors.New("task id already exists")

// AddTask implements Store.
func (m *MemStore) AddTask(_ context.Context, t Task) error {
	m.lock()
	defer m.mu.Unlock()
	if err := m.addLocked(t); err != nil {
		return err
	}
	m.notifyTask(t.Node)
	return nil
}

// addLocked adds a task; mu held.
func (m *MemStore) addLocked(t Task) error {
	if _, ok := m.tasks[t.ID]; ok {
		return ErrExists
	}
	m.tasks[t.ID] = cloneTask(&t)
	m.order = append(m.order, t.ID)
	if !t.Terminal() {
		m.open = append(m.open, t.ID)
	}
	m.indexOpen(t.ID, nil, &t)
	m.pruneLocked()
	return nil
}

// AddCreate implements Store.
func (m *MemStore) AddCreate(_ context.Context, t Task, vm VM, check CreateCheck) error {
	m.lock()
	defer m.mu.Unlock()
	if err := m.createableLocked(t, vm, check); err != nil {
		return err
	}
	m.addLocked(t)
	m.putLocked(vm)
	m.notifyTask(t.Node)
	return nil
}

// createableLocked reports why AddCreate cannot store t and vm; mu held.
func (m *MemStore) createableLocked(t Task, vm VM, check CreateCheck) error {
	if _, ok := m.tasks[t.ID]; ok {
		return ErrExists
	}
	if id, ok := m.names[vm.Name]; ok && vm.Name != "" && id != vm.UUID {
		return fmt.Errorf("%w: %q is vm %s's", ErrNameTaken, vm.Name, id)
	}
	if check == nil {
		return nil
	}
	n, ok := m.nodes[vm.Node]
	if !ok {
		n = Node{Name: vm.Node}
	}
	open := make([]Task, 0, len(m.open))
	for _, id := range m.open {
		open = append(open, *cloneTask(m.tasks[id]))
	}
	return check(n, open)
}

// VMByName implements Store.
func (m *MemStore) VMByName(_ context.Context, name string) (VM, bool, error) {
	m.lock()
	defer m.mu.Unlock()
	id, ok := m.names[name]
	if !ok {
		return VM{}, false, nil
	}
	v, ok := m.vms[id]
	return v, ok, nil
}

// pruneLocked forgets the oldest terminal tasks past MaxTasks.
func (m *MemStore) pruneLocked() {
	over := len(m.order) - m.MaxTasks
	if m.MaxTasks <= 0 || over <= 0 {
		return
	}
	keep := m.order[:0]
	for _, id := range m.order {
		if over > 0 && m.tasks[id].Terminal() {
			delete(m.tasks, id)
			m.forgetSeq(id)
			over--
			continue
		}
		keep = append(keep, id)
	}
	clear(m.order[len(keep):])
	m.order = keep
}

// UpdateTask implements Store.
func (m *MemStore) UpdateTask(_ context.Context, id string, fn func(*Task) error) (Task, error) {
	m.lock()
	defer m.mu.Unlock()
	t, ok := m.tasks[id]
	if !ok {
		return Task{}, ErrNotFound
	}
	c := cloneTask(t)
	if err := fn(c); err != nil {
		return Task{}, err
	}
	c.ID = id
	m.tasks[id] = c
	switch {
	case t.Terminal() && !c.Terminal():
		// Queued again (a test's re-enqueue): back in queue order.
		m.open = m.open[:0]
		for _, oid := range m.order {
			if !m.tasks[oid].Terminal() {
				m.open = append(m.open, oid)
			}
		}
	case !t.Terminal() && c.Terminal():
		m.open = slices.DeleteFunc(m.open, func(oid string) bool { return oid == id })
	}
	m.indexOpen(id, t, c)
	m.notifyTask(t.Node, c.Node)
	return *cloneTask(c), nil
}

// Task implements Store.
func (m *MemStore) Task(_ context.Context, id string) (Task, error) {
	m.lock()
	defer m.mu.Unlock()
	t, ok := m.tasks[id]
	if !ok {
		return Task{}, ErrNotFound
	}
	return *cloneTask(t), nil
}

// Tasks implements Store.
func (m *MemStore) Tasks(context.Context) ([]Task, error) {
	m.lock()
	defer m.mu.Unlock()
	out := make([]Task, 0, len(m.order))
	for _, id := range m.order {
		out = append(out, *cloneTask(m.tasks[id]))
	}
	return out, nil
}

// Unfinished implements Store.
func (m *MemStore) Unfinished(context.Context) ([]Task, error) {
	m.lock()
	defer m.mu.Unlock()
	out := make([]Task, 0, len(m.open))
	for _, id := range m.open {
		out = append(out, *cloneTask(m.tasks[id]))
	}
	return out, nil
}

// VMs implements Store.
func (m *MemStore) VMs(context.Context) ([]VM, bool, error) {
	m.lock()
	defer m.mu.Unlock()
	return byKey(m.vms), m.vms != nil, nil
}

// NodeVMs implements Store.
func (m *MemStore) NodeVMs(_ context.Context, node string) ([]VM, bool, error) {
	m.lock()
	defer m.mu.Unlock()
	var out []VM
	for _, uuid := range m.byNode[node] {
		out = append(out, m.vms[uuid])
	}
	if node != "" {
		for _, uuid := range m.byNode[""] {
			out = append(out, m.vms[uuid])
		}
	}
	return out, m.vms != nil, nil
}

// VM implements Store.
func (m *MemStore) VM(_ context.Context, uuid string) (VM, bool, error) {
	m.lock()
	defer m.mu.Unlock()
	v, ok := m.vms[uuid]
	return v, ok, nil
}

// unindex drops uuid from its node's index; mu held.
func (m *MemStore) unindex(uuid string) {
	old, ok := m.vms[uuid]
	if !ok {
		return
	}
	ids := slices.DeleteFunc(m.byNode[old.Node], func(id string) bool { return id == uuid })
	if len(ids) == 0 {
		delete(m.byNode, old.Node)
	} else {
		m.byNode[old.Node] = ids
	}
	if m.names[old.Name] == uuid {
		delete(m.names, old.Name)
	}
}

// ForgetDesired drops the desired map: the store has no opinion again.
func (m *MemStore) ForgetDesired() {
	m.lock()
	defer m.mu.Unlock()
	m.vms = nil
	clear(m.byNode)
	clear(m.names)
	m.notify()
}

// PutVM implements Store.
func (m *MemStore) PutVM(_ context.Context, vm VM) error {
	m.lock()
	defer m.mu.Unlock()
	m.putLocked(vm)
	m.notify()
	return nil
}

// putLocked puts a VM, which takes its name when no other VM holds it;
// mu held.
func (m *MemStore) putLocked(vm VM) {
	if m.vms == nil {
		m.vms = map[string]VM{}
	}
	m.unindex(vm.UUID)
	m.vms[vm.UUID] = vm
	m.byNode[vm.Node] = append(m.byNode[vm.Node], vm.UUID)
	if _, taken := m.names[vm.Name]; vm.Name != "" && !taken {
		m.names[vm.Name] = vm.UUID
	}
}

// DeleteVM implements Store.
func (m *MemStore) DeleteVM(_ context.Context, uuid string) error {
	m.lock()
	defer m.mu.Unlock()
	if m.vms == nil {
		m.vms = map[string]VM{}
	}
	m.unindex(uuid)
	delete(m.vms, uuid)
	m.notify()
	return nil
}

// PutNode implements Store.
func (m *MemStore) PutNode(_ context.Context, n Node) error {
	m.lock()
	defer m.mu.Unlock()
	if n.Info == nil {
		n.Info = m.nodes[n.Name].Info
	}
	m.nodes[n.Name] = n
	return nil
}

// Nodes implements Store.
func (m *MemStore) Nodes(context.Context) ([]Node, error) {
	m.lock()
	defer m.mu.Unlock()
	return byKey(m.nodes), nil
}

// Changed implements Store.
func (m *MemStore) Changed() <-chan struct{} {
	m.lock()
	defer m.mu.Unlock()
	return m.changed
}

// byKey returns m's values in the order of their keys (VMs by uuid, nodes
// by name), as an empty slice, not nil, when m has none.
func byKey[T any](m map[string]T) []T {
	out := make([]T, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, m[k])
	}
	return out
}

// cloneTask copies a task deeply enough that the copy and the original
// share nothing a caller may change.
func cloneTask(t *Task) *Task {
	c := *t
	c.Spec = slices.Clone(t.Spec)
	if t.Progress != nil {
		p := *t.Progress
		c.Progress = &p
	}
	if t.Error != nil {
		e := *t.Error
		c.Error = &e
	}
	return &c
}
