package standalone

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// TestPassthroughOnThisKernel: POST /v1/vms with PCI devices, checked
// against this machine's real /sys (no fake tree): a function that exists
// is refused with iommu_unavailable where the kernel has no IOMMU groups
// (this machine), device_busy where it has them (the function is bound to
// a host driver); one that does not exist is device_not_found; a bad field
// is validation_failed naming it. Nothing is queued.
func TestPassthroughOnThisKernel(t *testing.T) {
	t.Parallel()
	h := newTestHost(t)
	a, cp := newTestAPI(t, h, t.TempDir())
	ents, err := os.ReadDir("/sys/bus/pci/devices")
	if err != nil || len(ents) == 0 {
		t.Fatalf("this kernel lists no PCI device: %v", err)
	}
	groups, _ := os.ReadDir("/sys/kernel/iommu_groups")
	existing := errcode.IOMMUUnavailable
	if len(groups) > 0 {
		existing = errcode.DeviceBusy
	}
	post := func(d api.Device) (int, api.Error) {
		b, _ := json.Marshal(api.CreateVM{Name: "pt", ImageURL: "http://127.0.0.1:1/x.qcow2", Arch: "amd64", Devices: []api.Device{d}})
		req := httptest.NewRequest("POST", "/v1/vms", bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		a.Handler().ServeHTTP(rec, req)
		var env api.ErrorEnvelope
		json.Unmarshal(rec.Body.Bytes(), &env)
		return rec.Code, env.Error
	}
	real := ents[len(ents)-1].Name()
	for _, tc := range []struct {
		dev  api.Device
		code errcode.Code
		says string
	}{
		{api.Device{DevType: api.DevPCI, Address: real}, existing, real},
		{api.Device{DevType: api.DevPCI, Address: "0000:fe:1f.7"}, errcode.DeviceNotFound, "0000:fe:1f.7"},
		{api.Device{DevType: api.DevPCI, Address: "0000:00:00.0,x-foo=1"}, errcode.ValidationFailed, `devices[0]: pci address "0000:00:00.0,x-foo=1" is invalid`},
		{api.Device{DevType: api.DevPCI, Address: real, Mdev: "nvidia-63"}, errcode.ValidationFailed, "devices[0].mdev is not a field of a PCI device"},
	} {
		status, e := post(tc.dev)
		if e.Code != string(tc.code) || status != StatusOf(tc.code) || !strings.Contains(e.Message, tc.says) {
			t.Errorf("%+v: %d %+v, want %s (%d) saying %q", tc.dev, status, e, tc.code, StatusOf(tc.code), tc.says)
		}
		t.Logf("%s %s: %d %s: %s", tc.dev.DevType, tc.dev.Address+tc.dev.PCI, status, e.Code, e.Message)
	}
	if task, busy := cp.Busy("pt"); busy {
		t.Errorf("a task was queued: %+v", task)
	}
}
