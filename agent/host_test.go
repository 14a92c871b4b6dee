package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/agent/tpm"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/agent/vnc/rfbtest"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/internal/leakcheck"
)

type hostHarness struct {
	t     *testing.T
	h     *Host
	cfg   *config.Config
	image string // URL of the test guest image
}

func newHost(t *testing.T) *hostHarness {
	t.Helper()
	return newHostWith(t, Options{})
}

// newHostWith is newHost with opts for the Host (a Placer, OnChange...);
// the logger is the test's, and PowerdownInterval 1 s unless opts sets it.
func newHostWith(t *testing.T, opts Options, edits ...func(*config.Config)) *hostHarness {
	t.Helper()
	run, err := os.MkdirTemp("/tmp", "oxh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	// Not t.TempDir: after the cleanup below kills QEMU, the engine
	// records the exit (vm.json, the event history) while the directory
	// is being removed.
	data, err := os.MkdirTemp("", "oxd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeAllSettled(t, data) })
	cfg := config.Default(data)
	cfg.NodeName = "node-1"
	cfg.RunDir = run
	cfg.QEMU.User = "nobody"
	cfg.Listen.Forwards = "127.0.0.1"
	cfg.Limits.MinFreeBytes = 1 << 20
	for _, edit := range edits {
		edit(cfg)
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(testguest.Dir(t))))
	t.Cleanup(srv.Close)
	opts.Logger = zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	if opts.PowerdownInterval == 0 {
		opts.PowerdownInterval = time.Second
	}
	h, err := NewHost(context.Background(), cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		var pids []int
		for _, v := range h.Engine().List() {
			if v.PID > 0 {
				pids = append(pids, v.PID)
			}
		}
		if err := leakcheck.Kill(pids...); err != nil {
			t.Error(err)
		}
		h.Close()
	})
	return &hostHarness{t: t, h: h, cfg: cfg, image: srv.URL + "/guest.qcow2"}
}

// removeAllSettled removes dir, again while writes that were in flight
// when it started (an exit being recorded) recreate entries, for up to 5 s.
func removeAllSettled(t *testing.T, dir string) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.RemoveAll(dir)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("remove %s: %v", dir, err)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (hh *hostHarness) console(name string) *testguest.Console {
	v, err := hh.h.Engine().Get(name)
	if err != nil {
		hh.t.Fatal(err)
	}
	return testguest.OpenConsole(v.ConsolePath)
}

func wait(t *testing.T, c *testguest.Console, substr string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	line, err := c.WaitFor(ctx, substr)
	if err != nil {
		t.Fatalf("waiting for %q: %v\n%s", substr, err, c.Text())
	}
	return line
}

func sum(b string) string {
	s := sha256.Sum256([]byte(b))
	return hex.EncodeToString(s[:])
}

// TestSeedReadByGuest: the real guest reads the seed the agent built: the
// exact file names, instance-id (the VM's uuid), hostname and the sha256
// of user-data and network-config. A VM created with no_cloud_init has no
// CD-ROM at all; delete removes every file and unpins the image.
func TestSeedReadByGuest(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	ctx := context.Background()
	ud := "#cloud-config\nusers: []\n"
	nc := "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"
	id := uuid.NewString()
	v, err := hh.h.Create(ctx, id, api.CreateVM{Name: "seeded", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		UserData: ud, NetworkConfig: nc}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if v.UUID != id || !v.CloudInit || v.Status != api.StatusRunning {
		t.Fatalf("view: %+v", v)
	}
	c := hh.console("seeded")
	wait(t, c, "OTHERIX-GUEST cidata label=cidata")
	if line := wait(t, c, "OTHERIX-GUEST cidata files="); strings.TrimSpace(line) != "OTHERIX-GUEST cidata files=meta-data,network-config,user-data" {
		t.Fatalf("the guest sees the seed files as %q", line)
	}
	wait(t, c, "OTHERIX-GUEST cidata instance-id="+id)
	wait(t, c, "OTHERIX-GUEST cidata local-hostname=seeded")
	wait(t, c, "OTHERIX-GUEST cidata user-data-sha256="+sum(ud))
	wait(t, c, "OTHERIX-GUEST cidata network-config-sha256="+sum(nc))

	// The seed ISO is private.
	ev, _ := hh.h.Engine().Get("seeded")
	fi, err := os.Stat(ev.Spec.CDROMs[0].Path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("seed iso: %v %v", fi, err)
	}

	v2, err := hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "bare", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, NoCloudInit: true}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if v2.CloudInit {
		t.Fatalf("no_cloud_init VM says cloud_init: %+v", v2)
	}
	c2 := hh.console("bare")
	line := wait(t, c2, "OTHERIX-GUEST disks ")
	if strings.Contains(line, "sr0") {
		t.Fatalf("no_cloud_init VM has a CD-ROM: %s", line)
	}
	wait(t, c2, "OTHERIX-GUEST cidata none")

	// Both VMs share one cached image, pinned by both.
	entries, err := hh.h.Cache().List("default")
	if err != nil || len(entries) != 1 || len(entries[0].PinnedBy) != 2 {
		t.Fatalf("cache: %+v %v", entries, err)
	}
	for _, name := range []string{"seeded", "bare"} {
		ev, _ := hh.h.Engine().Get(name)
		if err := hh.h.Delete(ctx, name); err != nil {
			t.Fatal(err)
		}
		for _, p := range ev.Spec.OwnedPaths {
			if _, err := os.Stat(p); !os.IsNotExist(err) {
				t.Errorf("%s left after delete", p)
			}
		}
	}
	entries, _ = hh.h.Cache().List("default")
	if len(entries) != 1 || len(entries[0].PinnedBy) != 0 {
		t.Fatalf("cache after delete: %+v", entries)
	}
	if m, _ := filepath.Glob(filepath.Join(hh.cfg.DataDir, "vms", "*")); len(m) != 0 {
		t.Fatalf("vm state left: %v", m)
	}
}

// TestCreateUndo: a create that fails after the image is cached leaves no
// VM, no disk, no seed and no pin behind.
func TestCreateUndo(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	ctx := context.Background()
	// The engine refuses the second VM with the same name only after the
	// image, overlay and seed were made: everything must be undone.
	_, err := hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "dup", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, NoCloudInit: true}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "dup", ImageURL: hh.image, Arch: "amd64"}, nil, nil)
	if errcode.Of(err) != errcode.Conflict {
		t.Fatalf("second create: %v", err)
	}
	// A QEMU that cannot start: memory the host cannot give.
	hh.cfg.QEMU.X86_64 = "/bin/false"
	_, err = hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "nope", ImageURL: hh.image + ".missing", Arch: "amd64"}, nil, nil)
	if errcode.Of(err) != errcode.ImageDownloadFailed {
		t.Fatalf("missing image: %v", err)
	}
	disks, _ := filepath.Glob(filepath.Join(hh.cfg.Pools["default"].Path, "vms", "*"))
	if len(disks) != 1 {
		t.Fatalf("vm dirs in the pool: %v", disks)
	}
	if _, err := hh.h.Engine().Get("nope"); errcode.Of(err) != errcode.NotFound {
		t.Fatalf("failed create left a vm: %v", err)
	}
}

// TestAutostartAfterHostBoot: after a host boot (a new boot id) the agent
// starts the VMs with autostart on that should run, and leaves the one
// with autostart off; a plain agent restart starts nothing. PATCH of a
// running VM's CPU and memory is pending until its next start.
func TestAutostartAfterHostBoot(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	ctx := context.Background()
	off := false
	for _, c := range []api.CreateVM{
		{Name: "auto", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, NoCloudInit: true, RootDiskIOBus: "NVME"},
		{Name: "manual", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, NoCloudInit: true, Autostart: &off, RootDiskIOBus: "VIRTIO-SCSI"},
	} {
		if _, err := hh.h.Create(ctx, uuid.NewString(), c, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	// Each root bus is seen by the guest on that bus.
	if line := wait(t, hh.console("auto"), "OTHERIX-GUEST disks "); !strings.Contains(line, "nvme0n1:") {
		t.Fatalf("NVME root disk not seen as nvme: %s", line)
	}
	if line := wait(t, hh.console("manual"), "OTHERIX-GUEST disks "); !strings.Contains(line, "sda:") {
		t.Fatalf("VIRTIO-SCSI root disk not seen as sda: %s", line)
	}
	// PATCH a running VM: pending until the next start.
	two, mem := 2, 384
	v, err := hh.h.Update(ctx, "auto", api.UpdateVM{VCPUs: &two, MemoryMB: &mem})
	if err != nil || v.PendingChanges == nil || v.PendingChanges.VCPUs != 2 || v.PendingChanges.MemoryMB != 384 || v.VCPUs != 1 {
		t.Fatalf("patch running: %v %+v", err, v)
	}
	if _, err := hh.h.Update(ctx, "auto", api.UpdateVM{VCPUs: &[]int{129}[0]}); errcode.Of(err) != errcode.ValidationFailed {
		t.Fatalf("vcpus 129: %v", err)
	}
	// The "host" goes down: the agent first (its VMs keep running), then
	// every QEMU with the host.
	var pids []int
	for _, v := range hh.h.Engine().List() {
		pids = append(pids, v.PID)
	}
	hh.h.Close()
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	waitGone(t, pids)

	// The host boots: a new boot id. auto starts; manual is stopped (not
	// crashed, not an error) with its desired phase stopped.
	bootID := filepath.Join(t.TempDir(), "boot_id")
	os.WriteFile(bootID, []byte(uuid.NewString()+"\n"), 0o644)
	h3, err := NewHost(ctx, hh.cfg, Options{Logger: zap.NewNop(), BootIDPath: bootID})
	if err != nil {
		t.Fatal(err)
	}
	hh.h = h3
	t.Cleanup(func() {
		for _, v := range hh.h.Engine().List() {
			if v.PID > 0 {
				syscall.Kill(v.PID, syscall.SIGKILL)
			}
		}
		hh.h.Close()
	})
	auto, _ := h3.VM("auto")
	manual, _ := h3.VM("manual")
	if auto.Status != api.StatusRunning || manual.Status != api.StatusStopped || manual.StatusReason != vm.ReasonHostRebooted || manual.DesiredPhase != api.PhaseStopped {
		t.Fatalf("after host boot: auto %s; manual %s (%s), desired %s", auto.Status, manual.Status, manual.StatusReason, manual.DesiredPhase)
	}
	// The pending changes applied at that start.
	if auto.VCPUs != 2 || auto.MemoryMB != 384 || auto.PendingChanges != nil || auto.InstanceStatus != "RUNNING" || manual.InstanceStatus != "STOPPED" {
		t.Fatalf("after start: %+v", auto)
	}
	for name, want := range map[string][]string{"auto": {api.EventHostRebooted, api.EventAutostarted}, "manual": {api.EventHostRebooted}} {
		evs, _ := h3.Events(name)
		var got []string
		for _, e := range evs {
			if e.Type == api.EventHostRebooted || e.Type == api.EventAutostarted {
				got = append(got, e.Type)
			}
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: boot events %v, want %v", name, got, want)
		}
	}

	// A plain agent restart (the same boot id) while auto's QEMU died:
	// nothing is started, auto is crashed (the restart policy's business,
	// through the runner), manual stays stopped.
	pid := auto.QEMUPID
	h3.Close()
	syscall.Kill(pid, syscall.SIGKILL)
	waitGone(t, []int{pid})
	h4, err := NewHost(ctx, hh.cfg, Options{Logger: zap.NewNop(), BootIDPath: bootID})
	if err != nil {
		t.Fatal(err)
	}
	hh.h = h4
	auto, _ = h4.VM("auto")
	manual, _ = h4.VM("manual")
	if auto.Status != api.StatusCrashed || manual.Status != api.StatusStopped {
		t.Fatalf("after a plain agent restart: auto %s, manual %s", auto.Status, manual.Status)
	}
}

// waitGone waits until no process of pids exists (reaped by its parent).
func waitGone(t *testing.T, pids []int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range pids {
		for syscall.Kill(pid, 0) == nil {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
				if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); strings.Contains(string(b), ") Z ") {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("pid %d still there", pid)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// TestPlatforms: firmware by name through the same create path: amd64
// UEFI, UEFI with secure boot enforced (the Debian-signed guest boots with
// secureboot=1; the unsigned one is refused by the firmware, visibly on the
// console), and an arm64 guest under AAVMF that reads its seed and obeys
// the ACPI power button.
func TestPlatforms(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	hh.cfg.Images.AllowFileURLs = true
	hh.h.Close()
	h2, err := NewHost(context.Background(), hh.cfg, Options{Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	hh.h = h2
	ctx := context.Background()
	file := func(p string) string { return "file://" + p }
	for _, tc := range []struct {
		name, arch, image, firmware string
		mem                         int
		want                        string
	}{
		{"uefi", "amd64", file(testguest.QCOW2(t)), "uefi", 256, "OTHERIX-GUEST ready"},
		{"secure", "amd64", file(testguest.SecureBootImage(t)), "uefi-secure", 512, "OTHERIX-GUEST firmware uefi secureboot=1"},
		{"unsigned", "amd64", file(testguest.QCOW2(t)), "uefi-secure", 512, "Access Denied"},
		{"arm", "arm64", file(testguest.QCOW2Arch(t, "arm64")), "", 256, "OTHERIX-GUEST cidata instance-id="},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			v, err := h2.Create(ctx, uuid.NewString(), api.CreateVM{Name: tc.name, ImageURL: tc.image, Arch: tc.arch, VCPUs: 1, MemoryMB: tc.mem, Firmware: tc.firmware}, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			wantFW := tc.firmware
			if wantFW == "" {
				wantFW = "uefi"
			}
			if v.Firmware != wantFW || v.SecureBoot != (tc.firmware == "uefi-secure") {
				t.Fatalf("view: firmware %q secure_boot %v", v.Firmware, v.SecureBoot)
			}
			c := testguest.OpenConsole(mustView(t, h2, tc.name).ConsolePath)
			ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
			defer cancel()
			if _, err := c.WaitFor(ctx, tc.want); err != nil {
				t.Fatalf("console: %v\n%s", err, c.Text())
			}
			if tc.arch == "arm64" {
				if _, err := c.WaitFor(ctx, "OTHERIX-GUEST ready"); err != nil {
					t.Fatal(err)
				}
				if _, err := h2.Engine().Stop(ctx, tc.name); err != nil {
					t.Fatalf("arm64 stop via ACPI: %v", err)
				}
				if _, err := c.WaitFor(ctx, "OTHERIX-GUEST powering off"); err != nil {
					t.Fatal(err)
				}
				if _, err := h2.Engine().Start(ctx, tc.name); err != nil {
					t.Fatal(err)
				}
				if _, err := c.WaitFor(ctx, "OTHERIX-GUEST booted arch=arm64"); err != nil {
					t.Fatal(err)
				}
			}
			if err := h2.Delete(ctx, tc.name); err != nil {
				t.Fatal(err)
			}
		})
	}
	// Bad firmware requests.
	for _, c := range []api.CreateVM{
		{Name: "x", ImageURL: "http://127.0.0.1/x", Arch: "amd64", Firmware: "nope"},
		{Name: "x", ImageURL: "http://127.0.0.1/x", Arch: "arm64", Firmware: "bios"},
		{Name: "x", ImageURL: "http://127.0.0.1/x", Arch: "amd64", Firmware: "uefi-secure", MemoryMB: 256},
		{Name: "x", ImageURL: "http://127.0.0.1/x", Arch: "amd64", FirmwareID: "0f8fad5b-d9cb-469f-a165-70867728950e"},
	} {
		if err := h2.ValidateCreate(&c); errcode.Of(err) != errcode.ValidationFailed {
			t.Errorf("%+v: %v", c, err)
		}
	}
}

func mustView(t *testing.T, h *Host, name string) vm.View {
	v, err := h.Engine().Get(name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestTPM: a TPM device gives the guest /dev/tpm0 from a per-VM swtpm
// running as the QEMU user; an NV index written by the guest survives a
// stop and start; no swtpm is left after a poweroff, after kill -9 of QEMU
// or after delete.
func TestTPM(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	hh.cfg.Images.AllowFileURLs = true
	hh.h.Close()
	h, err := NewHost(context.Background(), hh.cfg, Options{Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	hh.h = h
	// The data dir is under the test's temp root, private (0700): swtpm,
	// as the VM's uid, reaches its state through descriptors.
	ctx := context.Background()
	ud := "#cloud-config\n#otherix-run: /etc/otherix/tpm2 nvread 0x01500001 8 || { /etc/otherix/tpm2 nvdefine 0x01500001 8 && /etc/otherix/tpm2 nvwrite 0x01500001 6f74686572697821; }\n"
	image := "file://" + filepath.Join(testguest.PlatformDir(t, "amd64", testguest.VariantDefault), "guest.qcow2")
	v, err := h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "tpm", ImageURL: image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		UserData: ud, Devices: []api.Device{{DevType: api.DevTPM}}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !v.TPM {
		t.Fatalf("view: %+v", v)
	}
	c := hh.console("tpm")
	wait(t, c, "OTHERIX-GUEST tpm present=1 getrandom=ok")
	wait(t, c, "OTHERIX-GUEST tpm2 nvwrite rc=00000000")
	state := mustView(t, h, "tpm").Spec.TPM.State
	swtpm := swtpmPIDs(state)
	if len(swtpm) != 1 {
		t.Fatalf("swtpm processes: %v", swtpm)
	}
	// swtpm runs as the VM's own QEMU uid (qemu.uid_range).
	qemuUID := procUID(t, mustView(t, h, "tpm").PID)
	if first, count, _ := config.ParseUIDRange(hh.cfg.QEMU.UIDRange); qemuUID < first || qemuUID-first >= count {
		t.Errorf("qemu runs as uid %d, outside qemu.uid_range %s", qemuUID, hh.cfg.QEMU.UIDRange)
	}
	if got := procUID(t, swtpm[0]); got != qemuUID {
		t.Errorf("swtpm runs as uid %d, its QEMU as %d", got, qemuUID)
	}
	if _, err := h.Engine().Poweroff(ctx, "tpm"); err != nil {
		t.Fatal(err)
	}
	waitNoSWTPM(t, state)
	if _, err := h.Engine().Start(ctx, "tpm"); err != nil {
		t.Fatal(err)
	}
	wait(t, c, "OTHERIX-GUEST tpm2 nvread rc=00000000 data=6f74686572697821")
	// kill -9 of QEMU: swtpm follows it out.
	syscall.Kill(mustView(t, h, "tpm").PID, syscall.SIGKILL)
	waitNoSWTPM(t, state)
	if err := h.Delete(ctx, "tpm"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("tpm state left after delete: %v", err)
	}
}

// swtpmPIDs lists the swtpm processes serving state.
func swtpmPIDs(state string) []int { return tpm.PIDs(state) }

func waitNoSWTPM(t *testing.T, state string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(swtpmPIDs(state)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("swtpm left: %v", swtpmPIDs(state))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestForwardsAtRuntime: a port forward added to a running SLIRP VM (HMP
// hostfwd_add) reaches the guest's httpd at once and survives a restart;
// a host port in use is port_in_use with nothing added; removing it closes
// the port.
func TestForwardsAtRuntime(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	ctx := context.Background()
	ud := "#cloud-config\n#otherix-run: mkdir -p /www && echo hello-through-slirp > /www/index.html && httpd -p 80 -h /www\n"
	if _, err := hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "fwd", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, UserData: ud}, nil, nil); err != nil {
		t.Fatal(err)
	}
	c := hh.console("fwd")
	wait(t, c, "OTHERIX-GUEST run-exit 1 0")
	port := netdevtest.FreePort(t)
	dev := api.Device{DevType: api.DevProxy, SourceProto: "TCP", SourcePort: port, DestProto: "TCP", DestPort: 80}
	v, err := hh.h.AddForward(ctx, "fwd", dev)
	if err != nil {
		t.Fatal(err)
	}
	if len(v.Forwards) != 1 || v.Forwards[0].SourcePort != port {
		t.Fatalf("view forwards: %+v", v.Forwards)
	}
	if body := httpGet(t, port); !strings.Contains(body, "hello-through-slirp") {
		t.Fatalf("forward answered %q", body)
	}
	if _, err := hh.h.AddForward(ctx, "fwd", dev); errcode.Of(err) != errcode.ValidationFailed {
		t.Fatalf("same port twice: %v", err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	taken := api.Device{DevType: api.DevProxy, SourceProto: "TCP", SourcePort: busy.Addr().(*net.TCPAddr).Port, DestProto: "TCP", DestPort: 80}
	if _, err := hh.h.AddForward(ctx, "fwd", taken); errcode.Of(err) != errcode.PortInUse {
		t.Fatalf("port in use: %v", err)
	}
	// The forward is part of the VM: a reboot keeps it.
	if _, err := hh.h.Engine().Reboot(ctx, "fwd"); err != nil {
		t.Fatal(err)
	}
	wait(t, c, "OTHERIX-GUEST run-exit 1 0")
	if body := httpGet(t, port); !strings.Contains(body, "hello-through-slirp") {
		t.Fatalf("after reboot the forward answered %q", body)
	}
	if _, err := hh.h.RemoveForward(ctx, "fwd", api.Device{SourceProto: "tcp", SourcePort: port, DestPort: 1}); err != nil {
		t.Fatal(err)
	}
	if conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second); err == nil {
		conn.Close()
		t.Fatalf("port %d still open after remove", port)
	}
	if v, _ := hh.h.VM("fwd"); len(v.Forwards) != 0 {
		t.Fatalf("forwards after remove: %+v", v.Forwards)
	}
}

func httpGet(t *testing.T, port int) string {
	t.Helper()
	var last error
	for i := 0; i < 40; i++ {
		resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			return string(b)
		}
		last = err
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("GET port %d: %v", port, last)
	return ""
}

// TestVNC: a VNC console whose password is set over QMP after start: the
// right password gets the framebuffer over a real RFB 3.8 handshake, a
// wrong one "authentication failed"; the password is in no command line,
// state file or view; a screenshot is a PNG; bad VNC input is refused.
func TestVNC(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	ctx := context.Background()
	const pw = "Vn8!pass"
	v, err := hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "vnc", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		NoCloudInit: true, VNCEnabled: true, VNCPassword: pw}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !v.VNCEnabled || v.VNCPort < 5900 {
		t.Fatalf("view: %+v", v)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", v.VNCPort)
	c, err := rfbtest.Dial(ctx, addr, pw)
	if err != nil {
		t.Fatalf("vnc login with the password: %v", err)
	}
	if c.Init.Width == 0 || c.Init.Height == 0 {
		t.Fatalf("server init: %+v", c.Init)
	}
	if err := c.RequestUpdate(false, 0, 0, c.Init.Width, c.Init.Height); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadUpdate(ctx); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if _, err := rfbtest.Dial(ctx, addr, "wrong!"); err == nil || !strings.Contains(strings.ToLower(err.Error()), "authentication failed") {
		t.Fatalf("wrong password: %v", err)
	}
	png, err := hh.h.Screenshot(ctx, "vnc")
	if err != nil || len(png) < 8 || string(png[1:4]) != "PNG" {
		t.Fatalf("screenshot: %d bytes, %v", len(png), err)
	}
	// The password is nowhere in clear.
	cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(v.QEMUPID) + "/cmdline")
	if strings.Contains(string(cmdline), pw) {
		t.Fatal("vnc password on qemu's command line")
	}
	filepath.WalkDir(hh.cfg.DataDir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if b, _ := os.ReadFile(p); strings.Contains(string(b), pw) {
				t.Errorf("vnc password in clear in %s", p)
			}
		}
		return nil
	})
	// Restarted, QEMU gets the password again.
	if _, err := hh.h.Engine().Reboot(ctx, "vnc"); err != nil {
		t.Fatal(err)
	}
	if c, err := rfbtest.Dial(ctx, addr, pw); err != nil {
		t.Fatalf("vnc login after a reboot: %v", err)
	} else {
		c.Close()
	}
	for _, bad := range []api.CreateVM{
		{Name: "x", ImageURL: hh.image, Arch: "amd64", VNCEnabled: true, VNCPassword: "123456789"},
		{Name: "x", ImageURL: hh.image, Arch: "amd64", VNCEnabled: true, VNCPassword: "pw", VNCPort: &[]int{22}[0]},
		{Name: "x", ImageURL: hh.image, Arch: "amd64", VNCEnabled: true},
	} {
		if err := hh.h.ValidateCreate(&bad); errcode.Of(err) != errcode.ValidationFailed {
			t.Errorf("%+v: %v", bad, err)
		}
	}
}

// TestVolumes: a volume attached as a DISK device is seen by the guest; a
// readonly one refuses the guest's writes; an attached volume cannot be
// deleted; the VM's delete leaves volumes alone.
func TestVolumes(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	ctx := context.Background()
	for _, n := range []string{"data", "ro"} {
		if _, err := hh.h.CreateVolume(ctx, "", n, 1); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := hh.h.CreateVolume(ctx, "", "data", 1); errcode.Of(err) != errcode.Conflict {
		t.Fatalf("duplicate volume: %v", err)
	}
	if _, err := hh.h.CreateVolume(ctx, "", "../x", 1); errcode.Of(err) != errcode.ValidationFailed {
		t.Fatalf("bad volume name: %v", err)
	}
	ud := "#cloud-config\n#otherix-run: dd if=/dev/zero of=/dev/vdc bs=512 count=1 conv=fsync\n#otherix-run: dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync\n"
	_, err := hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "vols", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, UserData: ud,
		Devices: []api.Device{{DevType: api.DevDisk, Source: "data"}, {DevType: api.DevDisk, Source: "ro", Readonly: true}}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := hh.console("vols")
	line := wait(t, c, "OTHERIX-GUEST disks ")
	if !strings.Contains(line, "vdb:1073741824:0") || !strings.Contains(line, "vdc:1073741824:1") {
		t.Fatalf("guest disks: %s", line)
	}
	wait(t, c, "OTHERIX-GUEST run-exit 1 ") // the write to the readonly disk
	if l := wait(t, c, "OTHERIX-GUEST run-exit 2 "); !strings.HasSuffix(strings.TrimSpace(l), " 0") {
		t.Fatalf("write to the writable volume failed: %s", l)
	}
	if !strings.Contains(c.Text(), "OTHERIX-GUEST run-exit 1 ") || strings.Contains(c.Text(), "OTHERIX-GUEST run-exit 1 0") {
		t.Fatalf("a write to the readonly volume succeeded:\n%s", c.Text())
	}
	if err := hh.h.DeleteVolume("", "data"); errcode.Of(err) != errcode.Conflict {
		t.Fatalf("delete of an attached volume: %v", err)
	}
	vs, _ := hh.h.Volumes("")
	if len(vs) != 2 || len(vs[0].AttachedTo) != 1 {
		t.Fatalf("volumes: %+v", vs)
	}
	if err := hh.h.Delete(ctx, "vols"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"data", "ro"} {
		if err := hh.h.DeleteVolume("", n); err != nil {
			t.Fatalf("delete volume %s after the VM: %v", n, err)
		}
	}
	if _, err := hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "x", ImageURL: hh.image, Arch: "amd64",
		Devices: []api.Device{{DevType: api.DevDisk, Source: "nope"}}}, nil, nil); errcode.Of(err) != errcode.NotFound {
		t.Fatalf("missing volume: %v", err)
	}
}

// TestDevicesFromPaths: DISK and CDROM sources under devices.allowed_paths
// (and a CDROM from an image URL through the cache) reach the guest;
// anything else, ".." and symlinks escaping the directory included, is
// validation_failed.
func TestDevicesFromPaths(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	allowed := t.TempDir()
	hh.cfg.Devices.AllowedPaths = []string{allowed}
	disk := filepath.Join(allowed, "data.raw")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "raw", disk, "64M").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	isoDir := t.TempDir()
	os.WriteFile(filepath.Join(isoDir, "hello.txt"), []byte("hi"), 0o644)
	iso := filepath.Join(allowed, "tools.iso")
	if out, err := exec.Command("genisoimage", "-quiet", "-V", "tools", "-o", iso, isoDir).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	isoSrv := httptest.NewServer(http.FileServer(http.Dir(allowed)))
	defer isoSrv.Close()
	os.Symlink("/etc/hostname", filepath.Join(allowed, "escape"))
	ctx := context.Background()
	_, err := hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "paths", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		Devices: []api.Device{
			{DevType: api.DevDisk, Source: disk},
			{DevType: api.DevCDROM, Source: iso},
			{DevType: api.DevCDROM, Source: isoSrv.URL + "/tools.iso"},
		}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	line := wait(t, hh.console("paths"), "OTHERIX-GUEST disks ")
	for _, want := range []string{"vdb:67108864:0", "sr0:", "sr1:", "sr2:"} {
		if !strings.Contains(line, want) {
			t.Fatalf("guest disks %q lack %s", line, want)
		}
	}
	for _, src := range []string{"/etc/passwd", allowed + "/../" + filepath.Base(allowed) + "/data.raw", filepath.Join(allowed, "escape"), "relative.raw"} {
		c := api.CreateVM{Name: "x", ImageURL: hh.image, Arch: "amd64", Devices: []api.Device{{DevType: api.DevDisk, Source: src}}}
		if err := hh.h.ValidateCreate(&c); errcode.Of(err) != errcode.ValidationFailed && errcode.Of(err) != errcode.NotFound {
			t.Errorf("DISK source %q: %v", src, err)
		}
	}
}

// TestHotplugAndMedium: a disk attached to a running VM appears in the
// guest and goes when detached; a CD-ROM's medium changed while the VM
// runs is seen by the guest.
func TestHotplugAndMedium(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	allowed := t.TempDir()
	hh.cfg.Devices.AllowedPaths = []string{allowed}
	mkiso := func(name string, kb int) string {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "pad"), make([]byte, kb<<10), 0o644)
		p := filepath.Join(allowed, name)
		if out, err := exec.Command("genisoimage", "-quiet", "-V", name, "-o", p, dir).CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		return p
	}
	small, big := mkiso("small.iso", 64), mkiso("big.iso", 2048)
	ctx := context.Background()
	if _, err := hh.h.CreateVolume(ctx, "", "hot", 1); err != nil {
		t.Fatal(err)
	}
	if _, err := hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "hp", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		Devices: []api.Device{{DevType: api.DevCDROM, Source: small}}}, nil, nil); err != nil {
		t.Fatal(err)
	}
	c := hh.console("hp")
	wait(t, c, "OTHERIX-GUEST ready")
	if _, err := hh.h.AttachDisk(ctx, "hp", api.Device{DevType: api.DevDisk, Source: "hot"}); err != nil {
		t.Fatal(err)
	}
	wait(t, c, "vdb:1073741824:0")
	if _, err := hh.h.ChangeMedium(ctx, "hp", 1, api.Device{Source: big}); err != nil {
		t.Fatal(err)
	}
	line := wait(t, c, "OTHERIX-GUEST disks ")
	for !strings.Contains(line, "sr1:") || strings.Contains(line, "sr1:"+strconv.Itoa(isoSize(t, small))) {
		line = wait(t, c, "OTHERIX-GUEST disks ")
	}
	if !strings.Contains(line, "sr1:"+strconv.Itoa(isoSize(t, big))) {
		t.Fatalf("new medium not seen: %s", line)
	}
	if _, err := hh.h.DetachDisk(ctx, "hp", api.Device{Source: "hot"}); err != nil {
		t.Fatal(err)
	}
	for line = wait(t, c, "OTHERIX-GUEST disks "); strings.Contains(line, "vdb:"); line = wait(t, c, "OTHERIX-GUEST disks ") {
	}
	if err := hh.h.DeleteVolume("", "hot"); err != nil {
		t.Fatalf("volume still attached after detach: %v", err)
	}
}

func isoSize(t *testing.T, p string) int {
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return int(fi.Size())
}

// TestBootOrder: boot_priority decides what boots: a bootable CD-ROM of
// priority 0 boots before the root disk (priority 1), one of priority 2
// after it. The guest says which device booted it.
func TestBootOrder(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	hh.cfg.Devices.AllowedPaths = []string{testguest.Dir(t)}
	iso := filepath.Join(testguest.Dir(t), "guest.iso")
	ctx := context.Background()
	for _, tc := range []struct {
		name     string
		priority int
		want     string
	}{{"cd-first", 0, "boot=cdrom"}, {"disk-first", 2, "boot=disk"}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := tc.priority
			if _, err := hh.h.Create(ctx, uuid.NewString(), api.CreateVM{Name: tc.name, ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
				NoCloudInit: true, Devices: []api.Device{{DevType: api.DevCDROM, Source: iso, BootPriority: &p}}}, nil, nil); err != nil {
				t.Fatal(err)
			}
			if line := wait(t, hh.console(tc.name), "OTHERIX-GUEST booted"); !strings.Contains(line, tc.want) {
				t.Fatalf("boot_priority %d: %s, want %s", p, line, tc.want)
			}
		})
	}
}

// procUID is the real uid of pid.
func procUID(t *testing.T, pid int) uint32 {
	t.Helper()
	st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(st), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "Uid:" {
			n, _ := strconv.ParseUint(f[1], 10, 32)
			return uint32(n)
		}
	}
	t.Fatalf("no Uid in /proc/%d/status", pid)
	return 0
}

// TestUnknownTaskType: a task of a type this agent does not know fails
// validation_failed, for a VM the host lacks too (not not_found): a newer
// control plane tells "agent too old" from "VM missing".
func TestUnknownTaskType(t *testing.T) {
	h := newHost(t)
	for _, vm := range []string{"", "no-such-vm"} {
		_, err := h.h.Execute(context.Background(), protocol.Task{ID: "t", Type: "vm.frobnicate", VMName: vm, VMUUID: vm}, nil)
		if errcode.Of(err) != errcode.ValidationFailed {
			t.Errorf("vm %q: %v (code %s), want validation_failed", vm, err, errcode.Of(err))
		}
	}
}
