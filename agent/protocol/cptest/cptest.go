// Package cptest is an in-memory control plane for tests: an http.Handler,
// usable from its zero value, that speaks the agent side of
// docs/protocol.md.
//
//	var cp cptest.Server
//	cp.Token = "secret"
//	ts := httptest.NewServer(&cp)
//	cp.Enqueue(protocol.Task{ID: "t1", Type: api.TaskStart, VMName: "web-1", VMUUID: "u1"})
//	got, err := cp.WaitCompletion(ctx, "t1")
//
// It queues tasks and hands out leases, records every request, sets
// desired phases and injects faults: dropped connections, error statuses
// with Retry-After, delays, duplicate delivery, lease expiry and
// cancellation. Wait helpers block on state changes, never on sleeps.
package cptest

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
)

// Endpoint names used by counters and faults.
const (
	Register  = "register"
	Lease     = "lease"
	Progress  = "progress"
	Complete  = "complete"
	Heartbeat = "heartbeat"
)

// FaultKind says what a fault does to a request.
type FaultKind int

const (
	// FaultStatus answers Status (and Retry-After when set).
	FaultStatus FaultKind = iota
	// FaultDrop closes the connection without an answer.
	FaultDrop
	// FaultDelay waits Delay (or until the request is abandoned), then
	// serves the request normally.
	FaultDelay
)

// Fault is an injected failure.
type Fault struct {
	Endpoint   string // one of the endpoint names; "" hits every endpoint
	Kind       FaultKind
	Status     int    // FaultStatus: e.g. 503 or 429
	RetryAfter string // FaultStatus: Retry-After header value
	Delay      time.Duration
	// Times is how many requests the fault hits; 0 means every request
	// until ClearFaults.
	Times int
}

// Completion is one received completion.
type Completion struct {
	TaskID string
	protocol.CompleteRequest
	// Duplicate is true when the task had already been completed.
	Duplicate bool
}

// ProgressReport is one received progress request.
type ProgressReport struct {
	TaskID string
	protocol.ProgressRequest
}

// Server is the fake control plane. The zero value is ready to use.
type Server struct {
	// Token, when set, is the bearer token every request must carry.
	Token string
	// LeaseTTL is the lease duration handed out; default 60s.
	LeaseTTL time.Duration
	// HeartbeatInterval is sent in register and heartbeat answers;
	// default 10s.
	HeartbeatInterval time.Duration

	once sync.Once
	mux  *http.ServeMux

	mu            sync.Mutex
	changed       chan struct{}
	leaseSeq      int
	tasks         map[string]*task
	order         []string
	desired       map[string]string
	faults        []*Fault
	registrations []protocol.RegisterRequest
	heartbeats    []protocol.HeartbeatRequest
	progress      []ProgressReport
	completions   []Completion
	counts        map[string]int
	wireBytes     map[string]int64
	gzipped       map[string]int
}

type taskState int

const (
	queued taskState = iota
	leased
	done
	cancelledPending // cancelled before any lease: never offered
)

type task struct {
	t          protocol.Task
	state      taskState
	expires    time.Time
	expired    bool // forced by Expire
	dups       int  // pending duplicate deliveries of the current lease
	cancel     bool
	deliveries int
}

func (s *Server) init() {
	s.once.Do(func() {
		mux := http.NewServeMux()
		mux.HandleFunc("POST "+protocol.PathRegister, s.handle(Register, s.register))
		mux.HandleFunc("POST "+protocol.PathLease, s.handle(Lease, s.lease))
		mux.HandleFunc("POST "+protocol.PathHeartbeat, s.handle(Heartbeat, s.heartbeat))
		mux.HandleFunc("POST "+protocol.PathTaskPrefix+"{id}/progress", s.handle(Progress, s.progressH))
		mux.HandleFunc("POST "+protocol.PathTaskPrefix+"{id}/complete", s.handle(Complete, s.complete))
		s.mux = mux
	})
}

// lock takes the mutex and makes the maps.
func (s *Server) lock() {
	s.mu.Lock()
	if s.tasks == nil {
		s.tasks = map[string]*task{}
		s.counts = map[string]int{}
		s.wireBytes = map[string]int64{}
		s.gzipped = map[string]int{}
		s.changed = make(chan struct{})
	}
}

// notify wakes every waiter; call with mu held.
func (s *Server) notify() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.init()
	s.mux.ServeHTTP(w, r)
}

type handlerFunc func(w http.ResponseWriter, r *http.Request, body []byte)

// handle counts, authenticates, applies faults and decompresses.
func (s *Server) handle(name string, h handlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		raw, err := io.ReadAll(r.Body)
		s.lock()
		s.counts[name]++
		s.wireBytes[name] += int64(len(raw))
		gz := r.Header.Get("Content-Encoding") == "gzip"
		if gz {
			s.gzipped[name]++
		}
		f := s.takeFault(name)
		s.notify()
		s.mu.Unlock()
		if err != nil {
			writeError(w, http.StatusBadRequest, "validation_failed", "read body: "+err.Error())
			return
		}
		if s.Token != "" && r.Header.Get("Authorization") != "Bearer "+s.Token {
			writeError(w, http.StatusUnauthorized, "unauthorized", "bad or missing bearer token")
			return
		}
		if f != nil {
			switch f.Kind {
			case FaultStatus:
				if f.RetryAfter != "" {
					w.Header().Set("Retry-After", f.RetryAfter)
				}
				writeError(w, f.Status, "injected", fmt.Sprintf("injected %d", f.Status))
				return
			case FaultDrop:
				drop(w)
				return
			case FaultDelay:
				t := time.NewTimer(f.Delay)
				select {
				case <-t.C:
				case <-r.Context().Done():
					t.Stop()
					return
				}
			}
		}
		body := raw
		if gz {
			zr, err := gzip.NewReader(bytes.NewReader(raw))
			if err == nil {
				body, err = io.ReadAll(zr)
			}
			if err != nil {
				writeError(w, http.StatusBadRequest, "validation_failed", "bad gzip body")
				return
			}
		}
		h(w, r, body)
	}
}

func (s *Server) takeFault(name string) *Fault {
	for i, f := range s.faults {
		if f.Endpoint != "" && f.Endpoint != name {
			continue
		}
		if f.Times > 0 {
			f.Times--
			if f.Times == 0 {
				s.faults = append(s.faults[:i:i], s.faults[i+1:]...)
			}
		}
		return f
	}
	return nil
}

func drop(w http.ResponseWriter) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler)
	}
	conn, _, err := hj.Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	conn.Close()
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(api.ErrorEnvelope{Error: api.Error{Code: code, Message: msg}})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func decode(w http.ResponseWriter, body []byte, v any) bool {
	if err := json.Unmarshal(body, v); err != nil {
		writeError(w, http.StatusBadRequest, "validation_failed", "decode body: "+err.Error())
		return false
	}
	return true
}

func (s *Server) interval() int {
	if s.HeartbeatInterval > 0 {
		return int(s.HeartbeatInterval / time.Second)
	}
	return 10
}

func (s *Server) ttl() time.Duration {
	if s.LeaseTTL > 0 {
		return s.LeaseTTL
	}
	return 60 * time.Second
}

func (s *Server) register(w http.ResponseWriter, r *http.Request, body []byte) {
	var req protocol.RegisterRequest
	if !decode(w, body, &req) {
		return
	}
	s.lock()
	s.registrations = append(s.registrations, req)
	s.notify()
	s.mu.Unlock()
	writeJSON(w, protocol.RegisterResponse{ProtocolVersion: protocol.Version, NodeID: "node-" + req.Node.Name, IntervalSeconds: s.interval()})
}

func (s *Server) heartbeat(w http.ResponseWriter, r *http.Request, body []byte) {
	var req protocol.HeartbeatRequest
	if !decode(w, body, &req) {
		return
	}
	s.lock()
	s.heartbeats = append(s.heartbeats, req)
	var desired map[string]string
	if s.desired != nil {
		desired = make(map[string]string, len(s.desired))
		for k, v := range s.desired {
			desired[k] = v
		}
	}
	s.notify()
	s.mu.Unlock()
	writeJSON(w, protocol.HeartbeatResponse{IntervalSeconds: s.interval(), Desired: desired})
}

// maxWait caps a long poll.
const maxWait = 60 * time.Second

func (s *Server) lease(w http.ResponseWriter, r *http.Request, body []byte) {
	var req protocol.LeaseRequest
	if !decode(w, body, &req) {
		return
	}
	max := req.Max
	if max <= 0 {
		max = 1
	}
	wait := min(time.Duration(req.WaitSeconds)*time.Second, maxWait)
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		s.lock()
		tasks := s.offer(max)
		ch := s.changed
		if len(tasks) > 0 {
			s.notify()
		}
		s.mu.Unlock()
		if len(tasks) > 0 || wait <= 0 {
			writeJSON(w, protocol.LeaseResponse{Tasks: tasks})
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			wait = 0
		case <-r.Context().Done():
			return
		}
	}
}

// offer picks up to max deliverable tasks in enqueue order; mu held.
func (s *Server) offer(max int) []protocol.Task {
	now := time.Now()
	var out []protocol.Task
	for _, id := range s.order {
		if len(out) == max {
			break
		}
		t := s.tasks[id]
		switch {
		case t.state == queued:
			t.t.Attempt++
			s.newLease(t, now)
		case t.state == leased && t.dups > 0 && !t.expired:
			t.dups-- // same lease, delivered once more
		case t.state == leased && (t.expired || now.After(t.expires)):
			t.t.Attempt++
			s.newLease(t, now)
		default:
			continue
		}
		t.deliveries++
		out = append(out, t.t)
	}
	return out
}

func (s *Server) newLease(t *task, now time.Time) {
	s.leaseSeq++
	t.state = leased
	t.expired = false
	t.expires = now.Add(s.ttl())
	t.t.LeaseID = fmt.Sprintf("lease-%d", s.leaseSeq)
	t.t.LeaseExpiresAt = t.expires.UTC()
	t.t.LeaseTTLSeconds = int(s.ttl() / time.Second)
}

func (s *Server) progressH(w http.ResponseWriter, r *http.Request, body []byte) {
	id := r.PathValue("id")
	var req protocol.ProgressRequest
	if !decode(w, body, &req) {
		return
	}
	s.lock()
	defer s.mu.Unlock()
	t, ok := s.tasks[id]
	if !ok {
		writeError(w, http.StatusNotFound, "not_found", "no task "+id)
		return
	}
	s.progress = append(s.progress, ProgressReport{TaskID: id, ProgressRequest: req})
	s.notify()
	switch {
	case t.state == done:
		writeJSON(w, protocol.ProgressResponse{Cancelled: t.cancel})
	case req.LeaseID != t.t.LeaseID || t.expired:
		writeError(w, http.StatusConflict, "conflict", "lease "+req.LeaseID+" is not current")
	default:
		t.expires = time.Now().Add(s.ttl())
		writeJSON(w, protocol.ProgressResponse{
			LeaseExpiresAt:  t.expires.UTC(),
			LeaseTTLSeconds: int(s.ttl() / time.Second),
			Cancelled:       t.cancel,
		})
	}
}

func (s *Server) complete(w http.ResponseWriter, r *http.Request, body []byte) {
	id := r.PathValue("id")
	var req protocol.CompleteRequest
	if !decode(w, body, &req) {
		return
	}
	s.lock()
	defer s.mu.Unlock()
	t, ok := s.tasks[id]
	if !ok {
		writeError(w, http.StatusNotFound, "not_found", "no task "+id)
		return
	}
	s.completions = append(s.completions, Completion{TaskID: id, CompleteRequest: req, Duplicate: t.state == done})
	t.state = done
	s.notify()
	writeJSON(w, struct{}{})
}

// Enqueue queues a task for the next lease. Attempt and lease fields are
// filled in when it is leased. Enqueueing a known id queues it again.
func (s *Server) Enqueue(t protocol.Task) {
	s.lock()
	defer s.mu.Unlock()
	if _, ok := s.tasks[t.ID]; !ok {
		s.order = append(s.order, t.ID)
	}
	t.Attempt, t.LeaseID = 0, ""
	s.tasks[t.ID] = &task{t: t}
	s.notify()
}

// Duplicate delivers the task's current lease once more in a later lease
// answer, as a retransmitted answer would. On a task not yet leased it
// applies after the first lease.
func (s *Server) Duplicate(taskID string) {
	s.lock()
	defer s.mu.Unlock()
	if t, ok := s.tasks[taskID]; ok {
		t.dups++
		s.notify()
	}
}

// Expire ends the task's lease now: the next lease offers it again with a
// new lease id and attempt+1, and progress on the old lease gets 409.
func (s *Server) Expire(taskID string) {
	s.lock()
	defer s.mu.Unlock()
	if t, ok := s.tasks[taskID]; ok && t.state == leased {
		t.expired = true
		t.dups = 0
		s.notify()
	}
}

// Cancel cancels a task: a queued task is never offered, a leased one is
// told so in its next progress answer.
func (s *Server) Cancel(taskID string) {
	s.lock()
	defer s.mu.Unlock()
	if t, ok := s.tasks[taskID]; ok {
		t.cancel = true
		if t.state == queued {
			t.state = cancelledPending
		}
		s.notify()
	}
}

// SetDesired sets one VM's desired phase; phase "" forgets the VM. The
// first call switches heartbeat answers from "no opinion" to a map.
func (s *Server) SetDesired(vmUUID, phase string) {
	s.lock()
	defer s.mu.Unlock()
	if s.desired == nil {
		s.desired = map[string]string{}
	}
	if phase == "" {
		delete(s.desired, vmUUID)
	} else {
		s.desired[vmUUID] = phase
	}
	s.notify()
}

// AddFault injects a fault; faults apply in the order added.
func (s *Server) AddFault(f Fault) {
	s.lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, &f)
}

// ClearFaults removes every fault.
func (s *Server) ClearFaults() {
	s.lock()
	defer s.mu.Unlock()
	s.faults = nil
}

// Count returns how many requests reached an endpoint, faulted ones
// included.
func (s *Server) Count(endpoint string) int {
	s.lock()
	defer s.mu.Unlock()
	return s.counts[endpoint]
}

// TotalCount returns how many requests reached the server.
func (s *Server) TotalCount() int {
	s.lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.counts {
		n += c
	}
	return n
}

// WireBytes returns the request body bytes an endpoint received as sent
// (compressed when gzipped), and how many of its requests were gzipped.
func (s *Server) WireBytes(endpoint string) (bytes int64, gzipped int) {
	s.lock()
	defer s.mu.Unlock()
	return s.wireBytes[endpoint], s.gzipped[endpoint]
}

// Registrations returns the registrations received.
func (s *Server) Registrations() []protocol.RegisterRequest {
	s.lock()
	defer s.mu.Unlock()
	return append([]protocol.RegisterRequest(nil), s.registrations...)
}

// Heartbeats returns the heartbeats received.
func (s *Server) Heartbeats() []protocol.HeartbeatRequest {
	s.lock()
	defer s.mu.Unlock()
	return append([]protocol.HeartbeatRequest(nil), s.heartbeats...)
}

// Completions returns every completion received, duplicates included.
func (s *Server) Completions() []Completion {
	s.lock()
	defer s.mu.Unlock()
	return append([]Completion(nil), s.completions...)
}

// CompletionsOf returns the completions received for one task.
func (s *Server) CompletionsOf(taskID string) []Completion {
	s.lock()
	defer s.mu.Unlock()
	var out []Completion
	for _, c := range s.completions {
		if c.TaskID == taskID {
			out = append(out, c)
		}
	}
	return out
}

// ProgressOf returns the progress reports received for one task.
func (s *Server) ProgressOf(taskID string) []ProgressReport {
	s.lock()
	defer s.mu.Unlock()
	var out []ProgressReport
	for _, p := range s.progress {
		if p.TaskID == taskID {
			out = append(out, p)
		}
	}
	return out
}

// Deliveries returns how many times a task was handed out in lease answers.
func (s *Server) Deliveries(taskID string) int {
	s.lock()
	defer s.mu.Unlock()
	if t, ok := s.tasks[taskID]; ok {
		return t.deliveries
	}
	return 0
}

// Leased reports whether the task is leased and not completed.
func (s *Server) Leased(taskID string) bool {
	s.lock()
	defer s.mu.Unlock()
	t, ok := s.tasks[taskID]
	return ok && t.state == leased
}

// WaitFor blocks until cond returns true or ctx ends. cond is evaluated
// after each change of the server's state (a request, an Enqueue, ...)
// and may call the accessors.
func (s *Server) WaitFor(ctx context.Context, cond func() bool) error {
	for {
		s.lock()
		ch := s.changed
		s.mu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("cptest: wait: %w", context.Cause(ctx))
		}
	}
}

// WaitCompletion waits for the first completion of a task.
func (s *Server) WaitCompletion(ctx context.Context, taskID string) (Completion, error) {
	var c Completion
	err := s.WaitFor(ctx, func() bool {
		cs := s.CompletionsOf(taskID)
		if len(cs) > 0 {
			c = cs[0]
			return true
		}
		return false
	})
	return c, err
}

// WaitHeartbeat waits for a heartbeat, received after the call or before,
// that satisfies match (nil matches any).
func (s *Server) WaitHeartbeat(ctx context.Context, match func(protocol.HeartbeatRequest) bool) (protocol.HeartbeatRequest, error) {
	var hb protocol.HeartbeatRequest
	err := s.WaitFor(ctx, func() bool {
		for _, h := range s.Heartbeats() {
			if match == nil || match(h) {
				hb = h
				return true
			}
		}
		return false
	})
	return hb, err
}

// WaitCount waits until an endpoint has received at least n requests.
func (s *Server) WaitCount(ctx context.Context, endpoint string, n int) error {
	return s.WaitFor(ctx, func() bool { return s.Count(endpoint) >= n })
}
