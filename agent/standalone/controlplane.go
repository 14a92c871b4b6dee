// Package standalone is the agent's single-node mode: an in-process
// control plane that speaks the same /v1/agent protocol as a real one (the
// agent's runner leases, reports progress and completes tasks through its
// LocalClient, calls of the protocol server's methods), and the seed-004
// /v1/vms API on top of it.
package standalone

import (
	"context"
	"encoding/json"
	"net/http"
	"sort"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/agent/secrets"
)

// Defaults of the control plane's queue limits.
const (
	DefaultMaxPendingTasks   = 256
	DefaultMaxPendingCreates = 32
)

// heartbeatInterval is the in-process control plane's: the agent and its
// control plane share a process, so a short one costs nothing.
const heartbeatInterval = 5 * time.Second

// ControlPlane is a single-node control plane: the protocol's server side
// (cpserver) over a store kept in one 0600 JSON file, so its state (tasks,
// desired phases) survives restarts. Desired phases follow the tasks the
// API queues, and a VM found on the host that the state lacks is adopted
// as it is, never deleted.
type ControlPlane struct {
	srv   *cpserver.Server
	store *cpserver.FileStore // nil in cluster mode
	// node stamps the tasks this replica queues (cluster mode): they
	// run on this host.
	node string
}

// NewControlPlane loads (or creates) the state file.
func NewControlPlane(path, token string, log *zap.Logger) (*ControlPlane, error) {
	store, err := cpserver.NewFileStore(path, log)
	if err != nil {
		return nil, err
	}
	srv := &cpserver.Server{
		Store: store, Token: token, Log: log,
		LeaseTTL: cpserver.DefaultLeaseTTL, MaxWait: cpserver.DefaultMaxWait, HeartbeatInterval: heartbeatInterval,
		MaxPendingTasks: DefaultMaxPendingTasks, MaxPendingCreates: DefaultMaxPendingCreates,
		DesiredFollowsTasks: true, AdoptUnknownVMs: true,
	}
	return &ControlPlane{srv: srv, store: store}, nil
}

// NewClusterControlPlane is a replica of cluster mode's control plane
// (docs/cluster.md): its state lives in store (etcd), shared by every
// host's replica. The tasks it queues run on node, this host; a VM a
// heartbeat reports belongs to the node that reported it.
func NewClusterControlPlane(store cpserver.Store, node, token string, log *zap.Logger) *ControlPlane {
	srv := &cpserver.Server{
		Store: store, Token: token, Log: log,
		LeaseTTL: cpserver.DefaultLeaseTTL, MaxWait: cpserver.DefaultMaxWait, HeartbeatInterval: cpserver.DefaultHeartbeatInterval,
		MaxPendingTasks: DefaultMaxPendingTasks, MaxPendingCreates: DefaultMaxPendingCreates,
		DesiredFollowsTasks: true, AdoptUnknownVMs: true, NodeScoped: true, CheckCreate: checkCreate,
	}
	return &ControlPlane{srv: srv, node: node}
}

// SetHeartbeatInterval sets the heartbeat interval the control plane
// asks of its agents (cluster mode: of this host's). Call it before
// serving.
func (cp *ControlPlane) SetHeartbeatInterval(d time.Duration) { cp.srv.HeartbeatInterval = d }

// SetLimits bounds the unfinished tasks (pending or running) and the
// unfinished vm.create tasks among them: over either, Enqueue refuses the
// task and the API answers 429. Zero means no limit. Call it before
// serving.
func (cp *ControlPlane) SetLimits(tasks, creates int) {
	cp.srv.MaxPendingTasks, cp.srv.MaxPendingCreates = tasks, creates
}

// Server returns the protocol server (tasks, leases, desired map).
func (cp *ControlPlane) Server() *cpserver.Server { return cp.srv }

// SealSpecs makes task specs (user-data, VNC passwords) sealed at rest
// with box from now on, and opens those a previous run sealed.
// In cluster mode specs are kept as they are: no key is shared between
// hosts, so etcd's own protection (TLS, client certificates, its disk)
// guards them, and a task's spec is dropped once it ends.
func (cp *ControlPlane) SealSpecs(box *secrets.Box) error {
	if cp.store == nil {
		return nil
	}
	return cp.store.SetSealer(box)
}

// volatileTypes are the task types the API waits on (sync ops): their
// record need not survive a crash of the process, whose caller then sees
// its request fail anyway, so queueing one writes nothing to disk (the
// agent's journal still keeps its effect exactly once).
var volatileTypes = map[string]bool{api.TaskReset: true, api.TaskPause: true, api.TaskResume: true}

// Enqueue adds a task for a VM and wakes a waiting lease. A full queue
// is a *cpserver.TooManyTasksError.
func (cp *ControlPlane) Enqueue(typ, vmName, vmUUID string, spec any) (api.Task, error) {
	return cp.EnqueuePlaced(typ, vmName, vmUUID, spec, nil)
}

// EnqueuePlaced is Enqueue of a vm.create placed by p (cluster mode): the
// VM keeps p in the desired map, and its views show it.
func (cp *ControlPlane) EnqueuePlaced(typ, vmName, vmUUID string, spec any, p *api.Placement) (api.Task, error) {
	var raw json.RawMessage
	if spec != nil {
		b, err := json.Marshal(spec)
		if err != nil {
			return api.Task{}, err
		}
		raw = b
	}
	ctx := context.Background()
	node := cp.node
	if node != "" {
		if n := cp.srv.NodeOf(ctx, vmUUID); n != "" {
			node = n // the VM's node runs its tasks
		}
	}
	t, err := cp.srv.Enqueue(ctx, cpserver.Task{
		Task: api.Task{Type: typ, VMName: vmName, VMUUID: vmUUID}, Spec: raw, Node: node, Volatile: volatileTypes[typ], Placement: p})
	return t.Task, err
}

// Task returns a task by id: cpserver.ErrNotFound, or the store's error
// (cpserver.ErrUnavailable without etcd quorum).
func (cp *ControlPlane) Task(ctx context.Context, id string) (api.Task, error) {
	t, err := cp.srv.Task(ctx, id)
	return t.Task, err
}

// Wait blocks until a task is terminal or ctx ends.
func (cp *ControlPlane) Wait(ctx context.Context, id string) (api.Task, error) {
	t, err := cp.srv.Wait(ctx, id)
	return t.Task, err
}

// Cancel cancels a task not yet past its point of no return
// (cpserver.Cancellable); else the error wraps cpserver.ErrNotCancellable,
// or cpserver.ErrNotFound.
func (cp *ControlPlane) Cancel(ctx context.Context, id string) (api.Task, error) {
	t, err := cp.srv.CancelTask(ctx, id)
	return t.Task, err
}

// Busy reports an unfinished task of vmName, if any.
func (cp *ControlPlane) Busy(vmName string) (api.Task, bool) {
	tasks, _ := cp.srv.Unfinished(context.Background())
	for _, t := range tasks {
		if t.VMName == vmName {
			return t.Task, true
		}
	}
	return api.Task{}, false
}

// ServeHTTP serves the agent side of the protocol.
func (cp *ControlPlane) ServeHTTP(w http.ResponseWriter, r *http.Request) { cp.srv.ServeHTTP(w, r) }

// UUIDOf returns the uuid the control plane gave a VM name.
func (cp *ControlPlane) UUIDOf(name string) (string, bool) {
	return cp.srv.UUIDOf(context.Background(), name)
}

// Tasks lists tasks, newest first.
func (cp *ControlPlane) Tasks(ctx context.Context) ([]api.Task, error) {
	all, err := cp.srv.Tasks(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Task, 0, len(all))
	for _, t := range all {
		out = append(out, t.Task)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].CreatedAt.After(out[j].CreatedAt) })
	return out, nil
}
