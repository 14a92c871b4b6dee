package standalone

import (
	"net/http"
	"strconv"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// The API's changes to VMs, volumes and images: each is a task of the
// control plane that the request waits for (at most SyncTimeout), answered
// with the task's result.

// busy answers conflict when vmName has a task queued or running: a
// change answered at once does not wait behind a long create.
func (a *API) busy(w http.ResponseWriter, vmName string) bool {
	if t, busy := a.cp.Busy(vmName); busy {
		writeErr(w, errcode.New(errcode.Conflict, "vm %q has task %s (%s) in progress", vmName, t.ID, t.Type))
		return true
	}
	return false
}

// change runs a task on the VM of the request's path and answers with its
// view after the change.
func (a *API) change(w http.ResponseWriter, r *http.Request, v api.VM, typ string, spec any) {
	if a.busy(w, v.Name) {
		return
	}
	if t, ok := a.run(w, r, typ, v.Name, v.UUID, spec); ok {
		a.answerVM(w, t, v.Name)
	}
}

// patch is PATCH /v1/vms/{name} (seed 003's InstanceUpdateRequest): CPU,
// memory, autostart, a vm.update task. Changes to a running VM's CPU or
// memory apply at its next start (pending_changes in the view).
func (a *API) patch(w http.ResponseWriter, r *http.Request) {
	v, ok := a.target(w, r)
	if !ok {
		return
	}
	var u api.UpdateVM
	_, err := decodeBody(w, r, maxSmallBody, &u, false)
	if err == nil {
		err = a.host.ValidateUpdate(u) // at once, not after a queue
	}
	if err != nil {
		writeErr(w, err)
		return
	}
	a.change(w, r, v, api.TaskUpdate, u)
}

// forward adds (POST, a PROXY device body: vm.forward.add) or removes
// (DELETE, ?source_proto=tcp&source_port=N: vm.forward.remove) a port
// forward of a VM, running or not.
func (a *API) forward(add bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		v, ok := a.target(w, r)
		if !ok {
			return
		}
		if add {
			var d api.Device
			if _, err := decodeBody(w, r, maxSmallBody, &d, false); err != nil {
				writeErr(w, err)
				return
			}
			if d.DevType != "" && d.DevType != api.DevProxy {
				writeErr(w, errcode.New(errcode.ValidationFailed, "dev_type must be PROXY"))
				return
			}
			a.change(w, r, v, api.TaskAddForward, d)
			return
		}
		q := r.URL.Query()
		port, err := strconv.Atoi(q.Get("source_port"))
		if err != nil {
			writeErr(w, errcode.New(errcode.ValidationFailed, "source_port must be a number"))
			return
		}
		a.change(w, r, v, api.TaskRemoveForward, api.Device{SourceProto: q.Get("source_proto"), SourcePort: port})
	}
}

// disk attaches (POST, a DISK device body: vm.disk.attach) or detaches
// (DELETE, ?source=&storage_pool=: vm.disk.detach) a disk: at once on a
// running VM (hot-plug).
func (a *API) disk(attach bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		v, ok := a.target(w, r)
		if !ok {
			return
		}
		if !attach {
			q := r.URL.Query()
			a.change(w, r, v, api.TaskDetachDisk, api.Device{Source: q.Get("source"), StoragePool: q.Get("storage_pool")})
			return
		}
		var d api.Device
		if _, err := decodeBody(w, r, maxSmallBody, &d, false); err != nil {
			writeErr(w, err)
			return
		}
		if d.DevType != "" && d.DevType != api.DevDisk {
			writeErr(w, errcode.New(errcode.ValidationFailed, "dev_type must be DISK"))
			return
		}
		a.change(w, r, v, api.TaskAttachDisk, d)
	}
}

// medium is POST /v1/vms/{name}/cdroms/{index}: a new medium for CD-ROM
// index ({"source": ...}, an allowed ISO or an image URL:
// vm.cdrom.change), or an eject ({"source": ""}: vm.cdrom.eject).
func (a *API) medium(w http.ResponseWriter, r *http.Request) {
	v, ok := a.target(w, r)
	if !ok {
		return
	}
	index, err := strconv.Atoi(r.PathValue("index"))
	if err != nil {
		writeErr(w, errcode.New(errcode.ValidationFailed, "CD-ROM index must be a number"))
		return
	}
	var d api.Device
	if _, err := decodeBody(w, r, maxSmallBody, &d, false); err != nil {
		writeErr(w, err)
		return
	}
	if d.Source == "" {
		a.change(w, r, v, api.TaskEjectMedium, api.MediumSpec{Index: index})
		return
	}
	a.change(w, r, v, api.TaskChangeMedium, api.MediumSpec{Index: index, Source: d.Source, SHA256: d.SHA256, StoragePool: d.StoragePool})
}

// screenshot is GET /v1/vms/{name}/screenshot: a PNG of the VM's display,
// the result of a vm.screenshot task.
func (a *API) screenshot(w http.ResponseWriter, r *http.Request) {
	v, ok := a.target(w, r)
	if !ok {
		return
	}
	t, ok := a.run(w, r, api.TaskScreenshot, v.Name, v.UUID, nil)
	if !ok {
		return
	}
	if t.Output == nil || t.Output.Screenshot == nil {
		writeErr(w, errcode.New(errcode.Internal, "task %s gave no screenshot", t.ID))
		return
	}
	w.Header().Set("Content-Type", "image/png")
	w.Write(t.Output.Screenshot.Data)
}

func (a *API) volumes(w http.ResponseWriter, r *http.Request) {
	vs, err := a.host.Volumes(r.URL.Query().Get("pool"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"volumes": vs})
}

// createVolume is POST /v1/volumes: a volume.create task, answered 201
// with the volume.
func (a *API) createVolume(w http.ResponseWriter, r *http.Request) {
	var c api.CreateVolume
	if _, err := decodeBody(w, r, maxSmallBody, &c, false); err != nil {
		writeErr(w, err)
		return
	}
	t, ok := a.run(w, r, api.TaskCreateVolume, "", "", c)
	if !ok {
		return
	}
	if t.Output == nil || t.Output.Volume == nil {
		writeErr(w, errcode.New(errcode.Internal, "task %s gave no volume", t.ID))
		return
	}
	writeJSON(w, http.StatusCreated, t.Output.Volume)
}

// deleteVolume is DELETE /v1/volumes/{name}?pool=: a volume.delete task.
func (a *API) deleteVolume(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if _, ok := a.run(w, r, api.TaskDeleteVolume, "", "", api.VolumeRef{Name: name, Pool: r.URL.Query().Get("pool")}); ok {
		writeJSON(w, http.StatusOK, map[string]string{"deleted": name})
	}
}

// deleteImage is DELETE /v1/images/{digest}?pool=: an image.delete task
// (evicts an image no VM uses).
func (a *API) deleteImage(w http.ResponseWriter, r *http.Request) {
	digest := r.PathValue("digest")
	if _, ok := a.run(w, r, api.TaskDeleteImage, "", "", api.ImageRef{Digest: digest, Pool: r.URL.Query().Get("pool")}); ok {
		writeJSON(w, http.StatusOK, map[string]string{"deleted": digest})
	}
}
