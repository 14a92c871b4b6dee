// Package cpserver is the server side of the agent protocol
// (docs/protocol.md): registration, long-poll leases with expiry and
// redelivery, progress extending a lease, idempotent completions,
// heartbeats answered with the desired map, gzip request bodies and
// Retry-After on refusals.
//
// It is the one implementation of that side: the standalone mode's
// in-process control plane serves it over a file-backed store, and the
// tests' fake control plane (agent/protocol/cptest) over a memory store
// with fault injection in front. Its state lives behind Store.
package cpserver

import (
	"compress/gzip"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/internal/httpmux"
)

// Defaults of Server's knobs.
const (
	DefaultLeaseTTL          = 60 * time.Second
	DefaultMaxWait           = 30 * time.Second
	DefaultHeartbeatInterval = 10 * time.Second
	// RetryAfterSeconds is the Retry-After of a refused (429) request.
	RetryAfterSeconds = 5
	// MaxBody bounds a request body as sent, MaxInflated once gunzipped.
	MaxBody     = 8 << 20
	MaxInflated = 64 << 20
)

// Server is a control plane's agent-facing side. Set its fields before
// serving; the zero value serves from a fresh MemStore and accepts any
// bearer token.
type Server struct {
	// Store holds the state; nil means a MemStore made on first use.
	Store Store
	// Token, when set, is the bearer token every request must carry.
	Token string
	// LeaseTTL is the lease handed out; default DefaultLeaseTTL.
	LeaseTTL time.Duration
	// MaxWait caps a lease's long poll; default DefaultMaxWait.
	MaxWait time.Duration
	// HeartbeatInterval is sent in register and heartbeat answers;
	// default DefaultHeartbeatInterval.
	HeartbeatInterval time.Duration
	// NodeID names a registering node; default: its name.
	NodeID func(name string) string
	// NewLeaseID makes lease ids; default: random uuids.
	NewLeaseID func() string
	// MaxPendingTasks bounds the unfinished tasks (pending or running),
	// MaxPendingCreates the unfinished vm.create tasks among them: over
	// either, Enqueue returns a *TooManyTasksError. Zero: no limit.
	MaxPendingTasks, MaxPendingCreates int
	// DesiredFollowsTasks makes Enqueue set desired phases (vm.create
	// and vm.start: running; vm.stop and vm.poweroff: stopped), and a
	// successful vm.delete or a failed vm.create forget the VM.
	DesiredFollowsTasks bool
	// AdoptUnknownVMs puts a heartbeat's VMs that the desired map lacks
	// into it as they are (running or paused: running; else stopped),
	// so a VM is never an orphan (single-node mode, state lost).
	AdoptUnknownVMs bool
	// NodeScoped (cluster mode) makes a VM adopted from a heartbeat
	// belong to the node that reported it, so no other node is told
	// about it.
	NodeScoped bool
	// CheckCreate, when set, checks a vm.create that Enqueue stores
	// (with DesiredFollowsTasks) against its node as the store holds
	// it then (Store.AddCreate): cluster mode's capacity check, which
	// two creates for one node cannot both pass on the same free
	// memory. Its error is Enqueue's.
	CheckCreate func(t Task, node Node, open []Task) error
	// Log receives errors the agent cannot be told about; nil: none.
	Log *zap.Logger

	once    sync.Once
	mux     *http.ServeMux
	enqueue sync.Mutex // admission is check-then-add
	leaseMu sync.Mutex // one lease pick at a time
}

func (s *Server) init() {
	s.once.Do(func() {
		if s.Store == nil {
			s.Store = &MemStore{}
		}
		if s.Log == nil {
			s.Log = zap.NewNop()
		}
		mux := http.NewServeMux()
		mux.HandleFunc("POST "+protocol.PathRegister, handle(s.Register))
		mux.HandleFunc("POST "+protocol.PathLease, handle(s.Lease))
		mux.HandleFunc("POST "+protocol.PathHeartbeat, handle(s.Heartbeat))
		mux.HandleFunc("POST "+protocol.PathTaskPrefix+"{id}/progress", handleTask(s.Progress))
		mux.HandleFunc("POST "+protocol.PathTaskPrefix+"{id}/complete", handleTask(s.complete))
		s.mux = mux
	})
}

func (s *Server) leaseTTL() time.Duration {
	if s.LeaseTTL > 0 {
		return s.LeaseTTL
	}
	return DefaultLeaseTTL
}

func (s *Server) maxWait() time.Duration {
	if s.MaxWait > 0 {
		return s.MaxWait
	}
	return DefaultMaxWait
}

func (s *Server) interval() int {
	if s.HeartbeatInterval > 0 {
		return int(s.HeartbeatInterval / time.Second)
	}
	return int(DefaultHeartbeatInterval / time.Second)
}

// ServeHTTP serves /v1/agent/...: it checks the token, inflates gzip
// bodies and answers errors in the protocol's envelope.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.init()
	if s.Token != "" {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(s.Token)) != 1 {
			WriteError(w, http.StatusUnauthorized, "unauthorized", "bad or missing bearer token")
			return
		}
	}
	var body io.Reader = http.MaxBytesReader(w, r.Body, MaxBody)
	if r.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(body)
		if err != nil {
			WriteError(w, http.StatusBadRequest, "validation_failed", "bad gzip body")
			return
		}
		defer zr.Close()
		body = io.LimitReader(zr, MaxInflated)
	}
	r.Body = io.NopCloser(body)
	// No route: net/http would answer in plain text.
	switch status, allow := httpmux.Unrouted(s.mux, r); status {
	case http.StatusMethodNotAllowed:
		w.Header().Set("Allow", allow)
		WriteError(w, http.StatusMethodNotAllowed, "validation_failed", "method "+r.Method+" is not allowed on "+r.URL.Path)
		return
	case http.StatusNotFound:
		WriteError(w, http.StatusNotFound, "not_found", "no such endpoint: "+r.Method+" "+r.URL.Path)
		return
	}
	s.mux.ServeHTTP(w, r)
}

// handle adapts a method taking and returning wire types.
func handle[Req, Resp any](fn func(context.Context, Req) (Resp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			WriteError(w, http.StatusBadRequest, "validation_failed", "decode body: "+err.Error())
			return
		}
		out, err := fn(r.Context(), req)
		if err != nil {
			writeErr(w, err)
			return
		}
		WriteJSON(w, out)
	}
}

// handleTask is handle for /v1/agent/tasks/{id}/...
func handleTask[Req, Resp any](fn func(context.Context, string, Req) (Resp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		handle(func(ctx context.Context, req Req) (Resp, error) { return fn(ctx, id, req) })(w, r)
	}
}

// Errors of the Go API, each answered with its status over HTTP.
var (
	// ErrLeaseLost: progress on a lease that expired or was replaced
	// (409 conflict).
	ErrLeaseLost = errors.New("lease is not current")
	// ErrBadStatus: a completion whose status is not terminal (400).
	ErrBadStatus = errors.New("a task completes with status success, failed or cancelled")
)

// TooManyTasksError is Enqueue's refusal when the queue is full (429 with
// Retry-After over HTTP).
type TooManyTasksError struct {
	What  string // "tasks" or "creates"
	Limit int
}

func (e *TooManyTasksError) Error() string {
	return fmt.Sprintf("%d %s are queued or running, the most this agent accepts: retry later", e.Limit, e.What)
}

func writeErr(w http.ResponseWriter, err error) {
	code, retry := ErrorCode(err)
	if retry {
		w.Header().Set("Retry-After", strconv.Itoa(RetryAfterSeconds))
	}
	WriteError(w, errcode.HTTPStatus(code), string(code), err.Error())
}

// ErrorCode is the code an error of the Go API is answered with over HTTP
// (its status is errcode.HTTPStatus's), and whether the answer carries
// Retry-After (RetryAfterSeconds).
func ErrorCode(err error) (code errcode.Code, retryAfter bool) {
	var busy *TooManyTasksError
	switch {
	case errors.Is(err, ErrNotFound):
		return errcode.NotFound, false
	case errors.Is(err, ErrLeaseLost), errors.Is(err, ErrNotCancellable):
		return errcode.Conflict, false
	case errors.Is(err, ErrBadStatus):
		return errcode.ValidationFailed, false
	case errors.Is(err, ErrUnavailable):
		return errcode.ClusterUnavailable, true
	case errors.As(err, &busy):
		return errcode.RateLimited, true
	}
	return errcode.Internal, false
}

// WriteError answers the protocol's error envelope.
func WriteError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(api.ErrorEnvelope{Error: api.Error{Code: code, Message: msg}})
}

// WriteJSON answers 200 with v.
func WriteJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

// Register answers a registration and records the node.
func (s *Server) Register(ctx context.Context, req protocol.RegisterRequest) (protocol.RegisterResponse, error) {
	s.init()
	info := req.Node
	if err := s.Store.PutNode(ctx, Node{Name: req.Node.Name, Info: &info}); err != nil {
		return protocol.RegisterResponse{}, err
	}
	if err := s.releaseLeases(ctx, req.Node.Name); err != nil {
		return protocol.RegisterResponse{}, err
	}
	id := req.Node.Name
	if s.NodeID != nil {
		id = s.NodeID(req.Node.Name)
	}
	return protocol.RegisterResponse{ProtocolVersion: protocol.Version, NodeID: id, IntervalSeconds: s.interval()}, nil
}

// releaseLeases makes the tasks leased to a node that registers again
// (its agent restarted) leasable at once: whatever it held is in its
// journal, which decides on redelivery (done, rolled back and run again,
// or converged), so nothing waits for the leases to expire.
func (s *Server) releaseLeases(ctx context.Context, node string) error {
	tasks, err := s.Store.Tasks(ctx)
	if err != nil {
		return err
	}
	now := time.Now().UTC()
	for _, t := range tasks {
		if t.Terminal() || t.Status != api.TaskRunning || (t.Node != "" && t.Node != node) || !t.LeaseExpiry.After(now) {
			continue
		}
		if _, err := s.Store.UpdateTask(ctx, t.ID, func(x *Task) error {
			if x.Status == api.TaskRunning && x.LeaseExpiry.After(now) {
				x.LeaseExpiry = now
			}
			return nil
		}); err != nil && !errors.Is(err, ErrNotFound) {
			return err
		}
	}
	return nil
}

// Heartbeat records a node's heartbeat and answers its desired map.
func (s *Server) Heartbeat(ctx context.Context, req protocol.HeartbeatRequest) (protocol.HeartbeatResponse, error) {
	s.init()
	// Info nil (no node_info): the store keeps the recorded one.
	n := Node{Name: req.Node, State: req.State, LastHeartbeat: time.Now().UTC(), VMs: req.VMs, Info: req.NodeInfo}
	if err := s.Store.PutNode(ctx, n); err != nil {
		return protocol.HeartbeatResponse{}, err
	}
	// The node's own VMs, and the VMs it reports that are placed
	// elsewhere: never the whole map.
	vms, known, err := s.Store.NodeVMs(ctx, req.Node)
	if err != nil {
		return protocol.HeartbeatResponse{}, err
	}
	vms, err = s.reported(ctx, req, vms)
	if err != nil {
		return protocol.HeartbeatResponse{}, err
	}
	if s.AdoptUnknownVMs {
		if vms, err = s.adopt(ctx, req, vms); err != nil {
			return protocol.HeartbeatResponse{}, err
		}
	}
	if vms, err = s.recordStopped(ctx, req, vms); err != nil {
		return protocol.HeartbeatResponse{}, err
	}
	resp := protocol.HeartbeatResponse{IntervalSeconds: s.interval()}
	if known || s.AdoptUnknownVMs {
		resp.Desired = map[string]string{}
		for _, v := range vms {
			if v.Node == "" || v.Node == req.Node {
				resp.Desired[v.UUID] = v.Phase
			}
		}
	}
	return resp, nil
}

// reported adds to vms (the node's VMs) those the heartbeat reports that
// the desired map places on another node.
func (s *Server) reported(ctx context.Context, req protocol.HeartbeatRequest, vms []VM) ([]VM, error) {
	have := make(map[string]bool, len(vms))
	for _, v := range vms {
		have[v.UUID] = true
	}
	for _, st := range req.VMs {
		if have[st.UUID] {
			continue
		}
		v, ok, err := s.Store.VM(ctx, st.UUID)
		if err != nil {
			return nil, err
		}
		if ok {
			vms = append(vms, v)
			have[st.UUID] = true
		}
	}
	return vms, nil
}

// recordStopped records as desired stopped the VMs the agent reports
// desired stopped on a fact of its own (the guest powered itself off, a
// host boot without autostart): the agent will not start them, and the
// desired map must say so. A VM with an unfinished task is left to the
// task (a vm.start queued after the fact wins).
func (s *Server) recordStopped(ctx context.Context, req protocol.HeartbeatRequest, vms []VM) ([]VM, error) {
	var busy map[string]bool
	for _, st := range req.VMs {
		if st.DesiredPhase != api.PhaseStopped {
			continue
		}
		for i, v := range vms {
			if v.UUID != st.UUID || v.Phase != api.PhaseRunning {
				continue
			}
			if busy == nil {
				tasks, err := s.Store.Unfinished(ctx)
				if err != nil {
					return nil, err
				}
				busy = map[string]bool{}
				for _, t := range tasks {
					if !t.Terminal() {
						busy[t.VMUUID] = true
					}
				}
			}
			if busy[v.UUID] {
				continue
			}
			v.Phase = api.PhaseStopped
			if err := s.Store.PutVM(ctx, v); err != nil {
				return nil, err
			}
			vms[i] = v
		}
	}
	return vms, nil
}

// adopt puts the heartbeat's VMs the desired map lacks into it.
func (s *Server) adopt(ctx context.Context, req protocol.HeartbeatRequest, vms []VM) ([]VM, error) {
	have := make(map[string]bool, len(vms))
	for _, v := range vms {
		have[v.UUID] = true
	}
	for _, v := range req.VMs {
		if have[v.UUID] || v.Status == api.StatusCreating {
			continue
		}
		phase := api.PhaseStopped
		if v.Status == api.StatusRunning || v.Status == api.StatusPaused {
			phase = api.PhaseRunning
		}
		vm := VM{UUID: v.UUID, Name: v.Name, Phase: phase}
		if s.NodeScoped {
			vm.Node = req.Node
		}
		if err := s.Store.PutVM(ctx, vm); err != nil {
			return nil, err
		}
		vms = append(vms, vm)
	}
	return vms, nil
}

// Nodes returns the nodes that registered or sent a heartbeat.
func (s *Server) Nodes(ctx context.Context) ([]Node, error) {
	s.init()
	return s.Store.Nodes(ctx)
}

// SetDesired sets one VM's desired phase; phase "" forgets the VM. The
// first call turns heartbeat answers from "no opinion" into a map.
func (s *Server) SetDesired(ctx context.Context, vm VM) error {
	s.init()
	if vm.Phase == "" {
		return s.Store.DeleteVM(ctx, vm.UUID)
	}
	return s.Store.PutVM(ctx, vm)
}

// VMs returns the desired map (known: false for "no opinion").
func (s *Server) VMs(ctx context.Context) ([]VM, bool, error) {
	s.init()
	return s.Store.VMs(ctx)
}

// UUIDOf returns the uuid of a VM of the desired map by name.
func (s *Server) UUIDOf(ctx context.Context, name string) (string, bool) {
	v, ok, err := s.VMByName(ctx, name)
	if err != nil || !ok {
		return "", false
	}
	return v.UUID, true
}

// VMByName returns the VM of the desired map holding name (one read of
// the store's index).
func (s *Server) VMByName(ctx context.Context, name string) (VM, bool, error) {
	s.init()
	return s.Store.VMByName(ctx, name)
}

func (s *Server) newLeaseID() string {
	if s.NewLeaseID != nil {
		return s.NewLeaseID()
	}
	return uuid.NewString()
}
