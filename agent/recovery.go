package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/vm"
)

// An agent killed at any point leaves nothing behind: at start, before any
// task runs, the runner hands each task its journal shows started and not
// finished to RollBack, and NewHost sweeps what no VM owns (sweep).

// RollBack undoes what a task the agent was killed in the middle of left
// half-done, so that running it again on its redelivery has the effect of
// one run (runner.RollBacker). Only vm.create leaves a half-made thing:
// a VM whose create did not reach its commit point (the created event of
// that task) is deleted with everything it holds, and the create runs
// again from the start. Every other task converges (runner.converged).
func (h *Host) RollBack(ctx context.Context, t protocol.Task) error {
	if t.Type != api.TaskCreate {
		return nil
	}
	v, err := h.engine.GetByUUID(t.VMUUID)
	if err != nil {
		h.sweep() // never defined: its folder and pins, if any
		return nil
	}
	if h.createdBy(v.Spec.UUID, t.ID) {
		return nil // complete: its redelivery finds it done
	}
	h.log.Info("rolling back a create cut by an agent restart", zap.String("vm", v.Spec.Name), zap.String("vm_uuid", v.Spec.UUID), zap.String("task", t.ID))
	if err := h.Delete(ctx, v.Spec.Name); err != nil {
		return err
	}
	h.sweep()
	return nil
}

// CreatedBy reports whether the VM with uuid was created by task taskID
// (its create reached its commit point).
func (h *Host) createdBy(uuid, taskID string) bool {
	for _, e := range h.events.List(uuid) {
		if e.Type == api.EventCreated && e.TaskID == taskID {
			return true
		}
	}
	return false
}

// Created returns the view of a VM that task taskID created, when it did.
func (h *Host) Created(uuid, taskID string) (api.VM, bool) {
	v, err := h.engine.GetByUUID(uuid)
	if err != nil || !h.createdBy(uuid, taskID) {
		return api.VM{}, false
	}
	return h.toAPI(v), true
}

// sweep removes what no VM owns any more: a pool's vms/<uuid> folder and
// the image pins of a VM the engine does not know (a create or a delete
// cut by an agent kill), so such an image can be evicted again. It runs
// when no create is in progress.
func (h *Host) sweep() {
	known := map[string]bool{}
	for _, v := range h.engine.List() {
		known[v.Spec.UUID] = true
	}
	for _, p := range h.engine.Reserved() {
		known[p.UUID] = true
	}
	for _, s := range h.cache.Stats() {
		dir, err := h.cache.PoolDir(s.Name)
		if err != nil {
			continue
		}
		ents, _ := os.ReadDir(filepath.Join(dir, "vms"))
		for _, e := range ents {
			if e.IsDir() && vm.IsUUID(e.Name()) && !known[e.Name()] {
				if err := os.RemoveAll(filepath.Join(dir, "vms", e.Name())); err != nil {
					h.log.Warn("remove a vm folder no vm owns", zap.String("pool", s.Name), zap.String("vm_uuid", e.Name()), zap.Error(err))
					continue
				}
				h.log.Info("removed a vm folder no vm owns", zap.String("pool", s.Name), zap.String("vm_uuid", e.Name()))
			}
		}
		imgs, err := h.cache.List(s.Name)
		if err != nil {
			continue
		}
		for _, img := range imgs {
			for _, owner := range img.PinnedBy {
				id, _, _ := strings.Cut(owner, ":")
				if known[id] {
					continue
				}
				if err := h.cache.Unpin(s.Name, img.Digest, owner); err != nil {
					h.log.Warn("unpin an image for a vm that is gone", zap.String("pool", s.Name), zap.String("image_sha256", img.Digest), zap.Error(err))
					continue
				}
				h.log.Info("unpinned an image for a vm that is gone", zap.String("pool", s.Name), zap.String("image_sha256", img.Digest), zap.String("owner", owner))
			}
		}
	}
}
