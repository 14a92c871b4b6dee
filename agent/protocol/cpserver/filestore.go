package cpserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/atomicfile"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Sealer seals secrets at rest (agent/secrets.Box): a pending create's
// spec holds user-data and the VNC password.
type Sealer interface {
	Seal(plain, purpose string) (string, error)
	Open(sealed, purpose string) (string, error)
}

// FileStore is a MemStore kept in one 0600 JSON file (tasks, desired map),
// replaced durably on every change that must survive a crash: a task
// queued, cancelled or ended, a desired phase. Leases and progress are
// not written: after a restart a task that was leased is offered again
// (the agent's journal keeps its effect exactly once). Volatile tasks are
// never written. Nodes are kept in memory only: the agents tell them
// again.
type FileStore struct {
	mem  *MemStore
	path string
	log  *zap.Logger

	mu     sync.Mutex // serializes changes
	sealer Sealer
	// changes counts the changes to keep (mu held).
	changes uint64

	// saveMu serializes the file's writes; saved is the count of
	// changes the file holds (saveMu held). A change waits for a write
	// that began after it: changes made while a write runs share the
	// next one (group commit), so a burst of changes costs a few writes,
	// not one each.
	saveMu sync.Mutex
	saved  uint64
	// sealed holds the specs a previous run sealed, by task id, until
	// SetSealer opens them.
	sealed map[string]string
}

// fileState is the file's layout.
type fileState struct {
	Tasks   []fileTask        `json:"tasks"`
	Desired map[string]string `json:"desired"` // vm uuid -> phase
	Names   map[string]string `json:"names"`   // vm name -> uuid
}

// fileTask is a task at rest: its spec sealed when a Sealer is set.
type fileTask struct {
	Task
	SpecSealed string `json:"spec_sealed,omitempty"`
}

// DefaultMaxTasks is how many tasks a FileStore keeps.
const DefaultMaxTasks = 1000

// NewFileStore loads (or starts) the store kept in path.
func NewFileStore(path string, log *zap.Logger) (*FileStore, error) {
	if log == nil {
		log = zap.NewNop()
	}
	fs := &FileStore{mem: &MemStore{MaxTasks: DefaultMaxTasks}, path: path, log: log, sealed: map[string]string{}}
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	ctx := context.Background()
	var st fileState
	if err == nil {
		if err := json.Unmarshal(b, &st); err != nil {
			return nil, fmt.Errorf("control plane state %s: %w", path, err)
		}
	}
	for _, t := range st.Tasks {
		if t.SpecSealed != "" {
			fs.sealed[t.ID] = t.SpecSealed // opened by SetSealer
		}
		fs.mem.AddTask(ctx, t.Task)
	}
	byUUID := map[string]string{}
	for name, id := range st.Names {
		byUUID[id] = name
	}
	fs.mem.lock()
	fs.mem.vms = map[string]VM{} // a file store always has an opinion
	fs.mem.mu.Unlock()
	for id, phase := range st.Desired {
		fs.mem.PutVM(ctx, VM{UUID: id, Name: byUUID[id], Phase: phase})
	}
	return fs, nil
}

// SetSealer seals specs at rest with s from now on, opens the specs a
// previous run sealed, and rewrites the file.
func (fs *FileStore) SetSealer(s Sealer) error {
	fs.saveMu.Lock()
	defer fs.saveMu.Unlock()
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.sealer = s
	var first error
	for id, sealed := range fs.sealed {
		plain, err := s.Open(sealed, id)
		if err != nil {
			if first == nil {
				first = fmt.Errorf("task %s: %w", id, err)
			}
			continue
		}
		delete(fs.sealed, id)
		fs.mem.UpdateTask(context.Background(), id, func(t *Task) error {
			t.Spec = json.RawMessage(plain)
			return nil
		})
	}
	fs.saveLocked()
	return first
}

// saveLocked writes the file: write, fsync, rename. fs.saveMu and fs.mu
// held. A failure is logged: the change it was for is already made.
func (fs *FileStore) saveLocked() {
	b, err := fs.encodeLocked(nil, nil)
	if err == nil {
		err = fs.write(b)
	}
	if err != nil {
		fs.log.Error("persist control plane state", zap.Error(err))
	}
	fs.saved = fs.changes
}

// changed counts a change to keep; fs.mu held. The caller then calls
// sync with the count, with fs.mu released.
func (fs *FileStore) changed() uint64 {
	fs.changes++
	return fs.changes
}

// sync returns once the file holds change n: it writes the file unless
// a write that began after change n already did. A failure is logged:
// the change is already made.
func (fs *FileStore) sync(n uint64) {
	fs.saveMu.Lock()
	defer fs.saveMu.Unlock()
	if fs.saved >= n {
		return
	}
	fs.mu.Lock()
	upto := fs.changes
	b, err := fs.encodeLocked(nil, nil)
	fs.mu.Unlock()
	if err == nil {
		err = fs.write(b)
	}
	if err != nil {
		fs.log.Error("persist control plane state", zap.Error(err))
	}
	fs.saved = upto
}

// write replaces the file with b. A full file system is disk_full,
// naming the file.
func (fs *FileStore) write(b []byte) error {
	if err := atomicfile.Write(fs.path, b, 0o600); err != nil {
		return errcode.Wrap(errcode.Internal, err, "persist control plane state %s", fs.path)
	}
	return nil
}

// encodeLocked encodes the file with the stored tasks and extra, and the
// desired map with extraVM, when not nil. fs.mu held.
func (fs *FileStore) encodeLocked(extra *Task, extraVM *VM) ([]byte, error) {
	ctx := context.Background()
	st := fileState{Desired: map[string]string{}, Names: map[string]string{}}
	tasks, _ := fs.mem.Tasks(ctx)
	for _, t := range tasks {
		if t.Volatile {
			continue
		}
		ft := fileTask{Task: t}
		if t.Status == api.TaskRunning {
			// Leases are not kept: offered again after a restart.
			ft.Status, ft.LeaseID, ft.LeaseExpiry, ft.Redeliver = api.TaskPending, "", time.Time{}, 0
		}
		if sealed, ok := fs.sealed[t.ID]; ok && !t.Terminal() {
			ft.SpecSealed = sealed // never opened: kept as it was
		} else if fs.sealer != nil && len(t.Spec) > 0 {
			sealed, err := fs.sealer.Seal(string(t.Spec), t.ID)
			if err != nil {
				fs.log.Error("seal task spec", zap.String("task", t.ID), zap.Error(err))
				continue
			}
			ft.Spec, ft.SpecSealed = nil, sealed
		}
		st.Tasks = append(st.Tasks, ft)
	}
	if extra != nil {
		// A new task's spec is sealed like the others'.
		ft := fileTask{Task: *extra}
		if fs.sealer != nil && len(extra.Spec) > 0 {
			sealed, err := fs.sealer.Seal(string(extra.Spec), extra.ID)
			if err != nil {
				return nil, errcode.Wrap(errcode.Internal, err, "seal task spec")
			}
			ft.Spec, ft.SpecSealed = nil, sealed
		}
		st.Tasks = append(st.Tasks, ft)
	}
	vms, _, _ := fs.mem.VMs(ctx)
	if extraVM != nil {
		vms = append(vms, *extraVM)
	}
	for _, v := range vms {
		st.Desired[v.UUID] = v.Phase
		if v.Name != "" {
			st.Names[v.Name] = v.UUID
		}
	}
	return json.Marshal(st)
}

// AddTask implements Store. The file is written first: a task the file
// cannot hold (a full file system: disk_full) is refused, not queued in
// memory only.
func (fs *FileStore) AddTask(ctx context.Context, t Task) error {
	if t.Volatile {
		fs.mu.Lock()
		defer fs.mu.Unlock()
		if _, err := fs.mem.Task(ctx, t.ID); err == nil {
			return ErrExists
		}
		return fs.mem.AddTask(ctx, t)
	}
	// The file with the task, written before the task is queued: the
	// file's writes stay in order (saveMu), and the file then holds
	// every change so far.
	fs.saveMu.Lock()
	defer fs.saveMu.Unlock()
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if _, err := fs.mem.Task(ctx, t.ID); err == nil {
		return ErrExists
	}
	b, err := fs.encodeLocked(&t, nil)
	if err == nil {
		err = fs.write(b)
	}
	if err != nil {
		return err
	}
	fs.saved = fs.changed()
	if err := fs.mem.AddTask(ctx, t); err != nil {
		fs.saveLocked()
		return err
	}
	return nil
}

// AddCreate implements Store: as AddTask, the file with the task and
// its VM is written before either is stored.
func (fs *FileStore) AddCreate(ctx context.Context, t Task, vm VM, check CreateCheck) error {
	fs.saveMu.Lock()
	defer fs.saveMu.Unlock()
	fs.mu.Lock()
	defer fs.mu.Unlock()
	m := fs.mem
	m.lock()
	err := m.createableLocked(t, vm, check)
	m.mu.Unlock()
	if err != nil {
		return err
	}
	b, err := fs.encodeLocked(&t, &vm)
	if err == nil {
		err = fs.write(b)
	}
	if err != nil {
		return err
	}
	fs.saved = fs.changed()
	// fs.mu held: no change came between the check and this one.
	if err := m.AddCreate(ctx, t, vm, nil); err != nil {
		fs.saveLocked()
		return err
	}
	return nil
}

// UpdateTask implements Store.
func (fs *FileStore) UpdateTask(ctx context.Context, id string, fn func(*Task) error) (Task, error) {
	fs.mu.Lock()
	var before Task
	t, err := fs.mem.UpdateTask(ctx, id, func(t *Task) error {
		before = *t
		return fn(t)
	})
	if err != nil || !durableChange(&before, &t) {
		fs.mu.Unlock()
		return t, err
	}
	n := fs.changed()
	fs.mu.Unlock()
	fs.sync(n)
	return t, nil
}

// durableChange reports whether an update changed what the file keeps of
// a task: it ended (or was queued again), or was asked to cancel.
func durableChange(before, after *Task) bool {
	if after.Volatile {
		return false
	}
	return before.Terminal() != after.Terminal() || before.Cancel != after.Cancel
}

// Task implements Store.
func (fs *FileStore) Task(ctx context.Context, id string) (Task, error) { return fs.mem.Task(ctx, id) }

// Tasks implements Store.
func (fs *FileStore) Tasks(ctx context.Context) ([]Task, error) { return fs.mem.Tasks(ctx) }

// Unfinished implements Store.
func (fs *FileStore) Unfinished(ctx context.Context) ([]Task, error) { return fs.mem.Unfinished(ctx) }

// NodeUnfinished implements Store.
func (fs *FileStore) NodeUnfinished(ctx context.Context, node string) ([]Task, error) {
	return fs.mem.NodeUnfinished(ctx, node)
}

// VMs implements Store.
func (fs *FileStore) VMs(ctx context.Context) ([]VM, bool, error) { return fs.mem.VMs(ctx) }

// NodeVMs implements Store.
func (fs *FileStore) NodeVMs(ctx context.Context, node string) ([]VM, bool, error) {
	return fs.mem.NodeVMs(ctx, node)
}

// VM implements Store.
func (fs *FileStore) VM(ctx context.Context, uuid string) (VM, bool, error) {
	return fs.mem.VM(ctx, uuid)
}

// VMByName implements Store.
func (fs *FileStore) VMByName(ctx context.Context, name string) (VM, bool, error) {
	return fs.mem.VMByName(ctx, name)
}

// PutVM implements Store.
func (fs *FileStore) PutVM(ctx context.Context, vm VM) error {
	fs.mu.Lock()
	fs.mem.PutVM(ctx, vm)
	n := fs.changed()
	fs.mu.Unlock()
	fs.sync(n)
	return nil
}

// DeleteVM implements Store.
func (fs *FileStore) DeleteVM(ctx context.Context, uuid string) error {
	fs.mu.Lock()
	fs.mem.DeleteVM(ctx, uuid)
	n := fs.changed()
	fs.mu.Unlock()
	fs.sync(n)
	return nil
}

// PutNode implements Store (in memory only).
func (fs *FileStore) PutNode(ctx context.Context, n Node) error { return fs.mem.PutNode(ctx, n) }

// Nodes implements Store.
func (fs *FileStore) Nodes(ctx context.Context) ([]Node, error) { return fs.mem.Nodes(ctx) }

// Changed implements Store.
func (fs *FileStore) Changed() <-chan struct{} { return fs.mem.Changed() }

// NodeChanged implements Store.
func (fs *FileStore) NodeChanged(node string) <-chan struct{} { return fs.mem.NodeChanged(node) }

var _ Store = (*FileStore)(nil)
