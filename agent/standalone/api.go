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
	"strings"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent"
	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/errcode"
	"github.com/otherix/otherix-agent/agent/vm"
)

// maxBody bounds every API request body (user-data is at most 64 KiB by
// default; the rest of a create is small).
const maxBody = 1 << 20

// API serves seed 004's /v1/vms surface over the control plane.
type API struct {
	host *agent.Host
	cp   *ControlPlane
	log  *zap.Logger
	// SyncTimeout bounds sync ops (reset, pause, resume).
	SyncTimeout time.Duration
}

// NewAPI returns the API handler.
func NewAPI(h *agent.Host, cp *ControlPlane, log *zap.Logger) *API {
	return &API{host: h, cp: cp, log: log, SyncTimeout: 2 * time.Minute}
}

// Handler returns the HTTP routes.
func (a *API) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/vms", a.create)
	mux.HandleFunc("GET /v1/vms", a.list)
	mux.HandleFunc("GET /v1/vms/{name}", a.get)
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
	mux.HandleFunc("GET /v1/tasks/{id}", a.task)
	mux.HandleFunc("GET /v1/images", a.images)
	mux.HandleFunc("POST /v1/images", a.pullImage)
	mux.HandleFunc("GET /v1/node", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.host.Node(r.Context()))
	})
	return mux
}

// StatusOf maps an error code to its HTTP status.
func StatusOf(code errcode.Code) int {
	switch code {
	case errcode.ValidationFailed, errcode.DefaultPoolNotSet, errcode.ImageFormatUnsupported:
		return http.StatusBadRequest
	case errcode.NotFound, errcode.NetworkNotFound, errcode.PoolNotFound:
		return http.StatusNotFound
	case errcode.Conflict, errcode.PoolNotOnNode, errcode.PortInUse, errcode.DeviceBusy:
		return http.StatusConflict
	case errcode.Unauthorized:
		return http.StatusUnauthorized
	case errcode.NetworkUnavailable:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

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
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	var c api.CreateVM
	if err := dec.Decode(&c); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeErr(w, errcode.New(errcode.ValidationFailed, "request body over %d bytes", maxBody))
			return
		}
		writeErr(w, errcode.New(errcode.ValidationFailed, "bad request body: %s", strings.TrimPrefix(err.Error(), "json: ")))
		return
	}
	if err := a.host.ValidateCreate(&c); err != nil {
		writeErr(w, err)
		return
	}
	if _, err := a.host.VM(c.Name); err == nil {
		writeErr(w, errcode.New(errcode.Conflict, "vm %q already exists", c.Name))
		return
	}
	if t, busy := a.cp.Busy(c.Name); busy {
		writeErr(w, errcode.New(errcode.Conflict, "vm %q has task %s (%s) in progress", c.Name, t.ID, t.Type))
		return
	}
	t, err := a.cp.Enqueue(api.TaskCreate, c.Name, uuid.NewString(), c)
	if err != nil {
		writeErr(w, errcode.Wrap(errcode.Internal, err, "queue task"))
		return
	}
	writeJSON(w, http.StatusAccepted, t)
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
	all := a.host.VMs(r.Context())
	sort.Slice(all, func(i, j int) bool { return all[i].Name < all[j].Name })
	cursor := q.Get("cursor")
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
	if vm.IsUUID(name) {
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
	v, err := a.host.VM(name)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
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
			if r.ContentLength != 0 {
				dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096))
				dec.DisallowUnknownFields()
				if err := dec.Decode(&s); err != nil && !errors.Is(err, io.EOF) {
					writeErr(w, errcode.New(errcode.ValidationFailed, "bad request body: %v", err))
					return
				}
			}
			if s.Force {
				typ := api.TaskPoweroff // seed 004: stop --force dispatches poweroff
				t, err := a.cp.Enqueue(typ, v.Name, v.UUID, nil)
				if err != nil {
					writeErr(w, errcode.Wrap(errcode.Internal, err, "queue task"))
					return
				}
				writeJSON(w, http.StatusAccepted, t)
				return
			}
			spec = s
		}
		t, err := a.cp.Enqueue(typ, v.Name, v.UUID, spec)
		if err != nil {
			writeErr(w, errcode.Wrap(errcode.Internal, err, "queue task"))
			return
		}
		writeJSON(w, http.StatusAccepted, t)
	}
}

// sync runs an op through the control plane and answers with its result.
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
		t, err := a.cp.Enqueue(typ, v.Name, v.UUID, nil)
		if err != nil {
			writeErr(w, errcode.Wrap(errcode.Internal, err, "queue task"))
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), a.SyncTimeout)
		defer cancel()
		t, err = a.cp.Wait(ctx, t.ID)
		if err != nil {
			writeErr(w, errcode.Wrap(errcode.Internal, err, "task %s did not finish", t.ID))
			return
		}
		if t.Status != api.TaskSuccess {
			e := api.Error{Code: string(errcode.Internal), Message: "task " + t.Status}
			if t.Error != nil {
				e = *t.Error
			}
			writeJSON(w, StatusOf(errcode.Code(e.Code)), api.ErrorEnvelope{Error: e})
			return
		}
		if t.Result != nil {
			writeJSON(w, http.StatusOK, t.Result)
			return
		}
		nv, _ := a.host.VM(v.Name)
		writeJSON(w, http.StatusOK, nv)
	}
}

func (a *API) console(w http.ResponseWriter, r *http.Request) {
	name, ok := a.vmName(w, r)
	if !ok {
		return
	}
	v, err := a.host.Engine().Get(name)
	if err != nil {
		writeErr(w, err)
		return
	}
	f, err := os.Open(v.ConsolePath)
	if errors.Is(err, os.ErrNotExist) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		return
	}
	if err != nil {
		writeErr(w, errcode.Wrap(errcode.Internal, err, "console log"))
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
	t, ok := a.cp.Task(r.PathValue("id"))
	if !ok {
		writeErr(w, errcode.New(errcode.NotFound, "task %q not found", r.PathValue("id")))
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
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
	dec.DisallowUnknownFields()
	var p api.PullImage
	if err := dec.Decode(&p); err != nil {
		writeErr(w, errcode.New(errcode.ValidationFailed, "bad request body: %s", strings.TrimPrefix(err.Error(), "json: ")))
		return
	}
	if p.URL == "" {
		writeErr(w, errcode.New(errcode.ValidationFailed, "url is required"))
		return
	}
	if p.Pool == "" {
		def, err := a.host.Cache().DefaultPool()
		if err != nil {
			writeErr(w, err)
			return
		}
		p.Pool = def
	}
	if _, err := a.host.Cache().PoolDir(p.Pool); err != nil {
		writeErr(w, err)
		return
	}
	t, err := a.cp.Enqueue(api.TaskImagePull, "", "", p)
	if err != nil {
		writeErr(w, errcode.Wrap(errcode.Internal, err, "queue task"))
		return
	}
	writeJSON(w, http.StatusAccepted, t)
}
