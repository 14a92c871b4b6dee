// Package metrics is the agent's Prometheus instrumentation: one *Metrics
// with small methods that the engine, the QMP client, the image cache and
// the runner call, an own registry (never the global one), and the
// /metrics handler in the Prometheus text format.
//
// Every method is a no-op on a nil *Metrics, so a package takes an
// optional one and calls it without checking.
//
// Series (all prefixed otherix_agent_, plus the standard process_ and go_):
//
//	build_info{version,revision,goversion}              gauge, always 1
//	vms{status}                                         gauge, at scrape
//	tasks_total{type,outcome}                           counter
//	task_duration_seconds{type,outcome}                 histogram
//	image_cache_lookups_total{pool,result}              counter (hit, miss)
//	image_ingest_bytes_total{pool}                      counter
//	image_ingests_total{pool,outcome}                   counter
//	image_ingest_duration_seconds{pool,outcome}         histogram
//	image_evictions_total{pool}                         counter
//	image_evicted_bytes_total{pool}                     counter
//	pool_size_bytes{pool}, pool_free_bytes{pool}        gauges, at scrape
//	pool_cache_bytes{pool}, pool_ingest_bytes{pool}     gauges, at scrape
//	pool_images{pool}                                   gauge, at scrape
//	qmp_command_duration_seconds{command}               histogram
//	qmp_command_errors_total{command,class}             counter
//	control_plane_request_duration_seconds{path}        histogram
//	control_plane_request_errors_total{path,reason}     counter
//	control_plane_connected                             gauge, at scrape
//	control_plane_heartbeat_age_seconds                 gauge, at scrape
//	guest_agent_up{vm}                                  gauge
//	vm_events_total{type}                               counter
//	vm_usage_timestamp_seconds{vm,uuid}                 gauge, at scrape (per running VM, below)
//	vm_cpu_seconds_total{vm,uuid}                       counter
//	vm_cpu_usage_ratio{vm,uuid}                         gauge
//	vm_memory_rss_bytes{vm,uuid}                        gauge
//	vm_guest_memory_bytes{vm,uuid}                      gauge (balloon)
//	vm_disk_{read,written}_bytes_total{vm,uuid}         counters
//	vm_disk_{read,write}_ops_total{vm,uuid}             counters
//	vm_network_{receive,transmit}_bytes_total{vm,uuid}  counters
//	vm_network_{receive,transmit}_packets_total{vm,uuid} counters
//
// The vm_ series come from the usage collector's last samples at each
// scrape: only VMs whose QEMU runs have them, so stopped and deleted VMs
// leave nothing behind.
package metrics

import (
	"context"
	"errors"
	"net"
	"net/http"
	"runtime"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/imagecache"
	"github.com/otherix/otherix-agent/internal/buildinfo"
)

const namespace = "otherix_agent"

// Label values used when a caller passes nothing usable.
const (
	outcomeSuccess = "success"
	other          = "other"
)

// Options configure New. The zero value is usable.
type Options struct {
	// Version and Revision label build_info. Empty means read from the
	// binary's build info (module version, vcs.revision).
	Version, Revision string
	// NoRuntime leaves out the process_ and go_ collectors (tests that
	// compare whole scrapes).
	NoRuntime bool
}

// Metrics holds the agent's series. Create it with New; a nil *Metrics is
// a valid no-op.
type Metrics struct {
	reg *prometheus.Registry

	tasks    *prometheus.CounterVec
	taskDur  *prometheus.HistogramVec
	lookups  *prometheus.CounterVec
	inBytes  *prometheus.CounterVec
	ingests  *prometheus.CounterVec
	inDur    *prometheus.HistogramVec
	evicts   *prometheus.CounterVec
	evBytes  *prometheus.CounterVec
	qmpDur   *prometheus.HistogramVec
	qmpErrs  *prometheus.CounterVec
	cpDur    *prometheus.HistogramVec
	cpErrs   *prometheus.CounterVec
	guestAgt *prometheus.GaugeVec
	vmEvents *prometheus.CounterVec

	src   *sources
	usage *vmUsage
}

// New returns a Metrics with its own registry.
func New(o Options) *Metrics {
	if o.Version == "" || o.Revision == "" {
		v, r := buildVersion()
		if o.Version == "" {
			o.Version = v
		}
		if o.Revision == "" {
			o.Revision = r
		}
	}
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		tasks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "tasks_total",
			Help: "Tasks finished, by type and outcome (success, failed, cancelled).",
		}, []string{"type", "outcome"}),
		taskDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "task_duration_seconds",
			Help:    "Time from a task's start to its outcome, by type and outcome.",
			Buckets: []float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800},
		}, []string{"type", "outcome"}),
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "image_cache_lookups_total",
			Help: "Image cache lookups by pool and result (hit, miss).",
		}, []string{"pool", "result"}),
		inBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "image_ingest_bytes_total",
			Help: "Bytes downloaded into the image cache, by pool.",
		}, []string{"pool"}),
		ingests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "image_ingests_total",
			Help: "Image ingests (download, check, commit) by pool and outcome (success, cancelled or an error code).",
		}, []string{"pool", "outcome"}),
		inDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "image_ingest_duration_seconds",
			Help:    "Duration of image ingests by pool and outcome.",
			Buckets: []float64{0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600},
		}, []string{"pool", "outcome"}),
		evicts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "image_evictions_total",
			Help: "Images evicted from the cache, by pool.",
		}, []string{"pool"}),
		evBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "image_evicted_bytes_total",
			Help: "Disk bytes freed by image evictions, by pool.",
		}, []string{"pool"}),
		qmpDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "qmp_command_duration_seconds",
			Help:    "QMP command latency, from send to reply or failure, by command.",
			Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30},
		}, []string{"command"}),
		qmpErrs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "qmp_command_errors_total",
			Help: "Failed QMP commands by command and class (QEMU's error class, or timeout, canceled, closed, other).",
		}, []string{"command", "class"}),
		cpDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "control_plane_request_duration_seconds",
			Help:    "Control-plane request latency by path (lease includes its long-poll wait).",
			Buckets: []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"path"}),
		cpErrs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "control_plane_request_errors_total",
			Help: "Failed control-plane requests by path and reason (the HTTP status, or timeout, canceled, transport).",
		}, []string{"path", "reason"}),
		guestAgt: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "guest_agent_up",
			Help: "1 when the VM's guest agent answers, 0 when it does not.",
		}, []string{"vm"}),
		usage: newVMUsage(),
		vmEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "vm_events_total",
			Help: "VM events recorded in VM histories, by type (created, started, guest_shutdown, crashed, restarted, ...).",
		}, []string{"type"}),
		src: newSources(),
	}
	build := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Name: "build_info",
		Help:        "The agent's build; always 1.",
		ConstLabels: prometheus.Labels{"version": o.Version, "revision": o.Revision, "goversion": runtime.Version()},
	})
	build.Set(1)
	m.reg.MustRegister(build, m.tasks, m.taskDur, m.lookups, m.inBytes, m.ingests, m.inDur,
		m.evicts, m.evBytes, m.qmpDur, m.qmpErrs, m.cpDur, m.cpErrs, m.guestAgt, m.vmEvents, m.src, m.usage)
	if !o.NoRuntime {
		m.reg.MustRegister(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), collectors.NewGoCollector())
	}
	return m
}

// buildVersion reads the version token and VCS revision of the binary.
func buildVersion() (version, revision string) {
	in := buildinfo.Read()
	return in.Version, in.Revision
}

// Registry returns the registry (for tests and extra collectors). Nil on a
// nil *Metrics.
func (m *Metrics) Registry() *prometheus.Registry {
	if m == nil {
		return nil
	}
	return m.reg
}

// Handler serves the registry in the Prometheus text format. On a nil
// *Metrics it answers 404.
func (m *Metrics) Handler() http.Handler {
	if m == nil {
		return http.NotFoundHandler()
	}
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	})
}

// Serve serves /metrics on ln until ctx ends, then shuts the server down.
// It returns nil after a shutdown caused by ctx.
func (m *Metrics) Serve(ctx context.Context, ln net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		MaxHeaderBytes:    16 << 10,
		IdleTimeout:       2 * time.Minute,
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := srv.Shutdown(sctx)
	if e := <-errc; !errors.Is(e, http.ErrServerClosed) && err == nil {
		err = e
	}
	return err
}

// ObserveVMEvent counts one VM event by type (api.Event* constants;
// anything else is counted as "other").
func (m *Metrics) ObserveVMEvent(typ string) {
	if m == nil {
		return
	}
	if !knownEvents[typ] {
		typ = other
	}
	m.vmEvents.WithLabelValues(typ).Inc()
}

var knownEvents = map[string]bool{
	api.EventCreated: true, api.EventStarted: true, api.EventStopped: true, api.EventGuestShutdown: true,
	api.EventGuestReboot: true, api.EventCrashed: true, api.EventRestarted: true, api.EventCrashLoop: true,
	api.EventStopTimeout: true, api.EventRebooted: true, api.EventReset: true, api.EventPaused: true,
	api.EventResumed: true, api.EventIOError: true, api.EventMediumChanged: true, api.EventDiskAttached: true, api.EventDiskDetached: true,
	api.EventHostRebooted: true, api.EventAutostarted: true, api.EventDeleted: true,
}

// ObserveTask records a finished task: its type (api.Task* constants;
// anything else is counted as "other"), its outcome (the task status:
// success, failed, cancelled) and how long it ran.
func (m *Metrics) ObserveTask(typ, outcome string, d time.Duration) {
	if m == nil {
		return
	}
	typ = taskType(typ)
	outcome = orOther(outcome)
	m.tasks.WithLabelValues(typ, outcome).Inc()
	m.taskDur.WithLabelValues(typ, outcome).Observe(d.Seconds())
}

// knownTasks bounds the type label: task types come from the control
// plane, and a label must not take arbitrary values.
var knownTasks = map[string]bool{
	api.TaskCreate: true, api.TaskStart: true, api.TaskStop: true, api.TaskPoweroff: true,
	api.TaskReboot: true, api.TaskReset: true, api.TaskPause: true, api.TaskResume: true,
	api.TaskDelete: true, "image.pull": true,
}

func taskType(t string) string {
	if knownTasks[t] {
		return t
	}
	return other
}

func orOther(s string) string {
	if s == "" {
		return other
	}
	return s
}

// ObserveImageLookup records a cache lookup of pool: a hit served from the
// cache, or a miss that starts (or joins) a download.
func (m *Metrics) ObserveImageLookup(pool string, hit bool) {
	if m == nil {
		return
	}
	result := "miss"
	if hit {
		result = "hit"
	}
	m.lookups.WithLabelValues(pool, result).Inc()
}

// ObserveImageIngest records one ingest into pool: the bytes it
// downloaded (resumed bytes excluded), how long it took, and how it ended
// (nil; else the outcome is "cancelled" or the error's errcode).
func (m *Metrics) ObserveImageIngest(pool string, bytes int64, d time.Duration, err error) {
	if m == nil {
		return
	}
	outcome := errOutcome(err)
	if bytes > 0 {
		m.inBytes.WithLabelValues(pool).Add(float64(bytes))
	}
	m.ingests.WithLabelValues(pool, outcome).Inc()
	m.inDur.WithLabelValues(pool, outcome).Observe(d.Seconds())
}

// ObserveImageEviction records one image evicted from pool and the disk
// bytes it freed.
func (m *Metrics) ObserveImageEviction(pool string, bytes int64) {
	if m == nil {
		return
	}
	m.evicts.WithLabelValues(pool).Inc()
	if bytes > 0 {
		m.evBytes.WithLabelValues(pool).Add(float64(bytes))
	}
}

// ObserveQMP records one QMP command: its latency and, when errClass is
// not empty, a failure of that class (see QMPErrorClass).
func (m *Metrics) ObserveQMP(cmd string, d time.Duration, errClass string) {
	if m == nil {
		return
	}
	cmd = orOther(cmd)
	m.qmpDur.WithLabelValues(cmd).Observe(d.Seconds())
	if errClass != "" {
		m.qmpErrs.WithLabelValues(cmd, errClass).Inc()
	}
}

// QMPObserver adapts ObserveQMP to a func(cmd, duration, error), the shape
// of a QMP client hook: the error is classified with QMPErrorClass.
func (m *Metrics) QMPObserver() func(cmd string, d time.Duration, err error) {
	return func(cmd string, d time.Duration, err error) {
		m.ObserveQMP(cmd, d, QMPErrorClass(err))
	}
}

// ObserveControlPlane records one control-plane request: path is the
// request path (task IDs in it are folded into {id}), d its latency, err
// its failure (nil on a 2xx answer).
func (m *Metrics) ObserveControlPlane(path string, d time.Duration, err error) {
	if m == nil {
		return
	}
	path = routeOf(path)
	m.cpDur.WithLabelValues(path).Observe(d.Seconds())
	if err != nil {
		m.cpErrs.WithLabelValues(path, ControlPlaneReason(err)).Inc()
	}
}

// routeOf folds a control-plane path into a bounded route label.
func routeOf(path string) string {
	const tasks = "/v1/agent/tasks/"
	if rest, ok := strings.CutPrefix(path, tasks); ok && rest != "lease" {
		_, action, found := strings.Cut(rest, "/")
		if !found || strings.Contains(action, "/") {
			return other
		}
		switch action {
		case "progress", "complete":
			return tasks + "{id}/" + action
		}
		return other
	}
	switch path {
	case "/v1/agent/register", "/v1/agent/tasks/lease", "/v1/agent/heartbeat":
		return path
	}
	return other
}

// SetGuestAgent records whether the guest agent of the VM named vm
// answers.
func (m *Metrics) SetGuestAgent(vm string, up bool) {
	if m == nil {
		return
	}
	v := 0.0
	if up {
		v = 1
	}
	m.guestAgt.WithLabelValues(vm).Set(v)
}

// ForgetVM drops the per-VM series of a deleted VM.
func (m *Metrics) ForgetVM(vm string) {
	if m == nil {
		return
	}
	m.guestAgt.DeleteLabelValues(vm)
}

// SetVMs sets the function read at each scrape for the vms{status} gauge.
// It must be quick and safe for concurrent use.
func (m *Metrics) SetVMs(f func() []api.VM) {
	if m == nil {
		return
	}
	m.src.mu.Lock()
	m.src.vms = f
	m.src.mu.Unlock()
}

// SetPools sets the function read at each scrape for the pool_ gauges,
// typically imagecache.Cache.Stats.
func (m *Metrics) SetPools(f func() []imagecache.PoolStats) {
	if m == nil {
		return
	}
	m.src.mu.Lock()
	m.src.pools = f
	m.src.mu.Unlock()
}

// SetControlPlane sets the functions read at each scrape for the
// control_plane_connected and control_plane_heartbeat_age_seconds gauges,
// typically runner.Runner.Connected and LastHeartbeat. Either may be nil.
// The age is absent until the first heartbeat.
func (m *Metrics) SetControlPlane(connected func() bool, lastHeartbeat func() time.Time) {
	if m == nil {
		return
	}
	m.src.mu.Lock()
	m.src.connected, m.src.lastHB = connected, lastHeartbeat
	m.src.mu.Unlock()
}
