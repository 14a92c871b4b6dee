package standalone

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Bounds of the API's request bodies: a create (user-data is at most
// 64 KiB by default; the rest of a create is small), a stop, a pull.
const (
	maxBody     = 1 << 20
	maxStopBody = 4 << 10
	maxPullBody = 64 << 10
	// maxSmallBody bounds the other bodies (a device, an update, a volume).
	maxSmallBody = 4 << 10
)

// Host is what the API reads from this host. It changes nothing through
// it: every change is a task of the control plane, which the agent's
// runner executes (docs/protocol.md).
type Host interface {
	VMs(ctx context.Context) []api.VM
	VM(name string) (api.VM, error)
	Node(ctx context.Context) protocol.NodeInfo
	Firmwares() []api.Firmware
	Images(pool string) ([]api.Image, error)
	Volumes(pool string) ([]api.Volume, error)
	// Pool resolves a request's pool: the default one when name is
	// empty; pool_not_found for an unknown one.
	Pool(name string) (string, error)
	// ValidateCreate checks a create and fills in its defaults.
	ValidateCreate(c *api.CreateVM) error
	// ValidateUpdate checks an update's values.
	ValidateUpdate(u api.UpdateVM) error
	// OpenConsole opens a VM's console log (os.ErrNotExist in the chain
	// when the VM never ran).
	OpenConsole(name string) (*os.File, error)
	// Stats is a VM's last usage sample.
	Stats(name string) (api.VMStats, error)
	// Events is a VM's history, oldest first.
	Events(name string) ([]api.VMEvent, error)
}

// API serves seed 004's /v1/vms surface over the control plane.
type API struct {
	host Host
	cp   *ControlPlane
	log  *zap.Logger
	// SyncTimeout bounds sync ops (reset, pause, resume, and the changes
	// answered with their result).
	SyncTimeout time.Duration
	// cluster is set in cluster mode (SetCluster).
	cluster *Cluster
}

// NewAPI returns the API handler.
func NewAPI(h Host, cp *ControlPlane, log *zap.Logger) *API {
	return &API{host: h, cp: cp, log: log, SyncTimeout: 2 * time.Minute}
}

// Handler returns the HTTP routes.
func (a *API) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/vms", a.create)
	mux.HandleFunc("GET /v1/vms", a.list)
	mux.HandleFunc("GET /v1/vms/{name}", a.get)
	mux.HandleFunc("PATCH /v1/vms/{name}", a.patch)
	mux.HandleFunc("POST /v1/vms/{name}/disks", a.disk(true))
	mux.HandleFunc("DELETE /v1/vms/{name}/disks", a.disk(false))
	mux.HandleFunc("POST /v1/vms/{name}/cdroms/{index}", a.medium)
	mux.HandleFunc("POST /v1/vms/{name}/forwards", a.forward(true))
	mux.HandleFunc("DELETE /v1/vms/{name}/forwards", a.forward(false))
	mux.HandleFunc("GET /v1/firmwares", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.FirmwareList{Firmwares: a.host.Firmwares()})
	})
	mux.HandleFunc("DELETE /v1/vms/{name}", a.async(api.TaskDelete))
	mux.HandleFunc("POST /v1/vms/{name}/start", a.async(api.TaskStart))
	mux.HandleFunc("POST /v1/vms/{name}/stop", a.async(api.TaskStop))
	mux.HandleFunc("POST /v1/vms/{name}/poweroff", a.async(api.TaskPoweroff))
	mux.HandleFunc("POST /v1/vms/{name}/reboot", a.async(api.TaskReboot))
	mux.HandleFunc("POST /v1/vms/{name}/delete", a.async(api.TaskDelete))
	mux.HandleFunc("POST /v1/vms/{name}/reset", a.sync(api.TaskReset))
	mux.HandleFunc("POST /v1/vms/{name}/pause", a.sync(api.TaskPause))
	mux.HandleFunc("POST /v1/vms/{name}/resume", a.sync(api.TaskResume))
	mux.HandleFunc("GET /v1/vms/{name}/console", a.console)
	mux.HandleFunc("GET /v1/vms/{name}/stats", a.stats)
	mux.HandleFunc("GET /v1/vms/{name}/events", a.events)
	mux.HandleFunc("GET /v1/vms/{name}/screenshot", a.screenshot)
	mux.HandleFunc("GET /v1/tasks", a.tasks)
	mux.HandleFunc("GET /v1/tasks/{id}", a.task)
	mux.HandleFunc("POST /v1/tasks/{id}/cancel", a.cancel)
	mux.HandleFunc("GET /v1/volumes", a.volumes)
	mux.HandleFunc("POST /v1/volumes", a.createVolume)
	mux.HandleFunc("DELETE /v1/volumes/{name}", a.deleteVolume)
	mux.HandleFunc("GET /v1/images", a.images)
	mux.HandleFunc("POST /v1/images", a.pullImage)
	mux.HandleFunc("DELETE /v1/images/{digest}", a.deleteImage)
	mux.HandleFunc("GET /v1/nodes", a.nodes)
	mux.HandleFunc("GET /v1/nodes/{name}", a.node)
	mux.HandleFunc("GET /v1/node", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.host.Node(r.Context()))
	})
	if a.cluster != nil {
		return a.clusterRoute(routed(mux))
	}
	return routed(mux)
}

// StatusOf maps an error code to its HTTP status (errcode's one table).
func StatusOf(code errcode.Code) int { return errcode.HTTPStatus(code) }

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, err error) {
	code := errcode.Of(err)
	writeJSON(w, StatusOf(code), api.ErrorEnvelope{Error: api.Error{Code: string(code), Message: errcode.MessageOf(err)}})
}

func (a *API) create(w http.ResponseWriter, r *http.Request) {
	var c api.CreateVM
	b, err := decodeBody(w, r, maxBody, &c, false)
	if err == nil {
		err = explicitZero(b, defaultedKeys...)
	}
	if err != nil {
		writeErr(w, err)
		return
	}
	orig := c
	for try := 1; ; try++ {
		c = orig
		// A create the scheduler placed (cluster mode) whose node was
		// filled first by creates sent at the same instant is placed
		// again, on what is left.
		again := a.cluster != nil && orig.Node == "" && !isPeer(r) && try < placeTries
		if !a.createOnce(w, r, &c, b, again) {
			return
		}
	}
}

// createOnce places (cluster mode) and queues a create, and answers the
// request; with again, it answers nothing and returns true when the
// node the scheduler picked was full by the time the create was stored.
func (a *API) createOnce(w http.ResponseWriter, r *http.Request, c *api.CreateVM, b []byte, again bool) bool {
	var placement *api.Placement
	if a.cluster != nil {
		var done, full bool
		if placement, done, full = a.place(w, r, c, b, again); done {
			return full
		}
	}
	if err := a.host.ValidateCreate(c); err != nil {
		writeErr(w, err)
		return false
	}
	if _, err := a.host.VM(c.Name); err == nil {
		writeErr(w, errcode.New(errcode.Conflict, "vm %q already exists", c.Name))
		return false
	}
	if t, busy := a.cp.Busy(c.Name); busy {
		writeErr(w, errcode.New(errcode.Conflict, "vm %q has task %s (%s) in progress", c.Name, t.ID, t.Type))
		return false
	}
	t, err := a.cp.EnqueuePlaced(api.TaskCreate, c.Name, uuid.NewString(), *c, placement)
	if again && errcode.Is(err, errcode.NoNodeFits) {
		return true
	}
	if a.queued(w, err) {
		writeJSON(w, http.StatusAccepted, t)
	}
	return false
}

// queue queues a task. When it cannot, it answers the request (429 with
// Retry-After when the control plane holds too many unfinished tasks) and
// returns false.
func (a *API) queue(w http.ResponseWriter, typ, vmName, vmUUID string, spec any) (api.Task, bool) {
	t, err := a.cp.Enqueue(typ, vmName, vmUUID, spec)
	return t, a.queued(w, err)
}

// queued answers the request when a task could not be queued (err) and
// returns false; it returns true when the task was.
func (a *API) queued(w http.ResponseWriter, err error) bool {
	var busy *cpserver.TooManyTasksError
	switch {
	case errors.As(err, &busy):
		w.Header().Set("Retry-After", strconv.Itoa(cpserver.RetryAfterSeconds))
		// The code is conflict until errcode has one for this
		// (rate_limited); the status tells clients to come back.
		writeJSON(w, http.StatusTooManyRequests, api.ErrorEnvelope{Error: api.Error{Code: string(errcode.RateLimited), Message: err.Error()}})
		return false
	case isUnavailable(err):
		w.Header().Set("Retry-After", strconv.Itoa(cpserver.RetryAfterSeconds))
		writeErr(w, storeErr(err))
		return false
	case errors.Is(err, cpserver.ErrNameTaken):
		// Another create of the name was stored first (any host).
		writeErr(w, errcode.Wrap(errcode.Conflict, err, "vm already exists"))
		return false
	case err != nil && errcode.Of(err) != errcode.Internal:
		writeErr(w, err) // the store's check of a placed create: no_node_fits
		return false
	case err != nil:
		writeErr(w, errcode.Wrap(errcode.Internal, err, "queue task"))
		return false
	}
	return true
}

// enqueue queues a task and answers 202 with it.
func (a *API) enqueue(w http.ResponseWriter, typ, vmName, vmUUID string, spec any) {
	if t, ok := a.queue(w, typ, vmName, vmUUID, spec); ok {
		writeJSON(w, http.StatusAccepted, t)
	}
}

// listPage is the body of GET /v1/vms.
type listPage struct {
	VMs        []api.VM `json:"vms"`
	NextCursor string   `json:"next_cursor,omitempty"`
}

func (a *API) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := 100
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 1000 {
			writeErr(w, errcode.New(errcode.ValidationFailed, "limit must be 1..1000"))
			return
		}
		limit = n
	}
	// The cursor is the last name of the previous page.
	cursor := q.Get("cursor")
	if cursor != "" && (!api.IsName(cursor) || api.IsUUID(cursor)) {
		writeErr(w, errcode.New(errcode.ValidationFailed, "cursor %q is not a next_cursor this API gave", cursor))
		return
	}
	all, err := a.vmsView(r.Context())
	if err != nil {
		writeErr(w, err)
		return
	}
	if a.cluster != nil {
		ptrs := make([]*api.VM, len(all))
		for i := range all {
			ptrs[i] = &all[i]
		}
		a.placed(r.Context(), ptrs...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Name < all[j].Name })
	var out []api.VM
	next := ""
	for _, v := range all {
		if cursor != "" && v.Name <= cursor {
			continue
		}
		if p := q.Get("pool"); p != "" && v.Pool != p {
			continue
		}
		if n := q.Get("node"); n != "" && v.Node != n {
			continue
		}
		if s := q.Get("status"); s != "" && v.Status != s {
			continue
		}
		if len(out) == limit {
			next = out[len(out)-1].Name
			break
		}
		out = append(out, v)
	}
	if out == nil {
		out = []api.VM{}
	}
	writeJSON(w, http.StatusOK, listPage{VMs: out, NextCursor: next})
}

func (a *API) vmName(w http.ResponseWriter, r *http.Request) (string, bool) {
	name := r.PathValue("name")
	if api.IsUUID(name) {
		writeErr(w, errcode.New(errcode.ValidationFailed, "%q is a UUID literal: VMs are addressed by name", name))
		return "", false
	}
	return name, true
}

func (a *API) get(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	v, err := a.vmView(r.Context(), name)
	if err != nil {
		writeErr(w, err)
		return
	}
	a.placed(r.Context(), &v)
	writeJSON(w, http.StatusOK, v)
}

// stats answers a VM's usage: GET /v1/vms/{name}/stats.
func (a *API) stats(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	st, err := a.host.Stats(name)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// events answers a VM's history, oldest first.
func (a *API) events(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	evs, err := a.host.Events(name)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, api.VMEventList{Events: evs})
}

// target resolves the VM an op names: it must exist on this host.
func (a *API) target(w http.ResponseWriter, r *http.Request) (api.VM, bool) {
	name, ok := a.vmName(w, r)
	if !ok {
		return api.VM{}, false
	}
	v, err := a.host.VM(name)
	if err != nil {
		writeErr(w, err)
		return api.VM{}, false
	}
	return v, true
}

func (a *API) async(typ string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		v, ok := a.target(w, r)
		if !ok {
			return
		}
		var spec any
		if typ == api.TaskStop {
			var s api.StopSpec
			if _, err := decodeBody(w, r, maxStopBody, &s, true); err != nil {
				writeErr(w, err)
				return
			}
			if s.Force {
				// seed 004: stop --force dispatches poweroff
				a.enqueue(w, api.TaskPoweroff, v.Name, v.UUID, nil)
				return
			}
			spec = s
		}
		a.enqueue(w, typ, v.Name, v.UUID, spec)
	}
}

// sync runs an op through the control plane and answers with the VM.
func (a *API) sync(typ string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		v, ok := a.target(w, r)
		if !ok {
			return
		}
		// Answer the obvious conflicts at once, as seed 004 documents.
		switch {
		case typ == api.TaskPause && v.Status == api.StatusPaused,
			typ == api.TaskResume && v.Status == api.StatusRunning:
			writeErr(w, errcode.New(errcode.Conflict, "vm %q is already %s", v.Name, v.Status))
			return
		}
		if t, ok := a.run(w, r, typ, v.Name, v.UUID, nil); ok {
			a.answerVM(w, t, v.Name)
		}
	}
}

// run queues a task and waits for it (at most SyncTimeout). A task that
// did not succeed is answered with its error, and ok is false.
func (a *API) run(w http.ResponseWriter, r *http.Request, typ, vmName, vmUUID string, spec any) (api.Task, bool) {
	t, ok := a.queue(w, typ, vmName, vmUUID, spec)
	if !ok {
		return t, false
	}
	ctx, cancel := context.WithTimeout(r.Context(), a.SyncTimeout)
	defer cancel()
	done, err := a.cp.Wait(ctx, t.ID)
	if err != nil {
		writeErr(w, errcode.Wrap(errcode.Internal, err, "task %s did not finish", t.ID))
		return t, false
	}
	if done.Status != api.TaskSuccess {
		e := api.Error{Code: string(errcode.Internal), Message: "task " + done.Status}
		if done.Error != nil {
			e = *done.Error
		}
		writeJSON(w, StatusOf(errcode.Code(e.Code)), api.ErrorEnvelope{Error: e})
		return done, false
	}
	return done, true
}

// answerVM answers 200 with a finished task's VM view, or the VM's
// current one.
func (a *API) answerVM(w http.ResponseWriter, t api.Task, name string) {
	if t.Result != nil {
		writeJSON(w, http.StatusOK, t.Result)
		return
	}
	v, err := a.host.VM(name)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (a *API) console(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	f, err := a.host.OpenConsole(name)
	if errors.Is(err, os.ErrNotExist) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		return
	}
	if err != nil {
		writeErr(w, err)
		return
	}
	defer f.Close()
	if s := r.URL.Query().Get("tail"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 1 {
			writeErr(w, errcode.New(errcode.ValidationFailed, "tail must be a positive number of bytes"))
			return
		}
		if fi, err := f.Stat(); err == nil && fi.Size() > n {
			f.Seek(fi.Size()-n, io.SeekStart)
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.Copy(w, f)
}

func (a *API) task(w http.ResponseWriter, r *http.Request) {
	t, err := a.cp.Task(r.Context(), r.PathValue("id"))
	if errors.Is(err, cpserver.ErrNotFound) {
		writeErr(w, errcode.New(errcode.NotFound, "task %q not found", r.PathValue("id")))
		return
	}
	if err != nil {
		writeErr(w, storeErr(err)) // 503 cluster_unavailable without quorum
		return
	}
	writeJSON(w, http.StatusOK, t)
}

func (a *API) images(w http.ResponseWriter, r *http.Request) {
	imgs, err := a.host.Images(r.URL.Query().Get("pool"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, api.ImageList{Images: imgs})
}

func (a *API) pullImage(w http.ResponseWriter, r *http.Request) {
	var p api.PullImage
	if _, err := decodeBody(w, r, maxPullBody, &p, false); err != nil {
		writeErr(w, err)
		return
	}
	if p.URL == "" {
		writeErr(w, errcode.New(errcode.ValidationFailed, "url is required"))
		return
	}
	pool, err := a.host.Pool(p.Pool)
	if err != nil {
		writeErr(w, err)
		return
	}
	p.Pool = pool
	a.enqueue(w, api.TaskImagePull, "", "", p)
}
