package standalone

import (
	"context"
	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/secrets"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent"
	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// targetVM is the stopped VM every test host has: ops on it queue tasks
// (nothing runs them: no runner) or fail fast in the engine.
const (
	targetVM     = "vm-1"
	targetVMUUID = "6f1c2a4e-0d1b-4c55-9a43-6a0e4f7b2c11"
)

// newTestHost returns a real Host on temp dirs with one stopped VM
// (targetVM) defined and never started. It needs QEMU's binaries installed
// (ValidateCreate checks the arch), not a running QEMU.
func newTestHost(tb testing.TB) *agent.Host {
	tb.Helper()
	return newNamedTestHost(tb, "node-1")
}

// newNamedTestHost is newTestHost for node name.
func newNamedTestHost(tb testing.TB, name string) *agent.Host {
	tb.Helper()
	run, err := os.MkdirTemp("/tmp", "oxs")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(run) })
	data := tb.TempDir()
	cfg := config.Default(data)
	cfg.NodeName = name
	cfg.RunDir = run
	cfg.QEMU.User = "nobody"
	cfg.Limits.MinFreeBytes = 1 << 20
	h, err := agent.NewHost(context.Background(), cfg, agent.Options{Logger: zap.NewNop()})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(h.Close)
	_, err = h.Engine().Define(context.Background(), vm.Spec{Name: targetVM, UUID: targetVMUUID, Arch: vm.ArchAMD64, VCPUs: 1, MemoryMB: 128,
		Disks: []vm.Disk{{Path: filepath.Join(data, "vm-1.raw"), Format: "raw"}}}, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return h
}

// newTestAPI returns an API over h with a fresh control plane whose state
// file is in dir.
func newTestAPI(tb testing.TB, h *agent.Host, dir string) (*API, *ControlPlane) {
	tb.Helper()
	cp, err := NewControlPlane(filepath.Join(dir, "standalone.json"), testToken, zap.NewNop())
	if err != nil {
		tb.Fatal(err)
	}
	return NewAPI(h, cp, zap.NewNop()), cp
}

const testToken = "0123456789abcdef0123456789abcdef"

// knownCode reports whether c is one of agent/errcode's codes.
func knownCode(c string) bool {
	switch errcode.Code(c) {
	case errcode.ValidationFailed, errcode.Conflict, errcode.NotFound, errcode.StopTimeout,
		errcode.QEMUStartFailed, errcode.Internal, errcode.PoolNotFound, errcode.DefaultPoolNotSet, errcode.PoolNotOnNode,
		errcode.ImageDownloadFailed, errcode.ImageChecksumMismatch, errcode.ImageFormatUnsupported, errcode.DiskFull,
		errcode.NetworkNotFound, errcode.NetworkUnavailable, errcode.PortInUse, errcode.DeviceNotFound, errcode.DeviceBusy,
		errcode.IOMMUUnavailable, errcode.Cancelled, errcode.Unauthorized, errcode.RateLimited:
		return true
	}
	return false
}

// TestSpecsSealedAtRest: a pending create's spec (user-data, VNC
// password) is sealed in standalone.json and opens again after a restart.
func TestSpecsSealedAtRest(t *testing.T) {
	dir := t.TempDir()
	box, err := secrets.Open(filepath.Join(dir, "secret.key"))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "standalone.json")
	cp, err := NewControlPlane(path, testToken, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	if err := cp.SealSpecs(box); err != nil {
		t.Fatal(err)
	}
	task, err := cp.Enqueue(api.TaskCreate, "v", "0f8fad5b-d9cb-469f-a165-70867728950e", api.CreateVM{Name: "v", UserData: "#cloud-config\n# marker-Q9x7\n", VNCPassword: "pw-Z3k1"})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if strings.Contains(string(b), "marker-Q9x7") || strings.Contains(string(b), "pw-Z3k1") || !strings.Contains(string(b), "spec_sealed") {
		t.Fatalf("state file holds the spec in clear:\n%s", b)
	}
	cp2, err := NewControlPlane(path, testToken, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	if err := cp2.SealSpecs(box); err != nil {
		t.Fatal(err)
	}
	if full, _ := cp2.Server().Task(context.Background(), task.ID); !strings.Contains(string(full.Spec), "marker-Q9x7") {
		t.Fatalf("spec did not open after a restart: %s", full.Spec)
	}
}
