package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// fakeAPI is an in-memory server of the seed-004 /v1 API the CLI speaks:
// VMs by name, async ops as tasks that finish after a few polls, sync ops,
// cursor pagination, the console and the error envelope. It is usable from
// its zero value; the exported fields script it.
type fakeAPI struct {
	// PollsToFinish is how many GET /v1/tasks/{id} a task answers before
	// it is terminal (the last of them sees the terminal status); 0 means 3.
	PollsToFinish int
	// FailNext makes the next submitted task fail with this error.
	FailNext *api.Error
	// CancelNext makes the next submitted task end cancelled.
	CancelNext bool
	// TaskErrors makes the next N task GETs answer 503 without an envelope.
	TaskErrors int
	// CreateError makes POST /v1/vms answer this error with CreateStatus.
	CreateError  *api.Error
	CreateStatus int
	// Token, when set, is the bearer token every request must carry.
	Token string

	mu       sync.Mutex
	vms      map[string]*api.VM
	tasks    map[string]*fakeTask
	consoles map[string]string
	usage    map[string]*api.Usage
	seq      int
	requests []fakeRequest
}

type fakeTask struct {
	task   api.Task
	polls  int
	fail   *api.Error
	cancel bool
	done   func() // applies the op's effect on success
}

// fakeRequest is one request the fake served.
type fakeRequest struct {
	Method, Path, Query, Auth string
	Body                      []byte
}

func (f *fakeAPI) init() {
	if f.vms == nil {
		f.vms = map[string]*api.VM{}
		f.tasks = map[string]*fakeTask{}
		f.consoles = map[string]string{}
	}
}

// AddVM stores v as is.
func (f *fakeAPI) AddVM(v api.VM) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.init()
	f.vms[v.Name] = &v
}

// SetConsole sets the console log of a VM.
func (f *fakeAPI) SetConsole(name, log string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.init()
	f.consoles[name] = log
}

// VM returns a copy of the named VM.
func (f *fakeAPI) VM(name string) (api.VM, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.init()
	v, ok := f.vms[name]
	if !ok {
		return api.VM{}, false
	}
	return *v, true
}

// Requests returns the requests served so far, without task polls when
// polls is false.
func (f *fakeAPI) Requests(polls bool) []fakeRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []fakeRequest
	for _, r := range f.requests {
		if !polls && strings.HasPrefix(r.Path, "/v1/tasks/") {
			continue
		}
		out = append(out, r)
	}
	return out
}

// Creates returns the decoded bodies of every POST /v1/vms.
func (f *fakeAPI) Creates(t *testing.T) []api.CreateVM {
	t.Helper()
	var out []api.CreateVM
	for _, r := range f.Requests(false) {
		if r.Method == http.MethodPost && r.Path == "/v1/vms" {
			var c api.CreateVM
			if err := json.Unmarshal(r.Body, &c); err != nil {
				t.Fatalf("create body %s: %v", r.Body, err)
			}
			out = append(out, c)
		}
	}
	return out
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	f.init()
	f.requests = append(f.requests, fakeRequest{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Auth: r.Header.Get("Authorization"), Body: body})
	token := f.Token
	f.mu.Unlock()
	if token != "" && r.Header.Get("Authorization") != "Bearer "+token {
		fakeErr(w, http.StatusUnauthorized, "unauthorized", "bad or missing token")
		return
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/vms", func(w http.ResponseWriter, r *http.Request) { f.create(w, body) })
	mux.HandleFunc("GET /v1/vms", f.list)
	mux.HandleFunc("GET /v1/vms/{name}", f.get)
	mux.HandleFunc("PATCH /v1/vms/{name}", f.get) // the view, unchanged: tests read the request
	mux.HandleFunc("DELETE /v1/vms/{name}", f.async(api.TaskDelete))
	for _, op := range []string{"start", "stop", "poweroff", "reboot"} {
		mux.HandleFunc("POST /v1/vms/{name}/"+op, f.async("vm."+op))
	}
	for _, op := range []string{"reset", "pause", "resume"} {
		mux.HandleFunc("POST /v1/vms/{name}/"+op, f.sync(op))
	}
	mux.HandleFunc("GET /v1/vms/{name}/console", f.console)
	mux.HandleFunc("GET /v1/vms/{name}/stats", f.stats)
	mux.HandleFunc("GET /v1/tasks/{id}", f.task)
	mux.HandleFunc("GET /v1/tasks", f.taskList)
	mux.HandleFunc("POST /v1/tasks/{id}/cancel", f.cancelTask)
	mux.ServeHTTP(w, r)
}

// taskList answers GET /v1/tasks?vm=: the tasks, newest first.
func (f *fakeAPI) taskList(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := []api.Task{}
	for _, ft := range f.tasks {
		if vm := r.URL.Query().Get("vm"); vm == "" || ft.task.VMName == vm {
			out = append(out, ft.task)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID > out[j].ID })
	fakeJSON(w, http.StatusOK, map[string]any{"tasks": out})
}

// cancelTask answers POST /v1/tasks/{id}/cancel: a pending task ends
// cancelled, any other is a conflict.
func (f *fakeAPI) cancelTask(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ft, ok := f.tasks[r.PathValue("id")]
	switch {
	case !ok:
		fakeErr(w, http.StatusNotFound, "not_found", "task not found")
	case ft.task.Status != api.TaskPending:
		fakeErr(w, http.StatusConflict, "conflict", "cannot cancel: task is "+ft.task.Status)
	default:
		ft.task.Status = api.TaskCancelled
		ft.task.Error = &api.Error{Code: "cancelled", Message: "cancelled before it was delivered"}
		fakeJSON(w, http.StatusOK, ft.task)
	}
}

func fakeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func fakeErr(w http.ResponseWriter, status int, code, msg string) {
	fakeJSON(w, status, api.ErrorEnvelope{Error: api.Error{Code: code, Message: msg}})
}

// newTask registers a task (f.mu held).
func (f *fakeAPI) newTask(typ, vm string, done func()) api.Task {
	f.seq++
	ft := &fakeTask{
		task: api.Task{ID: fmt.Sprintf("task-%d", f.seq), Type: typ, VMName: vm, Status: api.TaskPending, CreatedAt: time.Unix(0, 0).UTC()},
		fail: f.FailNext, cancel: f.CancelNext, done: done,
	}
	f.FailNext, f.CancelNext = nil, false
	f.tasks[ft.task.ID] = ft
	return ft.task
}

func (f *fakeAPI) create(w http.ResponseWriter, body []byte) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	var c api.CreateVM
	if err := dec.Decode(&c); err != nil {
		fakeErr(w, http.StatusBadRequest, "validation_failed", "bad request body: "+err.Error())
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if e := f.CreateError; e != nil {
		fakeErr(w, f.CreateStatus, e.Code, e.Message)
		return
	}
	switch {
	case c.Name == "" || c.ImageURL == "" || c.Arch == "":
		fakeErr(w, http.StatusBadRequest, "validation_failed", "name, image_url and arch are required")
		return
	case c.NoCloudInit && (c.UserData != "" || c.NetworkConfig != ""):
		fakeErr(w, http.StatusBadRequest, "validation_failed", "no_cloud_init excludes user_data and network_config")
		return
	}
	if _, ok := f.vms[c.Name]; ok {
		fakeErr(w, http.StatusConflict, "conflict", fmt.Sprintf("vm %q already exists", c.Name))
		return
	}
	pool := c.Pool
	if pool == "" {
		pool = "default"
	}
	sum := c.ImageSHA256
	if sum == "" {
		sum = strings.Repeat("ab", 32)
	}
	v := &api.VM{
		Name: c.Name, UUID: fmt.Sprintf("00000000-0000-4000-8000-%012d", f.seq+1), Status: api.StatusCreating,
		Arch: c.Arch, VCPUs: c.VCPUs, MemoryMB: c.MemoryMB, Pool: pool, Node: "node-1", Network: c.Network,
		ImageURL: c.ImageURL, ImageSHA256: sum, DiskGiB: c.DiskGiB, CloudInit: !c.NoCloudInit,
		CreatedAt: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC),
	}
	if v.DiskGiB == 0 {
		v.DiskGiB = 3
	}
	f.vms[c.Name] = v
	t := f.newTask(api.TaskCreate, c.Name, func() { v.Status = api.StatusRunning; v.QEMUPID = 4242 })
	fakeJSON(w, http.StatusAccepted, t)
}

func (f *fakeAPI) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := 100
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			fakeErr(w, http.StatusBadRequest, "validation_failed", "limit must be 1..1000")
			return
		}
		limit = n
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	names := make([]string, 0, len(f.vms))
	for n := range f.vms {
		names = append(names, n)
	}
	sort.Strings(names)
	out := []api.VM{}
	next := ""
	for _, n := range names {
		v := f.vms[n]
		if c := q.Get("cursor"); c != "" && n <= c ||
			q.Get("pool") != "" && v.Pool != q.Get("pool") ||
			q.Get("node") != "" && v.Node != q.Get("node") ||
			q.Get("status") != "" && v.Status != q.Get("status") {
			continue
		}
		if len(out) == limit {
			next = out[len(out)-1].Name
			break
		}
		out = append(out, *v)
	}
	fakeJSON(w, http.StatusOK, struct {
		VMs        []api.VM `json:"vms"`
		NextCursor string   `json:"next_cursor,omitempty"`
	}{out, next})
}

// lookup returns the VM of the request's {name} (f.mu held).
func (f *fakeAPI) lookup(w http.ResponseWriter, r *http.Request) (*api.VM, bool) {
	name := r.PathValue("name")
	v, ok := f.vms[name]
	if !ok {
		fakeErr(w, http.StatusNotFound, "not_found", fmt.Sprintf("vm %q not found", name))
	}
	return v, ok
}

// SetUsage sets a VM's usage: its stats, and the summary in its view.
func (f *fakeAPI) SetUsage(name string, u *api.Usage) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.init()
	if f.usage == nil {
		f.usage = map[string]*api.Usage{}
	}
	f.usage[name] = u
	if v := f.vms[name]; v != nil {
		v.Usage = u.Summary()
	}
}

func (f *fakeAPI) stats(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if v, ok := f.lookup(w, r); ok {
		fakeJSON(w, http.StatusOK, api.VMStats{Name: v.Name, UUID: v.UUID, Status: v.Status, Usage: f.usage[v.Name]})
	}
}

func (f *fakeAPI) get(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if v, ok := f.lookup(w, r); ok {
		fakeJSON(w, http.StatusOK, v)
	}
}

func (f *fakeAPI) async(typ string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		v, ok := f.lookup(w, r)
		if !ok {
			return
		}
		var done func()
		switch typ {
		case api.TaskStart, api.TaskReboot:
			done = func() { v.Status = api.StatusRunning }
		case api.TaskStop, api.TaskPoweroff:
			done = func() { v.Status = api.StatusStopped }
		case api.TaskDelete:
			done = func() { delete(f.vms, v.Name) }
		}
		fakeJSON(w, http.StatusAccepted, f.newTask(typ, v.Name, done))
	}
}

func (f *fakeAPI) sync(op string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		v, ok := f.lookup(w, r)
		if !ok {
			return
		}
		from, to := api.StatusRunning, api.StatusRunning
		switch op {
		case "pause":
			to = api.StatusPaused
		case "resume":
			from = api.StatusPaused
		}
		if v.Status != from {
			fakeErr(w, http.StatusConflict, "conflict", fmt.Sprintf("vm %q is %s", v.Name, v.Status))
			return
		}
		v.Status = to
		fakeJSON(w, http.StatusOK, v)
	}
}

func (f *fakeAPI) console(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.lookup(w, r)
	if !ok {
		return
	}
	log := f.consoles[v.Name]
	if s := r.URL.Query().Get("tail"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			fakeErr(w, http.StatusBadRequest, "validation_failed", "tail must be a positive number of bytes")
			return
		}
		if n < len(log) {
			log = log[len(log)-n:]
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.WriteString(w, log)
}

func (f *fakeAPI) task(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.TaskErrors > 0 {
		f.TaskErrors--
		http.Error(w, "upstream hiccup", http.StatusServiceUnavailable)
		return
	}
	ft, ok := f.tasks[r.PathValue("id")]
	if !ok {
		fakeErr(w, http.StatusNotFound, "not_found", "task not found")
		return
	}
	finish := f.PollsToFinish
	if finish == 0 {
		finish = 3
	}
	if ft.polls++; ft.polls >= finish && ft.task.Status != api.TaskSuccess && ft.task.Status != api.TaskFailed && ft.task.Status != api.TaskCancelled {
		switch {
		case ft.fail != nil:
			ft.task.Status, ft.task.Error = api.TaskFailed, ft.fail
		case ft.cancel:
			ft.task.Status = api.TaskCancelled
		default:
			ft.task.Status = api.TaskSuccess
			if ft.done != nil {
				ft.done()
			}
			if v, ok := f.vms[ft.task.VMName]; ok {
				c := *v
				ft.task.Result = &c
			}
		}
	} else if ft.task.Status == api.TaskPending {
		ft.task.Status = api.TaskRunning
		ft.task.Progress = &api.Progress{Phase: "download", Done: 1, Total: 2}
	}
	fakeJSON(w, http.StatusOK, ft.task)
}

// result is one run of the CLI.
type result struct {
	code           int
	stdout, stderr string
}

// harness runs the CLI in-process against a fake server.
type harness struct {
	t   *testing.T
	api *fakeAPI
	srv *httptest.Server
	env map[string]string
	// terminal makes the CLI see stdin as a terminal; outTerminal,
	// stdout.
	terminal, outTerminal bool
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	f := &fakeAPI{}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return &harness{t: t, api: f, srv: srv, env: map[string]string{
		envURL:          srv.URL,
		envPollInterval: "1ms",
	}}
}

// run runs otherix with args and stdin.
func (h *harness) run(stdin string, args ...string) result {
	h.t.Helper()
	var out, errb bytes.Buffer
	c := &cli{
		stdin: strings.NewReader(stdin), stdout: &out, stderr: &errb,
		env:         func(k string) string { return h.env[k] },
		isTerminal:  func(io.Reader) bool { return h.terminal },
		outTerminal: func(io.Writer) bool { return h.outTerminal },
	}
	code := c.main(h.t.Context(), args)
	return result{code: code, stdout: out.String(), stderr: errb.String()}
}

// cli returns a CLI of the harness writing to out.
func (h *harness) cli(out io.Writer) *cli {
	return &cli{
		stdin: strings.NewReader(""), stdout: out, stderr: io.Discard,
		env:         func(k string) string { return h.env[k] },
		isTerminal:  func(io.Reader) bool { return h.terminal },
		outTerminal: func(io.Writer) bool { return h.outTerminal },
	}
}

// must runs otherix and fails the test unless it exits 0.
func (h *harness) must(args ...string) result {
	h.t.Helper()
	r := h.run("", args...)
	if r.code != 0 {
		h.t.Fatalf("otherix %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}
