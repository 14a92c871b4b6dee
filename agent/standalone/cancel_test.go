package standalone

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/otherix/otherix-agent/agent"
	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/runner"
)

// call sends one API request through h and decodes a 2xx answer into out.
func call(t *testing.T, h http.Handler, method, target string, body any, out any) *httptest.ResponseRecorder {
	t.Helper()
	var b []byte
	if body != nil {
		b, _ = json.Marshal(body)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, target, bytes.NewReader(b)))
	if out != nil && rec.Code < 300 {
		if err := json.Unmarshal(rec.Body.Bytes(), out); err != nil {
			t.Fatalf("%s %s: %v: %s", method, target, err, rec.Body)
		}
	}
	return rec
}

// TestTaskListAndCancel: GET /v1/tasks lists tasks newest first, of one
// VM with ?vm=; a pending task cancelled ends cancelled at once and is
// never delivered; cancelling it again, or a running task past its point
// of no return (a delivered vm.start), is 409 conflict; an unknown task
// is 404.
func TestTaskListAndCancel(t *testing.T) {
	t.Parallel()
	a, cp := newTestAPI(t, newTestHost(t), t.TempDir())
	h := a.Handler()
	var start, stop api.Task
	if rec := call(t, h, "POST", "/v1/vms/"+targetVM+"/start", nil, &start); rec.Code != http.StatusAccepted {
		t.Fatalf("start: %d %s", rec.Code, rec.Body)
	}
	leased, err := cp.Server().Lease(context.Background(), protocol.LeaseRequest{Max: 1})
	if err != nil || len(leased.Tasks) != 1 || leased.Tasks[0].ID != start.ID {
		t.Fatalf("lease: %+v %v", leased, err)
	}
	if rec := call(t, h, "POST", "/v1/vms/"+targetVM+"/stop", nil, &stop); rec.Code != http.StatusAccepted {
		t.Fatalf("stop: %d %s", rec.Code, rec.Body)
	}
	var list taskList
	call(t, h, "GET", "/v1/tasks?vm="+targetVM, nil, &list)
	if len(list.Tasks) != 2 || list.Tasks[0].ID != stop.ID || list.Tasks[1].ID != start.ID {
		t.Fatalf("task list: %+v", list.Tasks)
	}
	if call(t, h, "GET", "/v1/tasks?vm=other", nil, &list); len(list.Tasks) != 0 {
		t.Fatalf("tasks of another VM: %+v", list.Tasks)
	}

	var got api.Task
	if rec := call(t, h, "POST", "/v1/tasks/"+stop.ID+"/cancel", nil, &got); rec.Code != http.StatusOK || got.Status != api.TaskCancelled {
		t.Fatalf("cancel of a pending task: %d %s", rec.Code, rec.Body)
	}
	if l, _ := cp.Server().Lease(context.Background(), protocol.LeaseRequest{Max: 8}); len(l.Tasks) != 0 {
		t.Fatalf("a cancelled task was delivered: %+v", l.Tasks)
	}
	for _, tc := range []struct {
		id     string
		status int
	}{{stop.ID, http.StatusConflict}, {start.ID, http.StatusConflict}, {"nope", http.StatusNotFound}} {
		rec := call(t, h, "POST", "/v1/tasks/"+tc.id+"/cancel", nil, nil)
		if rec.Code != tc.status {
			t.Errorf("cancel %s: %d, want %d: %s", tc.id, rec.Code, tc.status, rec.Body)
			continue
		}
		checkEnvelope(t, rec)
	}
	if rec := call(t, h, "GET", "/v1/tasks?vm=..", nil, nil); rec.Code != http.StatusBadRequest {
		t.Fatalf("a bad vm filter: %d", rec.Code)
	}
}

// slowImage serves size bytes, a chunk every tick, until the client goes.
// Its strong ETag makes a partial download resumable, one the cache would
// keep after a shutdown.
func slowImage(size, chunk int, tick time.Duration) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		w.Header().Set("ETag", `"big-1"`)
		buf := make([]byte, chunk)
		for sent := 0; sent < size; sent += chunk {
			if _, err := w.Write(buf); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(tick):
			}
		}
	}
}

// TestCancelDownloadingCreate: a create still downloading its image,
// cancelled through the API with the agent's runner working it, ends
// cancelled and leaves nothing: no VM, no VM directory, no cached image,
// no pin, no partial download, and the VM is not desired any more.
func TestCancelDownloadingCreate(t *testing.T) {
	t.Parallel()
	host, cp, h, create := downloadingCreate(t)
	var got api.Task
	if rec := call(t, h, "POST", "/v1/tasks/"+create.ID+"/cancel", nil, &got); rec.Code != http.StatusOK || got.Status != api.TaskCancelled {
		t.Fatalf("cancel of a downloading create: %d %s", rec.Code, rec.Body)
	}
	checkNothingLeft(t, host, cp, h, "slow")
	if rec := call(t, h, "POST", "/v1/tasks/"+create.ID+"/cancel", nil, nil); rec.Code != http.StatusConflict {
		t.Errorf("cancel of a cancelled task: %d %s", rec.Code, rec.Body)
	}
}

// TestCancelQueuedTask: a task leased to the agent's runner but queued
// behind another task of its VM (a vm.start behind the VM's create,
// still downloading) shows progress phase "queued"; its cancel answers
// 200 cancelled at once, while the create still runs, and it never runs.
// The create, cancelled next, leaves nothing behind.
func TestCancelQueuedTask(t *testing.T) {
	t.Parallel()
	host, cp, h, create := downloadingCreate(t)
	var start api.Task
	if rec := call(t, h, "POST", "/v1/vms/slow/start", nil, &start); rec.Code != http.StatusAccepted {
		t.Fatalf("start: %d %s", rec.Code, rec.Body)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		var cur api.Task
		call(t, h, "GET", "/v1/tasks/"+start.ID, nil, &cur)
		if cur.Status == api.TaskRunning && cur.Progress != nil && cur.Progress.Phase == api.ProgressQueued {
			break
		}
		if cur.Status != api.TaskRunning && cur.Status != api.TaskPending || time.Now().After(deadline) {
			t.Fatalf("the start never showed queued: %+v %+v", cur, cur.Progress)
		}
	}
	var got api.Task
	if rec := call(t, h, "POST", "/v1/tasks/"+start.ID+"/cancel", nil, &got); rec.Code != http.StatusOK || got.Status != api.TaskCancelled {
		t.Fatalf("cancel of a queued start: %d %s", rec.Code, rec.Body)
	}
	var cur api.Task
	if call(t, h, "GET", "/v1/tasks/"+create.ID, nil, &cur); cur.Status != api.TaskRunning {
		t.Fatalf("the create ahead ended before the queued start's cancel: %+v", cur)
	}
	if rec := call(t, h, "POST", "/v1/tasks/"+start.ID+"/cancel", nil, nil); rec.Code != http.StatusConflict {
		t.Errorf("cancel of a cancelled task: %d %s", rec.Code, rec.Body)
	}
	if rec := call(t, h, "POST", "/v1/tasks/"+create.ID+"/cancel", nil, &got); rec.Code != http.StatusOK || got.Status != api.TaskCancelled {
		t.Fatalf("cancel of the downloading create: %d %s", rec.Code, rec.Body)
	}
	checkNothingLeft(t, host, cp, h, "slow")
	if evs, err := host.Events("slow"); err == nil && len(evs) != 0 {
		t.Errorf("events of the cancelled VM: %+v", evs)
	}
}

// startRunner runs the agent's runner against cp in process (its
// LocalClient), as the agent's standalone mode does, until the test ends.
func startRunner(t *testing.T, host *agent.Host, cp *ControlPlane, dir string) {
	t.Helper()
	client := cp.LocalClient("node-1", nil)
	j, err := journal.Open(filepath.Join(dir, "journal"), journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r := runner.New(client, j, host, host, runner.Config{InitialStagger: -1, LeaseWait: time.Second, ProgressInterval: 100 * time.Millisecond,
		Logger: zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))})
	ctx, cancel := context.WithCancel(context.Background())
	finished := make(chan struct{})
	go func() { r.Run(ctx); close(finished) }()
	t.Cleanup(func() { cancel(); <-finished; j.Close() })
}

// downloadingCreate starts a host, its API and its runner, and a create
// of VM "slow" from a slow image server, under way.
func downloadingCreate(t *testing.T) (*agent.Host, *ControlPlane, http.Handler, api.Task) {
	t.Helper()
	host := newTestHost(t)
	dir := t.TempDir()
	a, cp := newTestAPI(t, host, dir)
	h := a.Handler()
	img := httptest.NewServer(slowImage(256<<20, 64<<10, 20*time.Millisecond))
	t.Cleanup(img.Close)
	startRunner(t, host, cp, dir)
	return host, cp, h, createDownloading(t, h, img.URL)
}

// createDownloading creates VM "slow" from the slow image at url and
// waits until its create reports its download under way.
func createDownloading(t *testing.T, h http.Handler, url string) api.Task {
	t.Helper()
	var create api.Task
	body := api.CreateVM{Name: "slow", ImageURL: url + "/big.qcow2", Arch: "amd64", VCPUs: 1, MemoryMB: 256}
	if rec := call(t, h, "POST", "/v1/vms", body, &create); rec.Code != http.StatusAccepted {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		var cur api.Task
		call(t, h, "GET", "/v1/tasks/"+create.ID, nil, &cur)
		if cur.Progress != nil && cur.Progress.Phase == "download" && cur.Progress.Done > 0 {
			break
		}
		if cur.Status != api.TaskRunning && cur.Status != api.TaskPending || time.Now().After(deadline) {
			t.Fatalf("create never reported its download: %+v %+v", cur, cur.Error)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return create
}

// checkNothingLeft checks that a cancelled create left nothing: no VM,
// no VM directory, no cached image, no pin, no partial download, and the
// VM is not desired any more.
func checkNothingLeft(t *testing.T, host *agent.Host, cp *ControlPlane, h http.Handler, name string) {
	t.Helper()
	if rec := call(t, h, "GET", "/v1/vms/"+name, nil, nil); rec.Code != http.StatusNotFound {
		t.Errorf("the cancelled create's VM: %d %s", rec.Code, rec.Body)
	}
	pool, err := host.Cache().PoolDir("default")
	if err != nil {
		t.Fatal(err)
	}
	for _, sub := range []string{"vms", "images/ingest", "images/sha256"} {
		left, _ := filepath.Glob(filepath.Join(pool, sub, "*"))
		if len(left) != 0 {
			t.Errorf("left in %s after the cancel: %v", sub, left)
		}
	}
	if imgs, _ := host.Images(""); len(imgs) != 0 {
		t.Errorf("images after the cancel: %+v", imgs)
	}
	// The control plane forgets the VM as it records the outcome, just
	// after the task turned terminal.
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, ok := cp.UUIDOf(name); !ok {
			break
		}
		if time.Now().After(end) {
			t.Error("the cancelled VM is still desired")
			break
		}
	}
}
