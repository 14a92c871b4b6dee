// Package runner is the agent's control-plane loop: it registers the host,
// leases tasks and runs them through an Executor exactly once in effect
// (journal first, then execute, then deliver the outcome until
// acknowledged), heartbeats the VM inventory and reconciles each VM
// against its desired phase.
//
// Ordering: tasks on one VM run one at a time in arrival order; tasks on
// different VMs run concurrently, creates at most Config.CreateConcurrency
// at a time. Shutdown (ctx cancelled) stops pulling, lets running short
// tasks finish, asks long ones (vm.create) to checkpoint and hands them
// back for redelivery, and never touches the VMs themselves.
//
// The contract is docs/protocol.md.
package runner

import (
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/protocol"
)

// Executor runs one task against this host. It is implemented by the
// agent over the VM engine.
//
// The returned error carries an errcode code (errcode.Of). ctx is
// cancelled with cause ErrCancelled when the control plane cancels the
// task, and with cause ErrShutdown when the agent stops: a long task
// (vm.create) must then stop at a safe point, undo its partial effects
// (keeping resumable caches, e.g. a partial image download) and return an
// error wrapping context.Canceled; the task is handed back and runs again
// from the start after the agent restarts. ctx is never tied to a VM's
// lifetime: never start QEMU under it.
type Executor interface {
	Execute(ctx context.Context, t protocol.Task, progress func(api.Progress)) (protocol.Result, error)
}

// Client is the runner's side of the protocol (docs/protocol.md): a
// *protocol.Client to a control plane over HTTP, or the in-process control
// plane of the standalone and cluster modes (standalone.LocalClient).
// Refusals are the errors protocol.Client returns (protocol.StatusError),
// so that retries and backoff do not depend on the road.
type Client interface {
	Node() string
	Register(ctx context.Context, n protocol.NodeInfo) (*protocol.RegisterResponse, error)
	Lease(ctx context.Context, wait time.Duration, max int) (*protocol.LeaseResponse, error)
	Progress(ctx context.Context, taskID, leaseID string, p *api.Progress) (*protocol.ProgressResponse, error)
	Complete(ctx context.Context, taskID string, req protocol.CompleteRequest) error
	Heartbeat(ctx context.Context, req protocol.HeartbeatRequest) (*protocol.HeartbeatResponse, error)
}

// Inventory reports this host. Both calls are made on every heartbeat and
// must be cheap (cache what is slow to learn, e.g. the QEMU version).
type Inventory interface {
	Node(ctx context.Context) protocol.NodeInfo // registration data
	VMs(ctx context.Context) []api.VM           // current VM views
}

// EventSource is what an Inventory may also be: a store of VM events that
// heartbeats carry to the control plane until it acknowledges them.
type EventSource interface {
	PendingEvents(n int) []api.VMEvent
	AckEvents(seq int64)
}

// Causes of an execution context's cancellation. ErrCancelled asks
// work it stops to leave nothing behind (DiscardDownload: a partial image
// download is thrown away); ErrShutdown keeps what can be resumed.
var (
	ErrCancelled error = cancelledError{}
	ErrShutdown        = errors.New("agent shutting down")
)

// cancelledError is ErrCancelled.
type cancelledError struct{}

func (cancelledError) Error() string { return "task cancelled by the control plane" }

// DiscardDownload tells the image cache to throw away a download the
// cancelled task was the last to wait for (imagecache.Discarder).
func (cancelledError) DiscardDownload() bool { return true }

// Config tunes a Runner. Zero values take the defaults shown.
type Config struct {
	// NodeName is used in logs; default the client's node name.
	NodeName string
	// CreateConcurrency bounds concurrent vm.create executions; default 2.
	CreateConcurrency int
	// MaxInFlight bounds tasks accepted and not yet finished; default 32.
	MaxInFlight int
	// LeaseWait is the long-poll wait; default 30s.
	LeaseWait time.Duration
	// LeaseMax is the most tasks asked for in one lease; default 8.
	LeaseMax int
	// HeartbeatInterval until the control plane says otherwise; default
	// 10s. The control plane's value is clamped to [1s, 5m].
	HeartbeatInterval time.Duration
	// ProgressInterval is the least time between two progress reports of
	// one task; default 5s. The lease is extended every third of its TTL.
	ProgressInterval time.Duration
	// RetryBase and RetryMax bound the backoff after a failed request;
	// default 1s and 60s.
	RetryBase, RetryMax time.Duration
	// InitialStagger is the upper bound of the random wait before the
	// first request, so a fleet restarting together spreads out; default
	// 10s, negative disables.
	InitialStagger time.Duration
	// RestartBase and RestartMax bound the backoff between reconcile
	// starts of a VM that keeps stopping; default 10s and 10m.
	RestartBase, RestartMax time.Duration
	// RestartStable is how long a VM must stay running after a reconcile
	// start for its restart backoff to reset; default 5m.
	RestartStable time.Duration
	// DrainTimeout bounds the shutdown drain; default 30s.
	DrainTimeout time.Duration
	// CompactEvery is how often the journal is compacted; default 1h.
	CompactEvery time.Duration

	// ObserveTask, when set, is called as each task finishes (metrics).
	ObserveTask func(typ, outcome string, d time.Duration)

	Clock  Clock      // default SystemClock()
	Rand   *rand.Rand // default seeded from the OS
	Logger *zap.Logger
}

func (c *Config) defaults(client Client) {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	if c.NodeName == "" {
		c.NodeName = client.Node()
	}
	if c.CreateConcurrency <= 0 {
		c.CreateConcurrency = 2
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = 32
	}
	if c.LeaseMax <= 0 {
		c.LeaseMax = 8
	}
	def(&c.LeaseWait, 30*time.Second)
	def(&c.HeartbeatInterval, 10*time.Second)
	def(&c.ProgressInterval, 5*time.Second)
	def(&c.RetryBase, time.Second)
	def(&c.RetryMax, 60*time.Second)
	def(&c.InitialStagger, 10*time.Second)
	def(&c.RestartBase, 10*time.Second)
	def(&c.RestartMax, 10*time.Minute)
	def(&c.RestartStable, 5*time.Minute)
	def(&c.DrainTimeout, 30*time.Second)
	def(&c.CompactEvery, time.Hour)
	if c.Clock == nil {
		c.Clock = SystemClock()
	}
	if c.Rand == nil {
		c.Rand = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
}

// Runner is the control-plane loop of one host.
type Runner struct {
	client Client
	j      *journal.Journal
	ex     Executor
	inv    Inventory
	cfg    Config
	log    *zap.Logger
	clock  Clock
	rnd    *lockedRand

	createSem chan struct{}
	workCtx   context.Context // set by Run: outlives ctx by the drain
	outbox    *outbox
	recon     *reconciler
	reconMu   sync.Mutex    // one reconcile at a time (heartbeat, Kick)
	kick      chan struct{} // Kick: reconcile now

	mu       sync.Mutex
	tasks    map[string]*execution // accepted, not finished
	queues   map[string]*vmQueue   // per-VM ordered queues, by VM key
	freed    chan struct{}         // closed and replaced when a task finishes
	drainCh  chan struct{}         // closed when the drain begins
	draining bool
	desired  map[string]string // last known desired phases; nil: unknown
	// desiredSeq is the seq of the heartbeat whose answer gave desired;
	// taskSeen, by VM uuid, the hbSeq when a task of the control plane's
	// for that VM was last accepted. A VM whose task was accepted after
	// the heartbeat that desired answers was sent is not an orphan: that
	// map may predate the control plane's record of it (knownVM).
	desiredSeq uint64
	taskSeen   map[string]uint64
	interval   time.Duration
	running    bool
	ended      bool // Run has returned
	connected  bool
	lastHB     time.Time
	lastTry    time.Time // last register or heartbeat attempt
	hbSeq      uint64
	lastNode   []byte // NodeInfo JSON last acknowledged
	reconSeq   int
	compacted  time.Time
	workers    sync.WaitGroup
}

// New returns a Runner; Run starts it.
func New(client Client, j *journal.Journal, ex Executor, inv Inventory, cfg Config) *Runner {
	cfg.defaults(client)
	r := &Runner{
		client:    client,
		j:         j,
		ex:        ex,
		inv:       inv,
		cfg:       cfg,
		log:       cfg.Logger.With(zap.String("node", cfg.NodeName)),
		clock:     cfg.Clock,
		rnd:       &lockedRand{r: cfg.Rand},
		createSem: make(chan struct{}, cfg.CreateConcurrency),
		tasks:     map[string]*execution{},
		taskSeen:  map[string]uint64{},
		queues:    map[string]*vmQueue{},
		freed:     make(chan struct{}),
		drainCh:   make(chan struct{}),
		interval:  cfg.HeartbeatInterval,
	}
	r.outbox = newOutbox()
	r.kick = make(chan struct{}, 1)
	r.recon = &reconciler{base: cfg.RestartBase, max: cfg.RestartMax, stable: cfg.RestartStable, state: map[string]*restartState{}}
	return r
}

// Run registers the host, then runs the lease loop, the heartbeat loop
// (which reconciles), and the completion sender until ctx is done; then it
// drains (see the package comment) and returns nil. A Runner runs once.
func (r *Runner) Run(ctx context.Context) error {
	r.mu.Lock()
	if r.running || r.draining {
		r.mu.Unlock()
		return errors.New("runner: Run called twice")
	}
	r.running = true
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.running, r.ended = false, true
		r.mu.Unlock()
	}()

	// Work (executions, lease extension, completion delivery) outlives
	// ctx by the drain; it is cancelled when the drain ends.
	workCtx, stopWork := context.WithCancelCause(context.WithoutCancel(ctx))
	defer stopWork(ErrShutdown)
	r.workCtx = workCtx

	r.recover()
	r.compact()

	var loops, sender sync.WaitGroup
	registered := r.stagger(ctx) == nil && r.register(ctx) == nil
	if registered {
		sender.Add(1)
		go func() { defer sender.Done(); r.sendLoop(workCtx) }()
		loops.Add(3)
		go func() { defer loops.Done(); r.heartbeatLoop(ctx) }()
		go func() { defer loops.Done(); r.reconcileLoop(ctx) }()
		go func() { defer loops.Done(); r.leaseLoop(ctx) }()
	}
	<-ctx.Done()
	r.drain(workCtx, &loops, registered)
	stopWork(ErrShutdown)
	sender.Wait()
	return nil
}

// drain runs after ctx is done: no new leases, checkpoint long tasks, let
// short ones finish, deliver outcomes, all within DrainTimeout. Without a
// registration nothing ran and nothing is sent.
func (r *Runner) drain(workCtx context.Context, loops *sync.WaitGroup, registered bool) {
	r.log.Info("draining")
	r.mu.Lock()
	r.draining = true
	close(r.drainCh)
	for _, e := range r.tasks {
		if e.long {
			e.cancel(ErrShutdown)
		}
	}
	r.mu.Unlock()
	loops.Wait()
	if !registered {
		return
	}

	dctx, cancel := context.WithCancel(workCtx)
	defer cancel()
	t := r.clock.NewTimer(r.cfg.DrainTimeout)
	defer t.Stop()
	go func() {
		select {
		case <-t.C():
			cancel()
		case <-dctx.Done():
		}
	}()
	idle := make(chan struct{})
	go func() { r.workers.Wait(); close(idle) }()
	select {
	case <-idle:
	case <-dctx.Done():
		r.log.Warn("drain timeout: tasks still running are left to the restart policy", zap.Int("tasks", r.inFlight()))
	}
	if dctx.Err() == nil {
		r.heartbeatOnce(dctx) // tells the control plane we are draining
	}
	if err := r.outbox.waitEmpty(dctx); err != nil {
		r.log.Warn("drain timeout: outcomes not yet acknowledged stay in the journal", zap.Int("outcomes", r.outbox.len()))
	}
	r.log.Info("drained")
}

// stagger waits a random part of InitialStagger.
func (r *Runner) stagger(ctx context.Context) error {
	if r.cfg.InitialStagger <= 0 {
		return ctx.Err()
	}
	d := time.Duration(r.rnd.float() * float64(r.cfg.InitialStagger))
	r.log.Debug("initial stagger", zap.Duration("wait", d))
	return sleep(ctx, r.clock, d)
}

// register announces the host, retrying with backoff until it succeeds
// or ctx ends.
func (r *Runner) register(ctx context.Context) error {
	b := r.newBackoff()
	for {
		r.touch()
		node := r.inv.Node(ctx)
		resp, err := r.client.Register(ctx, node)
		if err == nil {
			nodeJSON, _ := json.Marshal(node)
			r.mu.Lock()
			r.lastNode = nodeJSON
			r.mu.Unlock()
			r.setConnected(true)
			r.setInterval(resp.IntervalSeconds)
			r.log.Info("registered", zap.String("node_id", resp.NodeID), zap.Int("protocol_version", resp.ProtocolVersion))
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.requestFailed("register", err)
		if err := sleep(ctx, r.clock, b.next(err)); err != nil {
			return err
		}
	}
}

func (r *Runner) newBackoff() *backoff {
	return &backoff{base: r.cfg.RetryBase, max: r.cfg.RetryMax, rnd: r.rnd}
}

// requestFailed notes and logs a failed request.
func (r *Runner) requestFailed(what string, err error) {
	if errors.Is(err, protocol.ErrMalformedAnswer) {
		// A 2xx the agent cannot use (garbled, cut, oversized) is a
		// failed request: retried with the backoff of a failure.
		r.setConnected(false)
		r.log.Warn("control plane sent a malformed answer, will retry", zap.String("op", what), zap.Error(err))
		return
	}
	if protocol.IsRetryable(err) {
		r.setConnected(false)
		r.log.Warn("control plane request failed, will retry", zap.String("op", what), zap.Error(err))
		return
	}
	// Refused (4xx): the agent keeps trying on the same schedule, for an
	// operator may fix the cause (e.g. rotate the token file).
	r.setConnected(false)
	r.log.Error("control plane refused request", zap.String("op", what), zap.Error(err))
}

func (r *Runner) setConnected(ok bool) {
	r.mu.Lock()
	r.connected = ok
	r.mu.Unlock()
}

func (r *Runner) touch() {
	now := r.clock.Now()
	r.mu.Lock()
	r.lastTry = now
	r.mu.Unlock()
}

func (r *Runner) setInterval(secs int) {
	if secs <= 0 {
		return
	}
	d := min(max(time.Duration(secs)*time.Second, time.Second), 5*time.Minute)
	r.mu.Lock()
	r.interval = d
	r.mu.Unlock()
}

// Connected reports whether the last control-plane request succeeded.
func (r *Runner) Connected() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.connected
}

// LastHeartbeat returns when the control plane last acknowledged a
// heartbeat (zero before the first).
func (r *Runner) LastHeartbeat() time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastHB
}

// Healthy reports whether the runner's register/heartbeat loop made an
// attempt recently (within two intervals plus the retry maximum): a stuck
// loop is unhealthy, an unreachable control plane is not. A runner whose
// Run has not started yet is healthy (the daemon starts Run and the
// watchdog together); one whose Run returned is not. It is meant for the
// systemd watchdog.
func (r *Runner) Healthy() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.running {
		return !r.ended
	}
	if r.lastTry.IsZero() {
		return true // staggering
	}
	return r.clock.Now().Sub(r.lastTry) <= 2*(r.interval+r.cfg.RetryMax)+r.cfg.InitialStagger
}

func (r *Runner) inFlight() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.tasks)
}

// compact compacts the journal at most every CompactEvery.
func (r *Runner) compact() {
	now := r.clock.Now()
	r.mu.Lock()
	due := now.Sub(r.compacted) >= r.cfg.CompactEvery
	if due {
		r.compacted = now
	}
	r.mu.Unlock()
	if !due {
		return
	}
	n, err := r.j.Compact(now)
	if err != nil {
		r.log.Warn("journal compaction failed", zap.Error(err))
		return
	}
	if n > 0 {
		r.log.Info("journal compacted", zap.Int("removed", n))
	}
}
