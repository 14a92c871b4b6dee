package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/systemd"
)

// cgroupPlacer does what systemd does with a VM's scope, where this
// host's systemd-less test run can: it moves the QEMU of the VMs named in
// capped into a memory cgroup of its own (a child of the test's), and
// follows its OOM kills with the agent's OOMTracker, as ScopePlacer does.
type cgroupPlacer struct {
	parent systemd.MemoryCgroup
	capped map[string]bool
	oom    *OOMTracker

	mu  sync.Mutex
	dir map[string]string // VM name -> its cgroup
}

func (p *cgroupPlacer) Place(ctx context.Context, v vm.View) error {
	if !p.capped[v.Spec.Name] {
		return nil
	}
	dir := filepath.Join(p.parent.Dir, "otherix-vm-"+vm.ShortID(v.Spec.UUID))
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(v.PID)), 0o644); err != nil {
		return err
	}
	p.mu.Lock()
	p.dir[v.Spec.Name] = dir
	p.mu.Unlock()
	return p.oom.Track(v, filepath.Base(dir), 0)
}

func (p *cgroupPlacer) Remove(ctx context.Context, v vm.View) error {
	p.oom.Forget(v)
	p.mu.Lock()
	dir := p.dir[v.Spec.Name]
	delete(p.dir, v.Spec.Name)
	p.mu.Unlock()
	if dir != "" {
		return os.Remove(dir)
	}
	return nil
}

func (p *cgroupPlacer) Kind() string { return "test-memory-cgroup" }

func (p *cgroupPlacer) ExitCause(v vm.View) string { return p.oom.Cause(v) }

// capNow caps the VM's cgroup at what it uses now plus headroom.
func (p *cgroupPlacer) capNow(t *testing.T, name string, headroom int64) int64 {
	t.Helper()
	p.mu.Lock()
	dir := p.dir[name]
	p.mu.Unlock()
	usage, limit := "memory.usage_in_bytes", "memory.limit_in_bytes"
	if p.parent.V2 {
		usage, limit = "memory.current", "memory.max"
	}
	b, err := os.ReadFile(filepath.Join(dir, usage))
	if err != nil {
		t.Fatal(err)
	}
	used, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, limit), []byte(strconv.FormatInt(used+headroom, 10)), 0o644); err != nil {
		t.Fatal(err)
	}
	return used + headroom
}

// TestOOMKilledAtCap: a guest allocating past its memory cap gets its
// QEMU killed by the kernel in its own memory cgroup, and the agent
// reports the VM crashed with an out-of-memory reason; the other VM and
// the agent go on.
func TestOOMKilledAtCap(t *testing.T) {
	t.Parallel()
	self, err := systemd.MemoryCgroupOf("/proc", "/sys/fs/cgroup", os.Getpid())
	if err != nil {
		t.Fatalf("this test needs a memory cgroup: %v", err)
	}
	placer := &cgroupPlacer{parent: self, capped: map[string]bool{"hog": true}, oom: &OOMTracker{}, dir: map[string]string{}}
	changed := make(chan struct{}, 1)
	hh := newHostWith(t, Options{Placer: placer, OnChange: func(api.VM) {
		select {
		case changed <- struct{}{}:
		default:
		}
	}})
	h := hh.h
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	// The hog waits 10 s after ready (the test caps it meanwhile), then
	// fills 300 MiB of its 512 MiB RAM with a file in its RAM root.
	hogUD := "#cloud-config\n#otherix-run: sleep 10; echo OTHERIX-TEST hog start; dd if=/dev/zero of=/hog bs=1M count=300; echo OTHERIX-TEST hog survived\n"
	image := hh.image
	if _, err := h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "hog", ImageURL: image, Arch: "amd64", VCPUs: 1, MemoryMB: 512, UserData: hogUD}, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Create(ctx, uuid.NewString(), api.CreateVM{Name: "calm", ImageURL: image, Arch: "amd64", VCPUs: 1, MemoryMB: 256, NoCloudInit: true}, nil, nil); err != nil {
		t.Fatal(err)
	}
	hv, _ := h.Engine().Get("hog")
	calm, _ := h.Engine().Get("calm")
	con := testguest.OpenConsole(hv.ConsolePath)
	defer con.Close()
	wait(t, con, "OTHERIX-GUEST ready")
	limit := placer.capNow(t, "hog", 48<<20)
	if strings.Contains(con.Text(), "OTHERIX-TEST hog start") {
		t.Fatal("the guest started allocating before the test capped it")
	}
	t.Logf("hog capped at %d MiB (what it used after booting plus 48 MiB)", limit>>20)

	var got api.VM
	for {
		v, err := h.VM("hog")
		if err != nil {
			t.Fatal(err)
		}
		if v.Status != api.StatusRunning {
			got = v
			break
		}
		if strings.Contains(con.Text(), "OTHERIX-TEST hog survived") {
			t.Fatalf("the guest wrote 300 MiB under a cap of %d MiB:\n%s", limit>>20, con.Text())
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the hog still runs: %+v", v)
		case <-changed:
		case <-time.After(time.Second): // the console may show the guest survived
		}
	}
	if got.Status != api.StatusCrashed || !strings.Contains(got.StatusReason, "killed by signal SIGKILL") ||
		!strings.Contains(got.StatusReason, "out of memory: the kernel's OOM killer ended it") {
		t.Fatalf("hog: status %s, reason %q", got.Status, got.StatusReason)
	}
	t.Logf("hog: %s: %s", got.Status, got.StatusReason)
	if !strings.Contains(con.Text(), "OTHERIX-TEST hog start") {
		t.Errorf("the hog died before allocating:\n%s", con.Text())
	}
	// The other VM, and this process, go on.
	if v, err := h.VM("calm"); err != nil || v.Status != api.StatusRunning || v.QEMUPID != calm.PID {
		t.Errorf("calm: %+v %v", v, err)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", calm.PID)); err != nil {
		t.Errorf("calm's qemu: %v", err)
	}
}

// TestOOMTrackerOwnCgroup: only a VM's own memory cgroup is followed; a
// kill there after placement explains that QEMU's exit, with the cap.
func TestOOMTrackerOwnCgroup(t *testing.T) {
	proc, root := t.TempDir(), t.TempDir()
	scope := filepath.Join(root, "otherix.slice", "otherix-vm-0123456789ab.scope")
	os.MkdirAll(filepath.Join(proc, "10"), 0o755)
	os.MkdirAll(scope, 0o755)
	os.WriteFile(filepath.Join(proc, "10", "cgroup"), []byte("0::/otherix.slice/otherix-vm-0123456789ab.scope\n"), 0o644)
	events := filepath.Join(scope, "memory.events")
	os.WriteFile(events, []byte("oom 2\noom_kill 2\n"), 0o644) // kills before placement do not count
	tr := &OOMTracker{ProcRoot: proc, CgroupRoot: root}
	v := vm.View{Spec: vm.Spec{Name: "web-1", UUID: "01234567-89ab-4cde-8f01-23456789abcd"}, PID: 10}
	if err := tr.Track(v, "otherix-vm-other.scope", 0); err == nil {
		t.Fatal("a cgroup not the VM's own was followed")
	}
	if err := tr.Track(v, "otherix-vm-0123456789ab.scope", 768<<20); err != nil {
		t.Fatal(err)
	}
	defer tr.Forget(v)
	if c := tr.Cause(v); c != "" {
		t.Errorf("cause before any kill: %q", c)
	}
	os.WriteFile(events, []byte("oom 3\noom_kill 3\n"), 0o644)
	if c := tr.Cause(v); c != "out of memory: the kernel's OOM killer ended it at its memory cap (768 MiB)" {
		t.Errorf("cause: %q", c)
	}
	other := v
	other.PID = 11
	if c := tr.Cause(other); c != "" {
		t.Errorf("another QEMU of the VM got the cause %q", c)
	}
}
