// Package cptest is the tests' control plane: the protocol's one server
// side (agent/protocol/cpserver, over a memory store) as an http.Handler,
// usable from its zero value, with fault injection and a record of every
// request in front.
//
//	var cp cptest.Server
//	cp.Token = "secret"
//	ts := httptest.NewServer(&cp)
//	cp.Enqueue(protocol.Task{ID: "t1", Type: api.TaskStart, VMName: "web-1", VMUUID: "u1"})
//	got, err := cp.WaitCompletion(ctx, "t1")
//
// It queues tasks and hands out leases, records every request, sets
// desired phases and injects faults: an outage, dropped connections,
// error statuses with Retry-After, slow answers, garbled answers, dropped
// acknowledgements, duplicate delivery, lease expiry and cancellation.
// Wait helpers block on state changes, never on sleeps.
package cptest

import (
	"bytes"
	"cmp"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"sync"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
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
	// FaultDrop closes the connection without an answer; the request is
	// not served.
	FaultDrop
	// FaultDelay waits Delay (or until the request is abandoned), then
	// serves the request normally: a slow control plane.
	FaultDelay
	// FaultDropAnswer serves the request, then closes the connection
	// instead of answering: a completion is recorded and its
	// acknowledgement lost, a lease is taken and its answer lost.
	FaultDropAnswer
	// FaultBody answers Status (200 when 0) with Body as it is, without
	// serving the request: a garbled or oversized answer from a broken
	// control plane or a proxy.
	FaultBody
)

// Fault is an injected failure.
type Fault struct {
	Endpoint   string // one of the endpoint names; "" hits every endpoint
	Kind       FaultKind
	Status     int    // FaultStatus: e.g. 503 or 429
	RetryAfter string // FaultStatus: Retry-After header value
	Body       []byte // FaultBody: the answer's body
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
	cp   *cpserver.Server
	mem  *cpserver.MemStore
	mux  *http.ServeMux

	mu            sync.Mutex
	changed       chan struct{}
	leaseSeq      int
	outage        bool
	faults        []*Fault
	registrations []protocol.RegisterRequest
	heartbeats    []protocol.HeartbeatRequest
	progress      []ProgressReport
	completions   []Completion
	counts        map[string]int
	userAgent     string // of the last request
	wireBytes     map[string]int64
	gzipped       map[string]int
}

// maxWait caps a long poll.
const maxWait = 60 * time.Second

func (s *Server) init() {
	s.once.Do(func() {
		s.mem = &cpserver.MemStore{}
		s.cp = &cpserver.Server{
			Store:             s.mem,
			Token:             s.Token,
			LeaseTTL:          s.LeaseTTL,
			MaxWait:           maxWait,
			HeartbeatInterval: s.HeartbeatInterval,
			NodeID:            func(name string) string { return "node-" + name },
			NewLeaseID: func() string {
				s.mu.Lock()
				defer s.mu.Unlock()
				s.leaseSeq++
				return fmt.Sprintf("lease-%d", s.leaseSeq)
			},
		}
		mux := http.NewServeMux()
		for _, ep := range []struct{ name, pattern string }{
			{Register, protocol.PathRegister},
			{Lease, protocol.PathLease},
			{Heartbeat, protocol.PathHeartbeat},
			{Progress, protocol.PathTaskPrefix + "{id}/progress"},
			{Complete, protocol.PathTaskPrefix + "{id}/complete"},
		} {
			mux.HandleFunc("POST "+ep.pattern, s.handle(ep.name))
		}
		s.mux = mux
	})
}

// Protocol returns the protocol server behind the fake, for what the
// fake does not wrap.
func (s *Server) Protocol() *cpserver.Server {
	s.init()
	return s.cp
}

// lock takes the mutex and makes the maps.
func (s *Server) lock() {
	s.mu.Lock()
	if s.counts == nil {
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

// changedNow wakes every waiter.
func (s *Server) changedNow() {
	s.lock()
	s.notify()
	s.mu.Unlock()
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.init()
	s.mux.ServeHTTP(w, r)
}

// handle counts, applies faults, records the request and passes it to
// the protocol server.
func (s *Server) handle(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		raw, err := io.ReadAll(r.Body)
		s.lock()
		s.counts[name]++
		s.userAgent = r.Header.Get("User-Agent")
		s.wireBytes[name] += int64(len(raw))
		gz := r.Header.Get("Content-Encoding") == "gzip"
		if gz {
			s.gzipped[name]++
		}
		f := s.takeFault(name)
		outage := s.outage
		s.notify()
		s.mu.Unlock()
		if outage {
			drop(w)
			return
		}
		if err != nil {
			cpserver.WriteError(w, http.StatusBadRequest, "validation_failed", "read body: "+err.Error())
			return
		}
		if f != nil {
			switch f.Kind {
			case FaultStatus:
				if f.RetryAfter != "" {
					w.Header().Set("Retry-After", f.RetryAfter)
				}
				cpserver.WriteError(w, f.Status, "injected", fmt.Sprintf("injected %d", f.Status))
				return
			case FaultDrop:
				drop(w)
				return
			case FaultBody:
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(cmp.Or(f.Status, http.StatusOK))
				w.Write(f.Body)
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
				cpserver.WriteError(w, http.StatusBadRequest, "validation_failed", "bad gzip body")
				return
			}
		}
		id := r.PathValue("id")
		wasDone := false
		if name == Complete {
			t, err := s.cp.Task(context.Background(), id)
			wasDone = err == nil && t.Terminal()
		}
		// The protocol server answers, into a recorder: a dropped
		// answer is decided after the request was served.
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.Header.Del("Content-Encoding")
		r.Header.Set("Authorization", s.authorization(r.Header.Get("Authorization")))
		rec := httptest.NewRecorder()
		s.cp.ServeHTTP(rec, r)
		s.record(name, id, body, rec.Code, wasDone)
		if f != nil && f.Kind == FaultDropAnswer {
			drop(w)
			return
		}
		maps.Copy(w.Header(), rec.Header())
		w.WriteHeader(rec.Code)
		w.Write(rec.Body.Bytes())
	}
}

// authorization checks the request's header against the current token
// (SetToken rotates it) and returns what the protocol server checks
// against its own, fixed one.
func (s *Server) authorization(got string) string {
	s.lock()
	tok := s.Token
	s.mu.Unlock()
	if tok == "" || got == "Bearer "+tok {
		return "Bearer " + s.cp.Token
	}
	return ""
}

// record keeps what the request said once the protocol server served it.
func (s *Server) record(name, id string, body []byte, code int, wasDone bool) {
	s.lock()
	defer s.mu.Unlock()
	defer s.notify()
	ok := code/100 == 2
	switch name {
	case Register:
		var req protocol.RegisterRequest
		if ok && json.Unmarshal(body, &req) == nil {
			s.registrations = append(s.registrations, req)
		}
	case Heartbeat:
		var req protocol.HeartbeatRequest
		if ok && json.Unmarshal(body, &req) == nil {
			s.heartbeats = append(s.heartbeats, req)
		}
	case Progress:
		var req protocol.ProgressRequest
		if (ok || code == http.StatusConflict) && json.Unmarshal(body, &req) == nil {
			s.progress = append(s.progress, ProgressReport{TaskID: id, ProgressRequest: req})
		}
	case Complete:
		var req protocol.CompleteRequest
		if ok && json.Unmarshal(body, &req) == nil {
			s.completions = append(s.completions, Completion{TaskID: id, CompleteRequest: req, Duplicate: wasDone})
		}
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

// Enqueue queues a task for the next lease. Attempt and lease fields are
// filled in when it is leased. Enqueueing a known id queues it again.
func (s *Server) Enqueue(t protocol.Task) {
	s.init()
	defer s.changedNow()
	ctx := context.Background()
	rec := cpserver.Task{Task: api.Task{ID: t.ID, Type: t.Type, VMName: t.VMName, VMUUID: t.VMUUID}, Spec: t.Spec}
	if _, err := s.cp.Task(ctx, t.ID); err == nil {
		now := time.Now().UTC()
		s.cp.Store.UpdateTask(ctx, t.ID, func(old *cpserver.Task) error {
			*old = rec
			old.Status, old.CreatedAt, old.UpdatedAt = api.TaskPending, now, now
			return nil
		})
		return
	}
	if _, err := s.cp.Enqueue(ctx, rec); err != nil {
		panic("cptest: enqueue: " + err.Error()) // a memory store without limits cannot refuse
	}
}

// Duplicate delivers the task's current lease once more in a later lease
// answer, as a retransmitted answer would. On a task not yet leased it
// applies after the first lease.
func (s *Server) Duplicate(taskID string) {
	s.init()
	defer s.changedNow()
	s.cp.Redeliver(context.Background(), taskID)
}

// Expire ends the task's lease now: the next lease offers it again with a
// new lease id and attempt+1, and progress on the old lease gets 409.
func (s *Server) Expire(taskID string) {
	s.init()
	defer s.changedNow()
	s.cp.Expire(context.Background(), taskID)
}

// Cancel cancels a task: a queued task is never offered, a leased one is
// told so in its next progress answer.
func (s *Server) Cancel(taskID string) {
	s.init()
	defer s.changedNow()
	s.cp.Cancel(context.Background(), taskID)
}

// SetDesired sets one VM's desired phase; phase "" forgets the VM. The
// first call switches heartbeat answers from "no opinion" to a map.
func (s *Server) SetDesired(vmUUID, phase string) {
	s.init()
	defer s.changedNow()
	s.cp.SetDesired(context.Background(), cpserver.VM{UUID: vmUUID, Phase: phase})
}

// NoOpinion drops the desired map: heartbeat answers carry none again
// ("no opinion").
func (s *Server) NoOpinion() {
	s.init()
	defer s.changedNow()
	s.mem.ForgetDesired()
}

// SetToken rotates the bearer token while serving: from now on only the
// new one is accepted ("" accepts any).
func (s *Server) SetToken(token string) {
	s.init()
	s.lock()
	defer s.mu.Unlock()
	s.Token = token
	s.notify()
}

// SetOutage starts (true) or ends (false) an outage: while it lasts every
// request's connection is closed without an answer, as a control plane
// that went away.
func (s *Server) SetOutage(on bool) {
	s.lock()
	defer s.mu.Unlock()
	s.outage = on
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

// UserAgent returns the User-Agent of the last request.
func (s *Server) UserAgent() string {
	s.lock()
	defer s.mu.Unlock()
	return s.userAgent
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
	s.init()
	t, _ := s.cp.Task(context.Background(), taskID)
	return t.Deliveries
}

// Leased reports whether the task is leased and not completed.
func (s *Server) Leased(taskID string) bool {
	s.init()
	t, err := s.cp.Task(context.Background(), taskID)
	return err == nil && t.Status == api.TaskRunning
}

// Task returns the control plane's record of a task.
func (s *Server) Task(taskID string) (cpserver.Task, bool) {
	s.init()
	t, err := s.cp.Task(context.Background(), taskID)
	return t, err == nil
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
