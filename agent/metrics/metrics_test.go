package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/imagecache"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/qmp"
)

// serve runs m.Serve on a loopback port and returns the /metrics URL.
func serve(t *testing.T, m *Metrics) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return "http://" + ln.Addr().String() + "/metrics"
}

// scrape GETs url and returns the sample lines (no comments) by
// "name{labels}".
func scrape(t *testing.T, url string) map[string]string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s\n%s", url, resp.Status, b)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("Content-Type = %q, want text/plain", ct)
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		out[line[:i]] = line[i+1:]
	}
	return out
}

func want(t *testing.T, got map[string]string, series, value string) {
	t.Helper()
	if v, ok := got[series]; !ok {
		t.Errorf("series %s missing", series)
	} else if v != value {
		t.Errorf("%s = %s, want %s", series, v, value)
	}
}

func TestScrape(t *testing.T) {
	m := New(Options{Version: "v1.2.3", Revision: "abc123"})
	url := serve(t, m)

	before := scrape(t, url)
	want(t, before, `otherix_agent_build_info{goversion="`+goVersion()+`",revision="abc123",version="v1.2.3"}`, "1")
	for _, name := range []string{"process_resident_memory_bytes", "go_goroutines"} {
		if _, ok := before[name]; !ok {
			t.Errorf("runtime series %s missing", name)
		}
	}
	for k := range before {
		if strings.HasPrefix(k, "otherix_agent_tasks_total") || strings.HasPrefix(k, "otherix_agent_vms{") {
			t.Errorf("series %s present before anything happened", k)
		}
	}

	m.ObserveTask(api.TaskCreate, api.TaskSuccess, 90*time.Second)
	m.ObserveTask(api.TaskCreate, api.TaskSuccess, 2*time.Second)
	m.ObserveTask(api.TaskStop, api.TaskFailed, 3*time.Second)
	m.ObserveTask("evil.{type}", api.TaskFailed, time.Second)
	m.ObserveImageLookup("default", true)
	m.ObserveImageLookup("default", false)
	m.ObserveImageLookup("default", false)
	m.ObserveImageIngest("default", 1000, 4*time.Second, nil)
	m.ObserveImageIngest("default", 24, time.Second, errcode.New(errcode.ImageChecksumMismatch, "bad"))
	m.ObserveImageIngest("default", 0, time.Second, errcode.Wrap(errcode.Cancelled, context.Canceled, "x"))
	m.ObserveImageEviction("default", 4096)
	m.ObserveQMP("query-status", 2*time.Millisecond, "")
	m.QMPObserver()("device_add", 3*time.Millisecond, fmt.Errorf("wrapped: %w", &qmp.Error{Class: "DeviceNotFound", Command: "device_add"}))
	m.QMPObserver()("quit", time.Millisecond, fmt.Errorf("qmp quit: %w", qmp.ErrClosed))
	m.QMPObserver()("screendump", 30*time.Second, fmt.Errorf("qmp screendump: %w", context.DeadlineExceeded))
	m.ObserveControlPlane(protocol.PathHeartbeat, 20*time.Millisecond, nil)
	m.ObserveControlPlane(protocol.ProgressPath("task-123"), 10*time.Millisecond, &protocol.RetryableError{Err: &protocol.HTTPError{StatusCode: 503}})
	m.ObserveControlPlane(protocol.CompletePath("task-456"), 10*time.Millisecond, &protocol.HTTPError{StatusCode: 401})
	m.ObserveControlPlane(protocol.PathLease, 30*time.Second, errors.New("dial tcp: connection refused"))
	m.ObserveControlPlane("/v1/agent/tasks/x/y/z", time.Millisecond, nil)
	m.SetGuestAgent("web-1", true)
	m.SetGuestAgent("web-2", false)
	m.SetVMs(func() []api.VM {
		return []api.VM{{Name: "a", Status: api.StatusRunning}, {Name: "b", Status: api.StatusRunning}, {Name: "c", Status: api.StatusStopped}}
	})
	m.SetPools(func() []imagecache.PoolStats {
		return []imagecache.PoolStats{{Name: "default", TotalBytes: 100 << 30, FreeBytes: 40 << 30, CacheBytes: 5 << 30, Images: 3, IngestBytes: 7}}
	})
	hb := time.Now().Add(-90 * time.Second)
	m.src.now = func() time.Time { return hb.Add(90 * time.Second) }
	connected := false
	m.SetControlPlane(func() bool { return connected }, func() time.Time { return hb })

	got := scrape(t, url)
	for _, c := range []struct{ series, value string }{
		{`otherix_agent_tasks_total{outcome="success",type="vm.create"}`, "2"},
		{`otherix_agent_task_duration_seconds_count{outcome="success",type="vm.create"}`, "2"},
		{`otherix_agent_task_duration_seconds_sum{outcome="success",type="vm.create"}`, "92"},
		{`otherix_agent_task_duration_seconds_bucket{outcome="success",type="vm.create",le="60"}`, "1"},
		{`otherix_agent_task_duration_seconds_bucket{outcome="success",type="vm.create",le="120"}`, "2"},
		{`otherix_agent_tasks_total{outcome="failed",type="vm.stop"}`, "1"},
		{`otherix_agent_tasks_total{outcome="failed",type="other"}`, "1"},
		{`otherix_agent_image_cache_lookups_total{pool="default",result="hit"}`, "1"},
		{`otherix_agent_image_cache_lookups_total{pool="default",result="miss"}`, "2"},
		{`otherix_agent_image_ingest_bytes_total{pool="default"}`, "1024"},
		{`otherix_agent_image_ingests_total{outcome="success",pool="default"}`, "1"},
		{`otherix_agent_image_ingests_total{outcome="image_checksum_mismatch",pool="default"}`, "1"},
		{`otherix_agent_image_ingests_total{outcome="cancelled",pool="default"}`, "1"},
		{`otherix_agent_image_ingest_duration_seconds_count{outcome="success",pool="default"}`, "1"},
		{`otherix_agent_image_evictions_total{pool="default"}`, "1"},
		{`otherix_agent_image_evicted_bytes_total{pool="default"}`, "4096"},
		{`otherix_agent_qmp_command_duration_seconds_count{command="query-status"}`, "1"},
		{`otherix_agent_qmp_command_duration_seconds_bucket{command="query-status",le="0.0025"}`, "1"},
		{`otherix_agent_qmp_command_duration_seconds_bucket{command="query-status",le="0.001"}`, "0"},
		{`otherix_agent_qmp_command_errors_total{class="DeviceNotFound",command="device_add"}`, "1"},
		{`otherix_agent_qmp_command_errors_total{class="closed",command="quit"}`, "1"},
		{`otherix_agent_qmp_command_errors_total{class="timeout",command="screendump"}`, "1"},
		{`otherix_agent_control_plane_request_duration_seconds_count{path="/v1/agent/heartbeat"}`, "1"},
		{`otherix_agent_control_plane_request_duration_seconds_count{path="/v1/agent/tasks/{id}/progress"}`, "1"},
		{`otherix_agent_control_plane_request_errors_total{path="/v1/agent/tasks/{id}/progress",reason="503"}`, "1"},
		{`otherix_agent_control_plane_request_errors_total{path="/v1/agent/tasks/{id}/complete",reason="401"}`, "1"},
		{`otherix_agent_control_plane_request_errors_total{path="/v1/agent/tasks/lease",reason="transport"}`, "1"},
		{`otherix_agent_control_plane_request_duration_seconds_count{path="other"}`, "1"},
		{`otherix_agent_control_plane_connected`, "0"},
		{`otherix_agent_control_plane_heartbeat_age_seconds`, "90"},
		{`otherix_agent_guest_agent_up{vm="web-1"}`, "1"},
		{`otherix_agent_guest_agent_up{vm="web-2"}`, "0"},
		{`otherix_agent_vms{status="running"}`, "2"},
		{`otherix_agent_vms{status="stopped"}`, "1"},
		{`otherix_agent_vms{status="crashed"}`, "0"},
		{`otherix_agent_pool_size_bytes{pool="default"}`, "1.073741824e+11"},
		{`otherix_agent_pool_free_bytes{pool="default"}`, "4.294967296e+10"},
		{`otherix_agent_pool_cache_bytes{pool="default"}`, "5.36870912e+09"},
		{`otherix_agent_pool_ingest_bytes{pool="default"}`, "7"},
		{`otherix_agent_pool_images{pool="default"}`, "3"},
	} {
		want(t, got, c.series, c.value)
	}
	for k := range got {
		if strings.Contains(k, "task-123") || strings.Contains(k, "task-456") {
			t.Errorf("task id leaked into a label: %s", k)
		}
	}

	// Scrape-time series follow their sources; forgotten VMs go away.
	connected = true
	m.ForgetVM("web-2")
	got = scrape(t, url)
	want(t, got, `otherix_agent_control_plane_connected`, "1")
	if _, ok := got[`otherix_agent_guest_agent_up{vm="web-2"}`]; ok {
		t.Error("guest_agent_up of a forgotten VM still reported")
	}
}

func goVersion() string { return runtime.Version() }

func TestHeartbeatAgeAbsentBeforeFirst(t *testing.T) {
	m := New(Options{NoRuntime: true})
	m.SetControlPlane(nil, func() time.Time { return time.Time{} })
	if n := testutil.CollectAndCount(m.src, "otherix_agent_control_plane_heartbeat_age_seconds"); n != 0 {
		t.Errorf("heartbeat age series = %d before the first heartbeat, want 0", n)
	}
	if n := testutil.CollectAndCount(m.src, "otherix_agent_control_plane_connected"); n != 0 {
		t.Errorf("connected series = %d without a source, want 0", n)
	}
}

// TestLint runs promlint over every series, with all of them present.
func TestLint(t *testing.T) {
	m := New(Options{Version: "v0", Revision: "r"})
	m.ObserveTask(api.TaskCreate, api.TaskSuccess, time.Second)
	m.ObserveImageLookup("p", true)
	m.ObserveImageIngest("p", 1, time.Second, nil)
	m.ObserveImageEviction("p", 1)
	m.ObserveQMP("quit", time.Millisecond, "GenericError")
	m.ObserveControlPlane(protocol.PathHeartbeat, time.Millisecond, errors.New("x"))
	m.SetGuestAgent("vm", true)
	m.SetVMs(func() []api.VM { return nil })
	m.SetPools(func() []imagecache.PoolStats { return []imagecache.PoolStats{{Name: "p"}} })
	m.SetControlPlane(func() bool { return true }, time.Now)
	problems, err := testutil.GatherAndLint(m.reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	mfs, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	ours := 0
	for _, mf := range mfs {
		name := mf.GetName()
		switch {
		case strings.HasPrefix(name, "otherix_agent_"):
			ours++
		case strings.HasPrefix(name, "go_"), strings.HasPrefix(name, "process_"):
		default:
			t.Errorf("series %s has neither our prefix nor a runtime one", name)
		}
	}
	if ours != 22 {
		t.Errorf("gathered %d otherix_agent_ families, want 22", ours)
	}
}

// TestNil proves a nil *Metrics is a no-op everywhere.
func TestNil(t *testing.T) {
	var m *Metrics
	m.ObserveTask("a", "b", time.Second)
	m.ObserveImageLookup("p", true)
	m.ObserveImageIngest("p", 1, time.Second, nil)
	m.ObserveImageEviction("p", 1)
	m.ObserveQMP("quit", time.Second, "x")
	m.QMPObserver()("quit", time.Second, errors.New("x"))
	m.ObserveControlPlane("/", time.Second, nil)
	m.SetGuestAgent("vm", true)
	m.ForgetVM("vm")
	m.SetVMs(nil)
	m.SetPools(nil)
	m.SetControlPlane(nil, nil)
	if m.Registry() != nil {
		t.Error("nil Metrics has a registry")
	}
	url := serve(t, m)
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("nil Metrics /metrics = %s, want 404", resp.Status)
	}
}

func TestRouteOf(t *testing.T) {
	for in, want := range map[string]string{
		"/v1/agent/register":             "/v1/agent/register",
		"/v1/agent/heartbeat":            "/v1/agent/heartbeat",
		"/v1/agent/tasks/lease":          "/v1/agent/tasks/lease",
		"/v1/agent/tasks/t-1/progress":   "/v1/agent/tasks/{id}/progress",
		"/v1/agent/tasks/t%2F1/complete": "/v1/agent/tasks/{id}/complete",
		"/v1/agent/tasks/t-1/other":      "other",
		"/v1/agent/tasks/t-1":            "other",
		"/v1/agent/tasks/a/b/progress":   "other",
		"/elsewhere":                     "other",
	} {
		if got := routeOf(in); got != want {
			t.Errorf("routeOf(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestClassify(t *testing.T) {
	for _, c := range []struct {
		err     error
		qmp, cp string
		outcome string
	}{
		{nil, "", "", "success"},
		{&qmp.Error{Class: "GenericError"}, "GenericError", "transport", "internal"},
		{fmt.Errorf("x: %w", context.Canceled), "canceled", "canceled", "cancelled"},
		{fmt.Errorf("x: %w", context.DeadlineExceeded), "timeout", "timeout", "internal"},
		{&protocol.HTTPError{StatusCode: 429}, "other", "429", "internal"},
		{errcode.New(errcode.DiskFull, "full"), "other", "transport", "disk_full"},
	} {
		if got := QMPErrorClass(c.err); got != c.qmp {
			t.Errorf("QMPErrorClass(%v) = %q, want %q", c.err, got, c.qmp)
		}
		if got := ControlPlaneReason(c.err); got != c.cp {
			t.Errorf("ControlPlaneReason(%v) = %q, want %q", c.err, got, c.cp)
		}
		if got := errOutcome(c.err); got != c.outcome {
			t.Errorf("errOutcome(%v) = %q, want %q", c.err, got, c.outcome)
		}
	}
}
