package agent

import (
	"context"
	"encoding/json"
	"github.com/otherix/otherix-agent/agent/crashpoint"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// knownTypes are the task types Execute runs.
var knownTypes = map[string]bool{
	api.TaskCreate: true, api.TaskStart: true, api.TaskStop: true, api.TaskPoweroff: true, api.TaskReboot: true,
	api.TaskReset: true, api.TaskPause: true, api.TaskResume: true, api.TaskDelete: true, api.TaskImagePull: true,
	api.TaskUpdate: true, api.TaskAttachDisk: true, api.TaskDetachDisk: true, api.TaskChangeMedium: true,
	api.TaskEjectMedium: true, api.TaskAddForward: true, api.TaskRemoveForward: true, api.TaskScreenshot: true,
	api.TaskConsoleTail: true, api.TaskCreateVolume: true, api.TaskDeleteVolume: true, api.TaskDeleteImage: true,
}

// Execute runs one control-plane task against this host (runner.Executor).
// Every change to a VM, a volume or the image cache arrives here, from a
// control plane or the standalone API alike; docs/protocol.md lists the
// types, their specs and results.
func (h *Host) Execute(ctx context.Context, t protocol.Task, progress func(api.Progress)) (protocol.Result, error) {
	// A type this agent does not know fails validation_failed whatever
	// its VM: a newer control plane tells "agent too old" from "VM
	// missing" (not_found).
	if !knownTypes[t.Type] {
		return protocol.Result{}, errcode.New(errcode.ValidationFailed, "unknown task type %q", t.Type)
	}
	switch t.Type {
	case api.TaskCreate:
		var c api.CreateVM
		if err := specOf(t, &c); err != nil {
			return protocol.Result{}, err
		}
		if c.Name == "" {
			c.Name = t.VMName
		}
		ref := &api.TaskRef{ID: t.ID, Type: t.Type, Status: api.TaskRunning}
		v, err := h.Create(ctx, t.VMUUID, c, ref, progress)
		if err != nil {
			return protocol.Result{}, err
		}
		return protocol.Result{VM: &v}, nil
	case api.TaskImagePull, api.TaskDeleteImage, api.TaskCreateVolume, api.TaskDeleteVolume:
		out, err := h.executeStorage(ctx, t, progress)
		return protocol.Result{Output: out}, err
	}
	name := t.VMName
	if name == "" && t.VMUUID != "" {
		if v, err := h.engine.GetByUUID(t.VMUUID); err == nil {
			name = v.Spec.Name
		}
	}
	if _, err := h.engine.Get(name); err != nil {
		return protocol.Result{}, err
	}
	switch t.Type {
	case api.TaskScreenshot, api.TaskConsoleTail:
		out, err := h.executeRead(ctx, t, name)
		return protocol.Result{Output: out}, err
	case api.TaskDelete:
		return protocol.Result{}, h.Delete(ctx, name)
	}
	desired, err := h.executeVM(ctx, t, name)
	crashpoint.Hit(t.Type + ".done") // done, not yet recorded as done
	// The last task alone is not worth a disk write (a pause, a reset):
	// a crash may lose it. A desired phase is written.
	update := h.engine.UpdateRecordVolatile
	if desired != "" {
		update = h.engine.UpdateRecord
	}
	h.updateRecordWith(update, name, func(m *vm.Record) {
		if desired != "" && err == nil {
			m.DesiredPhase = desired
		}
		st := api.TaskSuccess
		if err != nil {
			st = api.TaskFailed
		}
		m.LastTask = &api.TaskRef{ID: t.ID, Type: t.Type, Status: st}
	})
	if typ, ok := taskEvent(t.Type, err); ok {
		msg := ""
		if err != nil {
			msg = errcode.MessageOf(err)
		}
		h.eventSoonByName(name, typ, msg, t.ID)
	}
	if err != nil {
		return protocol.Result{}, err
	}
	out, err := h.VM(name)
	if err != nil {
		return protocol.Result{}, err
	}
	return protocol.Result{VM: &out}, nil
}

// specOf decodes a task's spec into v. Fields v does not know are ignored
// (protocol v1 only grows); an absent spec leaves v as it is.
func specOf(t protocol.Task, v any) error {
	if len(t.Spec) == 0 || string(t.Spec) == "null" {
		return nil
	}
	if err := json.Unmarshal(t.Spec, v); err != nil {
		return errcode.New(errcode.ValidationFailed, "bad %s spec: %v", t.Type, err)
	}
	return nil
}

// executeVM runs a task that changes a VM and returns the desired phase
// it sets, if any.
func (h *Host) executeVM(ctx context.Context, t protocol.Task, name string) (desired string, err error) {
	run := func(_ vm.View, err error) error { return err }
	apply := func(_ api.VM, err error) error { return err }
	switch t.Type {
	case api.TaskStart:
		before, _ := h.engine.Get(name)
		if _, err := h.engine.Start(ctx, name); err != nil {
			return api.PhaseRunning, err
		}
		var s api.StartSpec
		_ = specOf(t, &s) // a bad spec only loses the restart's count
		h.started(name, before, s, t.ID)
		return api.PhaseRunning, nil
	case api.TaskStop:
		var s api.StopSpec
		if err := specOf(t, &s); err != nil {
			return "", err
		}
		if s.Force {
			return api.PhaseStopped, run(h.engine.Poweroff(ctx, name))
		}
		return api.PhaseStopped, run(h.engine.Stop(ctx, name))
	case api.TaskPoweroff:
		return api.PhaseStopped, run(h.engine.Poweroff(ctx, name))
	case api.TaskReboot:
		return "", run(h.engine.Reboot(ctx, name))
	case api.TaskReset:
		return "", run(h.engine.Reset(ctx, name))
	case api.TaskPause:
		return "", run(h.engine.Pause(ctx, name))
	case api.TaskResume:
		return "", run(h.engine.Resume(ctx, name))
	case api.TaskUpdate:
		var u api.UpdateVM
		if err := specOf(t, &u); err != nil {
			return "", err
		}
		return "", apply(h.Update(ctx, name, u))
	case api.TaskAttachDisk, api.TaskDetachDisk, api.TaskAddForward, api.TaskRemoveForward:
		var d api.Device
		if err := specOf(t, &d); err != nil {
			return "", err
		}
		switch t.Type {
		case api.TaskAttachDisk:
			if d.DevType != "" && d.DevType != api.DevDisk {
				return "", errcode.New(errcode.ValidationFailed, "dev_type must be DISK")
			}
			return "", apply(h.AttachDisk(ctx, name, d))
		case api.TaskDetachDisk:
			return "", apply(h.DetachDisk(ctx, name, api.Device{Source: d.Source, StoragePool: d.StoragePool}))
		case api.TaskAddForward:
			if d.DevType != "" && d.DevType != api.DevProxy {
				return "", errcode.New(errcode.ValidationFailed, "dev_type must be PROXY")
			}
			return "", apply(h.AddForward(ctx, name, d))
		default:
			// A forward is named by its host side; the guest port only
			// has to pass the rule's checks.
			return "", apply(h.RemoveForward(ctx, name, api.Device{SourceProto: d.SourceProto, SourcePort: d.SourcePort, DestPort: 1}))
		}
	case api.TaskChangeMedium, api.TaskEjectMedium:
		var m api.MediumSpec
		if err := specOf(t, &m); err != nil {
			return "", err
		}
		d := api.Device{DevType: api.DevCDROM, Source: m.Source, SHA256: m.SHA256, StoragePool: m.StoragePool}
		if t.Type == api.TaskEjectMedium {
			d = api.Device{DevType: api.DevCDROM}
		} else if m.Source == "" {
			return "", errcode.New(errcode.ValidationFailed, "%s needs a source (%s ejects)", api.TaskChangeMedium, api.TaskEjectMedium)
		}
		return "", apply(h.ChangeMedium(ctx, name, m.Index, d))
	}
	return "", errcode.New(errcode.ValidationFailed, "unknown task type %q", t.Type)
}

// executeRead runs a read-only task on a VM: its result is the output.
func (h *Host) executeRead(ctx context.Context, t protocol.Task, name string) (*api.TaskOutput, error) {
	if t.Type == api.TaskConsoleTail {
		var s api.ConsoleTailSpec
		if err := specOf(t, &s); err != nil {
			return nil, err
		}
		c, err := h.ConsoleTail(name, s.Bytes)
		if err != nil {
			return nil, err
		}
		return &api.TaskOutput{Console: &c}, nil
	}
	png, err := h.Screenshot(ctx, name)
	if err != nil {
		return nil, err
	}
	if len(png) > api.MaxScreenshot {
		return nil, errcode.New(errcode.Internal, "the screenshot is %d bytes, over the %d a task result carries", len(png), api.MaxScreenshot)
	}
	return &api.TaskOutput{Screenshot: &api.Screenshot{Format: "png", Data: png}}, nil
}

// executeStorage runs a task on a pool's volumes or image cache.
func (h *Host) executeStorage(ctx context.Context, t protocol.Task, progress func(api.Progress)) (*api.TaskOutput, error) {
	switch t.Type {
	case api.TaskImagePull:
		var p api.PullImage
		if err := specOf(t, &p); err != nil {
			return nil, err
		}
		e, err := h.PullImage(ctx, p, progress)
		if err != nil {
			return nil, err
		}
		img := imageOf(e)
		return &api.TaskOutput{Image: &img}, nil
	case api.TaskDeleteImage:
		var r api.ImageRef
		if err := specOf(t, &r); err != nil {
			return nil, err
		}
		return nil, h.DeleteImage(ctx, r.Pool, r.Digest)
	case api.TaskCreateVolume:
		var c api.CreateVolume
		if err := specOf(t, &c); err != nil {
			return nil, err
		}
		v, err := h.CreateVolume(ctx, c.Pool, c.Name, c.SizeGiB)
		if err != nil {
			return nil, err
		}
		return &api.TaskOutput{Volume: &v}, nil
	default: // api.TaskDeleteVolume
		var r api.VolumeRef
		if err := specOf(t, &r); err != nil {
			return nil, err
		}
		return nil, h.DeleteVolume(r.Pool, r.Name)
	}
}
