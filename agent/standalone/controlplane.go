// Package standalone is the agent's single-node mode: an in-process
// control plane that speaks the same /v1/agent protocol as a real one (the
// agent's runner leases, reports progress and completes tasks over HTTP on
// loopback), and the seed-004 /v1/vms API on top of it.
package standalone

import (
	"compress/gzip"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/atomicfile"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/secrets"
)

// leaseTTL is how long a leased task stays with the agent without progress.
const leaseTTL = 60 * time.Second

// task is the control plane's record of one task.
type task struct {
	api.Task
	Spec json.RawMessage `json:"spec,omitempty"`
	// SpecSealed is Spec at rest: a pending create's spec holds user-data
	// and the VNC password, which never stand in clear in a state file.
	SpecSealed  string    `json:"spec_sealed,omitempty"`
	Attempt     int       `json:"attempt"`
	LeaseID     string    `json:"lease_id,omitempty"`
	LeaseExpiry time.Time `json:"lease_expiry,omitempty"`
	Cancel      bool      `json:"cancel,omitempty"`

	done chan struct{} // closed when terminal
}

func (t *task) terminal() bool {
	switch t.Status {
	case api.TaskSuccess, api.TaskFailed, api.TaskCancelled:
		return true
	}
	return false
}

// Defaults of the control plane's queue limits.
const (
	DefaultMaxPendingTasks   = 256
	DefaultMaxPendingCreates = 32
	// retryAfterSeconds is the Retry-After of a refused request.
	retryAfterSeconds = 5
)

// ControlPlane is a single-node control plane. Its state (tasks, desired
// phases) lives in one 0600 JSON file and survives restarts.
type ControlPlane struct {
	// MaxPendingTasks bounds the unfinished tasks (pending or running),
	// MaxPendingCreates the unfinished vm.create tasks among them: over
	// either, Enqueue refuses the task and the API answers 429. Zero
	// means no limit. Set them before serving.
	MaxPendingTasks, MaxPendingCreates int

	box *secrets.Box // seals task specs at rest (SealSpecs)

	path  string
	token string
	log   *zap.Logger

	mu      sync.Mutex
	tasks   map[string]*task
	order   []string          // task ids, oldest first
	desired map[string]string // vm uuid -> phase
	names   map[string]string // vm name -> uuid, for VMs known to the control plane
	wake    chan struct{}     // closed and replaced when a task is queued
	lastHB  time.Time
	vms     map[string]protocol.VMStatus // by uuid, from the last heartbeat
}

type cpState struct {
	Tasks   []*task           `json:"tasks"`
	Desired map[string]string `json:"desired"`
	Names   map[string]string `json:"names"`
}

// NewControlPlane loads (or creates) the state file.
func NewControlPlane(path, token string, log *zap.Logger) (*ControlPlane, error) {
	cp := &ControlPlane{MaxPendingTasks: DefaultMaxPendingTasks, MaxPendingCreates: DefaultMaxPendingCreates,
		path: path, token: token, log: log, tasks: map[string]*task{}, desired: map[string]string{},
		names: map[string]string{}, wake: make(chan struct{}), vms: map[string]protocol.VMStatus{}}
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	if err == nil {
		var st cpState
		if err := json.Unmarshal(b, &st); err != nil {
			return nil, fmt.Errorf("control plane state %s: %w", path, err)
		}
		for _, t := range st.Tasks {
			t.done = make(chan struct{})
			if t.terminal() {
				close(t.done)
			}
			cp.tasks[t.ID] = t
			cp.order = append(cp.order, t.ID)
		}
		if st.Desired != nil {
			cp.desired = st.Desired
		}
		if st.Names != nil {
			cp.names = st.Names
		}
	}
	return cp, nil
}

// SealSpecs makes task specs (user-data, VNC passwords) sealed at rest
// with box from now on, and opens those a previous run sealed.
func (cp *ControlPlane) SealSpecs(box *secrets.Box) error {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	cp.box = box
	var first error
	for _, t := range cp.tasks {
		if t.SpecSealed == "" {
			continue
		}
		plain, err := box.Open(t.SpecSealed, t.ID)
		if err != nil {
			if first == nil {
				first = fmt.Errorf("task %s: %w", t.ID, err)
			}
			continue
		}
		t.Spec, t.SpecSealed = json.RawMessage(plain), ""
	}
	cp.saveLocked()
	return first
}

// saveLocked persists the state: write, fsync, rename.
func (cp *ControlPlane) saveLocked() {
	st := cpState{Desired: cp.desired, Names: cp.names}
	// Keep the newest 1000 tasks.
	ids := cp.order
	if len(ids) > 1000 {
		for _, id := range ids[:len(ids)-1000] {
			if cp.tasks[id].terminal() {
				delete(cp.tasks, id)
			}
		}
		var keep []string
		for _, id := range ids {
			if cp.tasks[id] != nil {
				keep = append(keep, id)
			}
		}
		cp.order = keep
	}
	for _, id := range cp.order {
		t := cp.tasks[id]
		if cp.box != nil && len(t.Spec) > 0 {
			c := *t
			sealed, err := cp.box.Seal(string(c.Spec), c.ID)
			if err != nil {
				cp.log.Error("seal task spec", zap.String("task", c.ID), zap.Error(err))
				continue
			}
			c.Spec, c.SpecSealed = nil, sealed
			t = &c
		}
		st.Tasks = append(st.Tasks, t)
	}
	b, err := json.Marshal(st)
	if err == nil {
		err = atomicfile.Write(cp.path, b, 0o600)
	}
	if err != nil {
		cp.log.Error("persist control plane state", zap.Error(err))
	}
}

// Enqueue adds a task for a VM and wakes a waiting lease.
func (cp *ControlPlane) Enqueue(typ, vmName, vmUUID string, spec any) (api.Task, error) {
	var raw json.RawMessage
	if spec != nil {
		b, err := json.Marshal(spec)
		if err != nil {
			return api.Task{}, err
		}
		raw = b
	}
	now := time.Now().UTC()
	t := &task{Task: api.Task{ID: uuid.NewString(), Type: typ, VMName: vmName, VMUUID: vmUUID, Status: api.TaskPending,
		CreatedAt: now, UpdatedAt: now}, Spec: raw, done: make(chan struct{})}
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if err := cp.admitLocked(typ); err != nil {
		return api.Task{}, err
	}
	cp.tasks[t.ID] = t
	cp.order = append(cp.order, t.ID)
	switch typ {
	case api.TaskCreate:
		cp.names[vmName] = vmUUID
		cp.desired[vmUUID] = api.PhaseRunning
	case api.TaskStart:
		cp.desired[vmUUID] = api.PhaseRunning
	case api.TaskStop, api.TaskPoweroff:
		cp.desired[vmUUID] = api.PhaseStopped
	}
	cp.saveLocked()
	close(cp.wake)
	cp.wake = make(chan struct{})
	return t.Task, nil
}

// tooManyTasksError is Enqueue's refusal when the queue is full.
type tooManyTasksError struct {
	what  string
	limit int
}

func (e *tooManyTasksError) Error() string {
	return fmt.Sprintf("%d %s are queued or running, the most this agent accepts: retry later", e.limit, e.what)
}

// admitLocked refuses a task of type typ when the queue limits are reached.
func (cp *ControlPlane) admitLocked(typ string) error {
	if cp.MaxPendingTasks <= 0 && cp.MaxPendingCreates <= 0 {
		return nil
	}
	tasks, creates := 0, 0
	for _, id := range cp.order {
		if t := cp.tasks[id]; !t.terminal() {
			tasks++
			if t.Type == api.TaskCreate {
				creates++
			}
		}
	}
	if cp.MaxPendingTasks > 0 && tasks >= cp.MaxPendingTasks {
		return &tooManyTasksError{what: "tasks", limit: cp.MaxPendingTasks}
	}
	if typ == api.TaskCreate && cp.MaxPendingCreates > 0 && creates >= cp.MaxPendingCreates {
		return &tooManyTasksError{what: "creates", limit: cp.MaxPendingCreates}
	}
	return nil
}

// Task returns a task by id.
func (cp *ControlPlane) Task(id string) (api.Task, bool) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	t := cp.tasks[id]
	if t == nil {
		return api.Task{}, false
	}
	return t.Task, true
}

// Wait blocks until a task is terminal or ctx ends.
func (cp *ControlPlane) Wait(ctx context.Context, id string) (api.Task, error) {
	cp.mu.Lock()
	t := cp.tasks[id]
	cp.mu.Unlock()
	if t == nil {
		return api.Task{}, errors.New("no such task")
	}
	select {
	case <-t.done:
	case <-ctx.Done():
		return api.Task{}, ctx.Err()
	}
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return t.Task, nil
}

// Busy reports an unfinished task of vmName, if any.
func (cp *ControlPlane) Busy(vmName string) (api.Task, bool) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	for _, id := range cp.order {
		if t := cp.tasks[id]; t.VMName == vmName && !t.terminal() {
			return t.Task, true
		}
	}
	return api.Task{}, false
}

// Forget drops a deleted VM from the desired state.
func (cp *ControlPlane) forgetLocked(vmName, vmUUID string) {
	delete(cp.desired, vmUUID)
	if cp.names[vmName] == vmUUID {
		delete(cp.names, vmName)
	}
}

// ServeHTTP implements the agent side of the protocol.
func (cp *ControlPlane) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	got := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	if subtle.ConstantTimeCompare([]byte(got), []byte(cp.token)) != 1 {
		http.Error(w, `{"error":{"code":"unauthorized","message":"bad token"}}`, http.StatusUnauthorized)
		return
	}
	if r.Method != http.MethodPost {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	var body io.Reader = http.MaxBytesReader(w, r.Body, 8<<20)
	if r.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(body)
		if err != nil {
			http.Error(w, "bad gzip", http.StatusBadRequest)
			return
		}
		defer zr.Close()
		body = io.LimitReader(zr, 64<<20)
	}
	path := r.URL.Path
	var out any
	var err error
	switch {
	case path == protocol.PathRegister:
		var req protocol.RegisterRequest
		if err = json.NewDecoder(body).Decode(&req); err == nil {
			out = protocol.RegisterResponse{ProtocolVersion: protocol.Version, NodeID: req.Node.Name, IntervalSeconds: 5}
		}
	case path == protocol.PathLease:
		var req protocol.LeaseRequest
		if err = json.NewDecoder(body).Decode(&req); err == nil {
			out = cp.lease(r.Context(), req)
		}
	case path == protocol.PathHeartbeat:
		var req protocol.HeartbeatRequest
		if err = json.NewDecoder(body).Decode(&req); err == nil {
			out = cp.heartbeat(req)
		}
	case strings.HasPrefix(path, protocol.PathTaskPrefix) && strings.HasSuffix(path, "/progress"):
		id := strings.TrimSuffix(strings.TrimPrefix(path, protocol.PathTaskPrefix), "/progress")
		var req protocol.ProgressRequest
		if err = json.NewDecoder(body).Decode(&req); err == nil {
			out, err = cp.progress(id, req)
		}
	case strings.HasPrefix(path, protocol.PathTaskPrefix) && strings.HasSuffix(path, "/complete"):
		id := strings.TrimSuffix(strings.TrimPrefix(path, protocol.PathTaskPrefix), "/complete")
		var req protocol.CompleteRequest
		if err = json.NewDecoder(body).Decode(&req); err == nil {
			out, err = cp.complete(id, req)
		}
	default:
		http.NotFound(w, r)
		return
	}
	if err != nil {
		status := http.StatusBadRequest
		if errors.Is(err, errNotFound) {
			status = http.StatusNotFound
		} else if errors.Is(err, errLease) {
			status = http.StatusConflict
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(api.ErrorEnvelope{Error: api.Error{Code: "validation_failed", Message: err.Error()}})
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

var (
	errNotFound = errors.New("no such task")
	errLease    = errors.New("lease does not match")
	errStatus   = errors.New("a task completes with status success, failed or cancelled")
)

func (cp *ControlPlane) lease(ctx context.Context, req protocol.LeaseRequest) protocol.LeaseResponse {
	wait := time.Duration(req.WaitSeconds) * time.Second
	if wait > 30*time.Second {
		wait = 30 * time.Second
	}
	max := req.Max
	if max <= 0 {
		max = 1
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		cp.mu.Lock()
		var out []protocol.Task
		now := time.Now()
		for _, id := range cp.order {
			if len(out) >= max {
				break
			}
			t := cp.tasks[id]
			leasable := t.Status == api.TaskPending || (t.Status == api.TaskRunning && now.After(t.LeaseExpiry))
			if !leasable {
				continue
			}
			t.Attempt++
			t.LeaseID = uuid.NewString()
			t.LeaseExpiry = now.Add(leaseTTL)
			t.Status = api.TaskRunning
			t.UpdatedAt = now.UTC()
			out = append(out, protocol.Task{ID: t.ID, Type: t.Type, VMName: t.VMName, VMUUID: t.VMUUID, Spec: t.Spec,
				Attempt: t.Attempt, LeaseID: t.LeaseID, LeaseExpiresAt: t.LeaseExpiry.UTC(), LeaseTTLSeconds: int(leaseTTL / time.Second)})
		}
		if len(out) > 0 {
			cp.saveLocked()
		}
		wake := cp.wake
		cp.mu.Unlock()
		if len(out) > 0 {
			return protocol.LeaseResponse{Tasks: out}
		}
		select {
		case <-wake:
		case <-timer.C:
			return protocol.LeaseResponse{Tasks: []protocol.Task{}}
		case <-ctx.Done():
			return protocol.LeaseResponse{Tasks: []protocol.Task{}}
		}
	}
}

func (cp *ControlPlane) progress(id string, req protocol.ProgressRequest) (protocol.ProgressResponse, error) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	t := cp.tasks[id]
	if t == nil {
		return protocol.ProgressResponse{}, errNotFound
	}
	if t.LeaseID != req.LeaseID {
		return protocol.ProgressResponse{}, errLease
	}
	t.LeaseExpiry = time.Now().Add(leaseTTL)
	if req.Progress != nil {
		p := *req.Progress
		t.Progress = &p
	}
	t.UpdatedAt = time.Now().UTC()
	return protocol.ProgressResponse{LeaseExpiresAt: t.LeaseExpiry.UTC(), LeaseTTLSeconds: int(leaseTTL / time.Second), Cancelled: t.Cancel}, nil
}

func (cp *ControlPlane) complete(id string, req protocol.CompleteRequest) (any, error) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	t := cp.tasks[id]
	if t == nil {
		return nil, errNotFound
	}
	if t.terminal() {
		return struct{}{}, nil // a retried completion: already recorded
	}
	switch req.Status {
	case api.TaskSuccess, api.TaskFailed, api.TaskCancelled:
	default:
		return nil, fmt.Errorf("%w: %q", errStatus, req.Status)
	}
	t.Status = req.Status
	t.Error = req.Error
	t.Result = req.VM
	t.UpdatedAt = time.Now().UTC()
	t.Spec = nil // may hold user-data: not kept once done
	if t.Type == api.TaskDelete && req.Status == api.TaskSuccess {
		cp.forgetLocked(t.VMName, t.VMUUID)
	}
	if t.Type == api.TaskCreate && req.Status != api.TaskSuccess {
		cp.forgetLocked(t.VMName, t.VMUUID)
	}
	cp.saveLocked()
	close(t.done)
	return struct{}{}, nil
}

func (cp *ControlPlane) heartbeat(req protocol.HeartbeatRequest) protocol.HeartbeatResponse {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	cp.lastHB = time.Now()
	cp.vms = map[string]protocol.VMStatus{}
	for _, v := range req.VMs {
		cp.vms[v.UUID] = v
		// Standalone: the agent's VMs are this control plane's VMs. A VM
		// found on disk that we do not know (state lost) is adopted into
		// the desired state as it is, never deleted.
		if _, ok := cp.desired[v.UUID]; !ok && v.Status != api.StatusCreating {
			phase := api.PhaseStopped
			if v.Status == api.StatusRunning || v.Status == api.StatusPaused {
				phase = api.PhaseRunning
			}
			cp.desired[v.UUID] = phase
			cp.names[v.Name] = v.UUID
		}
	}
	desired := make(map[string]string, len(cp.desired))
	for k, v := range cp.desired {
		desired[k] = v
	}
	return protocol.HeartbeatResponse{IntervalSeconds: 5, Desired: desired}
}

// UUIDOf returns the uuid the control plane gave a VM name.
func (cp *ControlPlane) UUIDOf(name string) (string, bool) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	id, ok := cp.names[name]
	return id, ok
}

// Tasks lists tasks, newest first (for debugging endpoints).
func (cp *ControlPlane) Tasks() []api.Task {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	out := make([]api.Task, 0, len(cp.order))
	for _, id := range cp.order {
		out = append(out, cp.tasks[id].Task)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].CreatedAt.After(out[j].CreatedAt) })
	return out
}

// PipeListener is an in-memory listener: the agent's own protocol client
// reaches the in-process control plane through it (http.Transport's
// DialContext = Dial), so that traffic never takes a connection slot of
// the API's listeners and no other process can reach it.
type PipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

// NewPipeListener returns an open PipeListener.
func NewPipeListener() *PipeListener {
	return &PipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

// Accept waits for the next Dial.
func (l *PipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close makes Accept and Dial fail from now on.
func (l *PipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

// Addr is a placeholder address.
func (l *PipeListener) Addr() net.Addr { return pipeAddr{} }

// Dial connects to the listener; network and addr are ignored.
func (l *PipeListener) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	server, client := net.Pipe()
	var err error
	select {
	case l.conns <- server:
		return client, nil
	case <-l.done:
		err = net.ErrClosed
	case <-ctx.Done():
		err = ctx.Err()
	}
	server.Close()
	client.Close()
	return nil, &net.OpError{Op: "dial", Net: "pipe", Err: err}
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "in-process" }
