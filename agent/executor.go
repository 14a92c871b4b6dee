package agent

import (
	"context"
	"encoding/json"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/errcode"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/vm"
)

// Execute runs one control-plane task against this host (runner.Executor).
func (h *Host) Execute(ctx context.Context, t protocol.Task, progress func(api.Progress)) (*api.VM, error) {
	ref := &api.TaskRef{ID: t.ID, Type: t.Type, Status: api.TaskRunning}
	if t.Type == api.TaskCreate {
		var c api.CreateVM
		if err := json.Unmarshal(t.Spec, &c); err != nil {
			return nil, errcode.New(errcode.ValidationFailed, "bad vm.create spec: %v", err)
		}
		if c.Name == "" {
			c.Name = t.VMName
		}
		v, err := h.Create(ctx, t.VMUUID, c, ref, progress)
		if err != nil {
			return nil, err
		}
		return &v, nil
	}
	if t.Type == api.TaskImagePull {
		var p api.PullImage
		if err := json.Unmarshal(t.Spec, &p); err != nil {
			return nil, errcode.New(errcode.ValidationFailed, "bad image.pull spec: %v", err)
		}
		_, err := h.PullImage(ctx, p, progress)
		return nil, err
	}
	name := t.VMName
	if name == "" && t.VMUUID != "" {
		if v, err := h.engine.GetByUUID(t.VMUUID); err == nil {
			name = v.Spec.Name
		}
	}
	if _, err := h.engine.Get(name); err != nil {
		return nil, err
	}
	var desired string
	var v vm.View
	var err error
	switch t.Type {
	case api.TaskStart:
		desired = api.PhaseRunning
		v, err = h.engine.Start(ctx, name)
	case api.TaskStop:
		var s api.StopSpec
		if len(t.Spec) > 0 {
			if err := json.Unmarshal(t.Spec, &s); err != nil {
				return nil, errcode.New(errcode.ValidationFailed, "bad vm.stop spec: %v", err)
			}
		}
		desired = api.PhaseStopped
		if s.Force {
			v, err = h.engine.Poweroff(ctx, name)
		} else {
			v, err = h.engine.Stop(ctx, name)
		}
	case api.TaskPoweroff:
		desired = api.PhaseStopped
		v, err = h.engine.Poweroff(ctx, name)
	case api.TaskReboot:
		v, err = h.engine.Reboot(ctx, name)
	case api.TaskReset:
		v, err = h.engine.Reset(ctx, name)
	case api.TaskPause:
		v, err = h.engine.Pause(ctx, name)
	case api.TaskResume:
		v, err = h.engine.Resume(ctx, name)
	case api.TaskDelete:
		return nil, h.Delete(ctx, name)
	default:
		return nil, errcode.New(errcode.ValidationFailed, "unknown task type %q", t.Type)
	}
	h.updateRecord(name, func(m *vm.Record) {
		if desired != "" && err == nil {
			m.DesiredPhase = desired
		}
		st := api.TaskSuccess
		if err != nil {
			st = api.TaskFailed
		}
		m.LastTask = &api.TaskRef{ID: t.ID, Type: t.Type, Status: st}
	})
	if err != nil {
		return nil, err
	}
	if nv, gerr := h.engine.Get(name); gerr == nil {
		v = nv
	}
	out := h.toAPI(v)
	return &out, nil
}
