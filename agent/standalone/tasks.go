package standalone

import (
	"context"
	"errors"
	"net/http"
	"strconv"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// taskList is the body of GET /v1/tasks.
type taskList struct {
	Tasks []api.Task `json:"tasks"`
}

// tasks is GET /v1/tasks?vm=NAME&limit=N: the kept tasks, newest first,
// of one VM when vm is given.
func (a *API) tasks(w http.ResponseWriter, r *http.Request) {
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
	name := q.Get("vm")
	if name != "" && (!api.IsName(name) || api.IsUUID(name)) {
		writeErr(w, errcode.New(errcode.ValidationFailed, "vm %q is not a VM name", name))
		return
	}
	all, err := a.cp.Tasks(r.Context())
	if err != nil {
		writeErr(w, storeErr(err))
		return
	}
	out := []api.Task{}
	for _, t := range all {
		if len(out) == limit {
			break
		}
		if name == "" || t.VMName == name {
			out = append(out, t)
		}
	}
	writeJSON(w, http.StatusOK, taskList{Tasks: out})
}

// cancel is POST /v1/tasks/{id}/cancel. A pending task ends cancelled at
// once; a create or pull still downloading is stopped by the agent, which
// undoes what it did, and the answer waits for it (at most SyncTimeout).
// Either way the answer is 200 with the cancelled task. A task past its
// point of no return (running, or ended; or a download that finished
// first) is 409 conflict.
func (a *API) cancel(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	t, err := a.cp.Cancel(r.Context(), id)
	switch {
	case errors.Is(err, cpserver.ErrNotFound):
		writeErr(w, errcode.New(errcode.NotFound, "task %q not found", id))
		return
	case errors.Is(err, cpserver.ErrNotCancellable):
		writeErr(w, errcode.New(errcode.Conflict, "cannot cancel: %s", err))
		return
	case err != nil:
		writeErr(w, errcode.Wrap(errcode.Internal, err, "cancel task %s", id))
		return
	}
	ctx, stop := context.WithTimeout(r.Context(), a.SyncTimeout)
	defer stop()
	if t, err = a.cp.Wait(ctx, id); err != nil {
		writeErr(w, errcode.Wrap(errcode.Internal, err, "task %s did not end", id))
		return
	}
	if t.Status != api.TaskCancelled {
		writeErr(w, errcode.New(errcode.Conflict, "cannot cancel: task %s ended %s first", id, t.Status))
		return
	}
	writeJSON(w, http.StatusOK, t)
}
