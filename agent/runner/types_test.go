package runner_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/runner"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// The restart policy of the change types: those whose second run would
// fail on (or double) their first effect are failed as interrupted without
// running; those that set absolute values, converge (a disk attach: done
// when the VM has the disk, finished when it is in the VM and not yet in
// its devices) or read run again.
func TestRestartPolicyOfChanges(t *testing.T) {
	h := newHarness(t, runner.Config{}, vm("a", "ua", api.StatusRunning), vm("b", "ub", api.StatusRunning))
	j, err := journal.Open(h.dir, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	tasks := []struct {
		id, typ, name, uuid string
		spec                any
		rerun               bool
	}{
		{"t-attach", api.TaskAttachDisk, "a", "ua", api.Device{DevType: api.DevDisk, Source: "v"}, true},
		{"t-fwd", api.TaskAddForward, "a", "ua", api.Device{DevType: api.DevProxy, SourcePort: 8080, DestPort: 80}, false},
		{"t-update", api.TaskUpdate, "b", "ub", api.UpdateVM{Autostart: new(bool)}, true},
		{"t-medium", api.TaskChangeMedium, "b", "ub", api.MediumSpec{Index: 1, Source: "/isos/a.iso"}, true},
		{"t-shot", api.TaskScreenshot, "b", "ub", nil, true},
		{"t-volume", api.TaskCreateVolume, "", "", api.CreateVolume{Name: "v", SizeGiB: 1}, false},
		{"t-rmimage", api.TaskDeleteImage, "", "", api.ImageRef{Digest: "ab"}, false},
		{"t-pull", api.TaskImagePull, "", "", api.PullImage{URL: "http://x/i.img"}, true},
	}
	for _, tc := range tasks {
		e := journal.Entry{TaskID: tc.id, Type: tc.typ, VMName: tc.name, VMUUID: tc.uuid, Attempt: 1, LeaseID: "old", StartedAt: time.Now()}
		if err := j.Start(e); err != nil {
			t.Fatal(err)
		}
	}
	j.Close()
	for _, tc := range tasks {
		spec, _ := json.Marshal(tc.spec)
		h.cp.Enqueue(protocol.Task{ID: tc.id, Type: tc.typ, VMName: tc.name, VMUUID: tc.uuid, Spec: spec})
	}
	h.start()
	for _, tc := range tasks {
		c := h.waitCompletion(tc.id)
		calls := len(h.ex.callsOf(tc.id))
		if tc.rerun {
			if c.Status != api.TaskSuccess || calls != 1 {
				t.Errorf("%s (%s): %s after %d runs, want success after 1", tc.id, tc.typ, c.Status, calls)
			}
			continue
		}
		if c.Status != api.TaskFailed || c.Error == nil || c.Error.Code != string(errcode.Internal) || calls != 0 {
			t.Errorf("%s (%s): %s %+v after %d runs, want failed as interrupted without running", tc.id, tc.typ, c.Status, c.Error, calls)
		}
	}
}

// Volume and image tasks queue by pool and name (digest, URL): two tasks
// on one volume run in order, a task on another volume runs meanwhile.
func TestStorageQueues(t *testing.T) {
	h := newHarness(t, runner.Config{})
	h.ex.block("v1-create")
	enqueue := func(id, typ string, spec any) {
		b, _ := json.Marshal(spec)
		h.cp.Enqueue(protocol.Task{ID: id, Type: typ, Spec: b})
	}
	enqueue("v1-create", api.TaskCreateVolume, api.CreateVolume{Name: "v1", SizeGiB: 1})
	enqueue("v1-delete", api.TaskDeleteVolume, api.VolumeRef{Name: "v1"})
	enqueue("v2-create", api.TaskCreateVolume, api.CreateVolume{Name: "v2", SizeGiB: 1})
	enqueue("img-delete", api.TaskDeleteImage, api.ImageRef{Digest: "ab"})
	h.start()
	h.ex.waitStarted(t, h.ctx, "v1-create")
	h.waitCompletion("v2-create")
	h.waitCompletion("img-delete")
	if n := len(h.ex.callsOf("v1-delete")); n != 0 {
		t.Fatal("a volume's delete ran while its create was running")
	}
	h.ex.release("v1-create")
	if c := h.waitCompletion("v1-delete"); c.Status != api.TaskSuccess {
		t.Fatalf("v1-delete: %s %+v", c.Status, c.Error)
	}
}
