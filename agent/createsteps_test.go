package agent

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Each step of a create is tested on its own here: what it makes, what
// the next steps get from it, and that the undo stack takes back what it
// made. The whole create is TestSeedReadByGuest's and TestCreateUndo's.

// stepBuild validates c on hh's host and returns a build of it with its
// undo stack, and the progress the steps report.
func stepBuild(t *testing.T, hh *hostHarness, c api.CreateVM) (*build, *undo, *[]api.Progress) {
	t.Helper()
	if c.ImageURL == "" {
		c.ImageURL = hh.image
	}
	if c.Arch == "" {
		c.Arch = "amd64"
	}
	if c.MemoryMB == 0 {
		c.VCPUs, c.MemoryMB = 1, 256
	}
	if err := hh.h.ValidateCreate(&c); err != nil {
		t.Fatal(err)
	}
	u := &undo{}
	var prog []api.Progress
	res, err := hh.h.engine.Reserve(c.Name, uuid.NewString(), api.VM{Name: c.Name})
	if err != nil {
		t.Fatal(err)
	}
	u.add(res.Release) // as Create does: the first undo, run last
	b := hh.h.newBuild(res, &c, &api.TaskRef{ID: "t-1", Type: api.TaskCreate}, func(p api.Progress) { prog = append(prog, p) }, u)
	return b, u, &prog
}

// runSteps runs the named steps of createSteps on b, in createSteps'
// order, failing the test at the first error.
func runSteps(t *testing.T, b *build, names ...string) {
	t.Helper()
	var steps []createStep
	for _, s := range createSteps {
		if slices.Contains(names, s.name) {
			steps = append(steps, s)
		}
	}
	if len(steps) != len(names) {
		t.Fatalf("steps %v: not all are steps of createSteps", names)
	}
	if err := b.run(context.Background(), steps); err != nil {
		t.Fatal(err)
	}
}

func pinnedBy(t *testing.T, h *Host, digest string) []string {
	t.Helper()
	imgs, err := h.Images("")
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range imgs {
		if i.Digest == digest {
			return i.PinnedBy
		}
	}
	return nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func TestCreateStepNames(t *testing.T) {
	var got []string
	for _, s := range createSteps {
		got = append(got, s.name)
	}
	want := []string{"image", "disk", "firmware", "devices", "console", "seed", "define", "start"}
	if !slices.Equal(got, want) {
		t.Errorf("create steps %v, want %v", got, want)
	}
}

// TestCreateStepImage: the image is in the pool's cache, not pinned yet;
// progress says download, then prepare; nothing to undo. A missing image
// fails with image_download_failed.
func TestCreateStepImage(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	b, u, prog := stepBuild(t, hh, api.CreateVM{Name: "img"})
	runSteps(t, b, "image")
	if b.entry.Digest == "" || !exists(b.entry.Path) {
		t.Fatalf("entry %+v", b.entry)
	}
	if p := pinnedBy(t, hh.h, b.entry.Digest); len(p) != 0 {
		t.Errorf("image pinned by %v after the image step", p)
	}
	if len(*prog) < 2 || (*prog)[0].Phase != "download" || (*prog)[len(*prog)-1].Phase != "prepare" {
		t.Errorf("progress %+v", *prog)
	}
	if len(u.fns) != 1 { // the reservation's release
		t.Errorf("image step pushed %d undos", len(u.fns)-1)
	}
	bad, _, _ := stepBuild(t, hh, api.CreateVM{Name: "bad", ImageURL: hh.image + ".missing"})
	if err := bad.image(context.Background()); errcode.Of(err) != errcode.ImageDownloadFailed {
		t.Errorf("missing image: %v", err)
	}
}

// TestCreateStepDisk: the VM's folder and a qcow2 overlay backed by the
// cached image, which is pinned for the VM; undo removes both.
func TestCreateStepDisk(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	b, u, _ := stepBuild(t, hh, api.CreateVM{Name: "disk", DiskGiB: 2})
	runSteps(t, b, "image", "disk")
	if filepath.Dir(b.root) != b.dir || !slices.Contains(b.owned, b.dir) {
		t.Errorf("root %s, dir %s, owned %v", b.root, b.dir, b.owned)
	}
	out, err := exec.Command("qemu-img", "info", "-U", b.root).CombinedOutput()
	if err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if info := string(out); !strings.Contains(info, "backing file: "+b.entry.Path) || !strings.Contains(info, "virtual size: 2 GiB") {
		t.Errorf("overlay:\n%s", info)
	}
	if p := pinnedBy(t, hh.h, b.entry.Digest); !slices.Equal(p, []string{b.id}) {
		t.Errorf("image pinned by %v, want the VM", p)
	}
	u.run()
	if exists(b.dir) {
		t.Error("undo left the VM's folder")
	}
	if p := pinnedBy(t, hh.h, b.entry.Digest); len(p) != 0 {
		t.Errorf("undo left pins %v", p)
	}
}

// TestCreateStepFirmware: BIOS needs nothing; UEFI gets the VM's copy of
// the variable store in its folder and the code's real path (no symlink).
func TestCreateStepFirmware(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	bios, _, _ := stepBuild(t, hh, api.CreateVM{Name: "bios"})
	runSteps(t, bios, "image", "disk", "firmware")
	if bios.fw != nil {
		t.Errorf("bios firmware spec %+v", bios.fw)
	}
	uefi, u, _ := stepBuild(t, hh, api.CreateVM{Name: "uefi", Firmware: "uefi"})
	runSteps(t, uefi, "image", "disk", "firmware")
	fw := uefi.fw
	if fw == nil || fw.Interface != "uefi" || fw.Vars != filepath.Join(uefi.dir, "efivars.fd") || !exists(fw.Vars) {
		t.Fatalf("uefi firmware spec %+v", fw)
	}
	if real, err := filepath.EvalSymlinks(fw.Code); err != nil || real != fw.Code {
		t.Errorf("code %s is not its real path (%s, %v)", fw.Code, real, err)
	}
	u.run()
	if exists(fw.Vars) {
		t.Error("undo left the variable store")
	}
}

// TestCreateStepDevices: a NIC with a reserved MAC (SLIRP, carrying the
// PROXY forward), a CD-ROM image from a URL pinned for the VM's CD-ROM
// owner at index 1 (after the seed ISO) and an emulated TPM's state; undo
// releases the MAC, the pin and the state.
func TestCreateStepDevices(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	iso := t.TempDir()
	os.WriteFile(filepath.Join(iso, "tools.iso"), make([]byte, 64<<10), 0o644)
	srv := httptest.NewServer(http.FileServer(http.Dir(iso)))
	t.Cleanup(srv.Close)
	b, u, _ := stepBuild(t, hh, api.CreateVM{Name: "dev", Devices: []api.Device{
		{DevType: api.DevProxy, SourceProto: "TCP", SourcePort: freePort(t), DestProto: "TCP", DestPort: 22},
		{DevType: api.DevCDROM, Source: srv.URL + "/tools.iso"},
		{DevType: api.DevTPM},
	}})
	runSteps(t, b, "image", "disk", "firmware", "devices")
	if len(b.plan.nics) != 1 || b.plan.nics[0].Type != vm.NICUser || len(b.plan.nics[0].Forwards) != 1 || b.plan.forwards != nil {
		t.Fatalf("nics %+v, agent forwards %+v", b.plan.nics, b.plan.forwards)
	}
	mac := b.plan.nics[0].MAC
	if owner, _, ok := hh.h.engine.MACOwner(mac); !ok || owner != b.id {
		t.Errorf("MAC %s owned by %q (%v)", mac, owner, ok)
	}
	if len(b.cdroms) != 1 || len(b.pins) != 1 || b.pins[0].Index != 1 || b.cdroms[0].Path == "" {
		t.Fatalf("cdroms %+v, pins %+v", b.cdroms, b.pins)
	}
	if p := pinnedBy(t, hh.h, b.pins[0].Digest); !slices.Equal(p, []string{cdromOwner(b.id)}) {
		t.Errorf("CD-ROM image pinned by %v", p)
	}
	if b.tpm == nil || b.tpm.State != filepath.Join(hh.cfg.DataDir, "tpm", b.id) || !slices.Contains(b.owned, b.tpm.State) {
		t.Errorf("tpm %+v, owned %v", b.tpm, b.owned)
	}
	os.MkdirAll(b.tpm.State, 0o700) // as swtpm's first start makes it
	u.run()
	if _, _, ok := hh.h.engine.MACOwner(mac); ok {
		t.Error("undo kept the MAC")
	}
	if p := pinnedBy(t, hh.h, b.pins[0].Digest); len(p) != 0 {
		t.Errorf("undo kept CD-ROM pins %v", p)
	}
	if exists(b.tpm.State) {
		t.Error("undo kept the TPM state")
	}
}

// freePort is a loopback TCP port nothing listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestCreateStepConsole: VNC gets a held port and the password sealed for
// the VM (never kept in clear); undo frees the port. No VNC, no console.
func TestCreateStepConsole(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	none, _, _ := stepBuild(t, hh, api.CreateVM{Name: "novnc"})
	runSteps(t, none, "console")
	if none.vnc != nil || none.sealed != "" {
		t.Errorf("console without vnc: %+v %q", none.vnc, none.sealed)
	}
	b, u, _ := stepBuild(t, hh, api.CreateVM{Name: "vnc", VNCEnabled: true, VNCPassword: "s3cretpw"})
	runSteps(t, b, "console")
	if b.vnc == nil || b.vnc.Port == 0 || b.vnc.Listen != hh.cfg.Listen.VNC {
		t.Fatalf("vnc %+v", b.vnc)
	}
	if strings.Contains(b.sealed, "s3cretpw") {
		t.Error("password kept in clear")
	}
	if pw, err := hh.h.box.Open(b.sealed, b.id); err != nil || pw != "s3cretpw" {
		t.Errorf("sealed password opens to %q, %v", pw, err)
	}
	if got := hh.h.engine.HeldVNCPorts(b.id); !slices.Equal(got, []int{b.vnc.Port}) {
		t.Errorf("ports held for the create: %v, want [%d]", got, b.vnc.Port)
	}
	other, err := hh.h.engine.Reserve("other", uuid.NewString(), api.VM{})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Release()
	if err := other.HoldVNC(b.vnc.Port); errcode.Of(err) != errcode.PortInUse {
		t.Errorf("the VM's port held by another: %v", err)
	}
	u.run()
	if err := other.HoldVNC(b.vnc.Port); err != nil {
		t.Errorf("undo kept the port: %v", err)
	}
}

// TestCreateStepSeed: the NoCloud ISO (volume cidata) is written into the
// VM's folder and becomes CD-ROM 0 of the spec; no_cloud_init makes none.
// The folder's undo (the disk step's) takes it back.
func TestCreateStepSeed(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	b, u, _ := stepBuild(t, hh, api.CreateVM{Name: "seed", UserData: "#cloud-config\n"})
	runSteps(t, b, "image", "disk", "firmware", "devices", "seed")
	if b.seed != filepath.Join(b.dir, "seed.iso") {
		t.Fatalf("seed %q", b.seed)
	}
	iso, err := os.ReadFile(b.seed)
	if err != nil {
		t.Fatal(err)
	}
	// The primary volume descriptor (sector 16) names the volume at 40.
	if len(iso) < 16*2048+72 || strings.TrimSpace(string(iso[16*2048+40:16*2048+72])) != "cidata" {
		t.Error("seed ISO's volume is not cidata")
	}
	if s := b.spec(); len(s.CDROMs) != 1 || s.CDROMs[0].Path != b.seed {
		t.Errorf("spec cdroms %+v", s.CDROMs)
	}
	u.run()
	if exists(b.seed) {
		t.Error("undo kept the seed")
	}
	none, _, _ := stepBuild(t, hh, api.CreateVM{Name: "noseed", NoCloudInit: true})
	runSteps(t, none, "image", "disk", "seed")
	if none.seed != "" || exists(filepath.Join(none.dir, "seed.iso")) || len(none.spec().CDROMs) != 0 {
		t.Errorf("no_cloud_init made a seed: %q", none.seed)
	}
}

// TestCreateStepDefine: the engine knows the VM, stopped, with the spec
// and record the steps made; undo deletes it with its folder.
func TestCreateStepDefine(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	b, u, _ := stepBuild(t, hh, api.CreateVM{Name: "def", RootDiskIOBus: "NVME"})
	runSteps(t, b, "image", "disk", "firmware", "devices", "console", "seed", "define")
	v, err := hh.h.Engine().Get("def")
	if err != nil {
		t.Fatal(err)
	}
	r := v.Record
	if v.Status != api.StatusStopped || v.Spec.UUID != b.id || v.Spec.Disks[0].Path != b.root || v.Spec.Disks[0].Bus != vm.BusNVMe {
		t.Errorf("view %s %+v", v.Status, v.Spec)
	}
	if r.ImageSHA256 != b.entry.Digest || r.Pool != "default" || r.DesiredPhase != api.PhaseRunning || !r.CloudInit ||
		r.LastTask == nil || r.LastTask.ID != "t-1" || r.RestartPolicy != api.RestartOnFailure || !r.Autostart || r.DiskGiB == 0 {
		t.Errorf("record %+v", r)
	}
	u.run()
	if _, err := hh.h.Engine().Get("def"); errcode.Of(err) != errcode.NotFound {
		t.Errorf("undo kept the VM: %v", err)
	}
	if exists(b.dir) {
		t.Error("undo kept the VM's folder")
	}
}

// TestCreateStepStart: the defined VM boots (a QEMU pid). A start that
// fails (the forward's host port taken meanwhile) unwinds every step: no
// VM, no folder, no pin, no MAC.
func TestCreateStepStart(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	b, u, prog := stepBuild(t, hh, api.CreateVM{Name: "boot", NoCloudInit: true})
	runSteps(t, b, "image", "disk", "firmware", "devices", "console", "seed", "define", "start")
	if b.view.Status != api.StatusRunning || b.view.PID == 0 {
		t.Errorf("after start: %s pid %d", b.view.Status, b.view.PID)
	}
	if last := (*prog)[len(*prog)-1]; last.Phase != "boot" {
		t.Errorf("last progress %+v", last)
	}
	u.success()
	if err := hh.h.Delete(context.Background(), "boot"); err != nil {
		t.Fatal(err)
	}

	port := freePort(t)
	f, u2, _ := stepBuild(t, hh, api.CreateVM{Name: "fail", NoCloudInit: true, Devices: []api.Device{
		{DevType: api.DevProxy, SourceProto: "TCP", SourcePort: port, DestProto: "TCP", DestPort: 22}}})
	runSteps(t, f, "image", "disk", "firmware", "devices", "console", "seed", "define")
	busy, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	if err := f.start(context.Background()); errcode.Of(err) != errcode.PortInUse {
		t.Fatalf("start with the forward's port taken: %v", err)
	}
	mac := f.plan.nics[0].MAC
	u2.run()
	if _, err := hh.h.Engine().Get("fail"); errcode.Of(err) != errcode.NotFound {
		t.Errorf("undo kept the VM: %v", err)
	}
	if exists(f.dir) {
		t.Error("undo kept the folder")
	}
	if p := pinnedBy(t, hh.h, f.entry.Digest); len(p) != 0 {
		t.Errorf("undo kept pins %v", p)
	}
	if _, _, ok := hh.h.engine.MACOwner(mac); ok {
		t.Error("undo kept the MAC")
	}
}
