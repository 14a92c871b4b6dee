package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
	"github.com/otherix/otherix-agent/agent/runner"
	"github.com/otherix/otherix-agent/agent/vnc/rfbtest"
)

// taskFunc queues one task and waits for its completion.
type taskFunc func(id, typ, vmUUID string, spec any) cptest.Completion

// runTasks starts a runner over hh's Host against a fake control plane and
// returns functions that queue one task (delivered once, or twice) and
// wait for its completion.
func runTasks(t *testing.T, hh *hostHarness) (cp *cptest.Server, once, twice taskFunc) {
	t.Helper()
	cp = &cptest.Server{Token: "s3cret", HeartbeatInterval: time.Second}
	ts := httptest.NewServer(cp)
	t.Cleanup(ts.Close)
	srv := ts.URL
	tok := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tok, []byte("s3cret\n"), 0o600)
	client, err := protocol.NewClient(protocol.ClientConfig{BaseURL: srv, Node: "node-1", TokenFile: tok})
	if err != nil {
		t.Fatal(err)
	}
	j, err := journal.Open(filepath.Join(hh.cfg.DataDir, "journal"), journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r := runner.New(client, j, hh.h, hh.h, runner.Config{
		InitialStagger: -1, LeaseWait: 2 * time.Second, RetryBase: 100 * time.Millisecond, ProgressInterval: 200 * time.Millisecond,
		Logger: zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)),
	})
	ctx, cancel := context.WithCancel(context.Background())
	finished := make(chan struct{})
	go func() { r.Run(ctx); close(finished) }()
	// Stop the runner before the host's cleanup kills the VMs.
	t.Cleanup(func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(time.Minute):
		}
		j.Close()
	})
	names := map[string]string{}
	run := func(dup bool, id, typ, vmUUID string, spec any) cptest.Completion {
		t.Helper()
		var raw json.RawMessage
		if spec != nil {
			raw, _ = json.Marshal(spec)
		}
		if c, ok := spec.(api.CreateVM); ok {
			names[vmUUID] = c.Name
			cp.SetDesired(vmUUID, api.PhaseRunning)
		}
		cp.Enqueue(protocol.Task{ID: id, Type: typ, VMName: names[vmUUID], VMUUID: vmUUID, Spec: raw})
		if dup {
			cp.Duplicate(id)
		}
		wctx, wcancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer wcancel()
		c, err := cp.WaitCompletion(wctx, id)
		if err != nil {
			t.Fatalf("%s (%s): %v", id, typ, err)
		}
		return c
	}
	return cp, func(id, typ, vmUUID string, spec any) cptest.Completion {
			t.Helper()
			return run(false, id, typ, vmUUID, spec)
		},
		func(id, typ, vmUUID string, spec any) cptest.Completion {
			t.Helper()
			return run(true, id, typ, vmUUID, spec)
		}
}

// TestEveryChangeIsATask drives each change and read-only task type
// through the runner (journal, per-VM queue) into the real Host and a
// real guest, and checks the effect where the guest or the host shows
// it: a volume created, attached (the guest sees vdb), detached (gone),
// deleted; a CD-ROM medium changed (the guest sees the new size) and
// ejected; a forward added (an HTTP server in the guest answers on the
// host port) and removed (the port is closed); CPU, memory and autostart
// updated (pending_changes on the running VM); a screenshot (a PNG) and
// the console's tail (the guest's lines, capped) as task results; an
// image pulled and, unused, deleted, while a used one is a conflict. A
// duplicated delivery of an attach and of a forward runs once.
func TestEveryChangeIsATask(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	allowed := t.TempDir()
	hh.cfg.Devices.AllowedPaths = []string{allowed}
	mkiso := func(name string, kb int) (string, int) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "pad"), make([]byte, kb<<10), 0o644)
		p := filepath.Join(allowed, name)
		if out, err := exec.Command("genisoimage", "-quiet", "-V", name, "-o", p, dir).CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		return p, isoSize(t, p)
	}
	small, smallSize := mkiso("small.iso", 64)
	big, bigSize := mkiso("big.iso", 2048)
	cp, run, runTwice := runTasks(t, hh)
	ok := func(c cptest.Completion) cptest.Completion {
		t.Helper()
		if c.Status != api.TaskSuccess {
			t.Fatalf("task %s: %s %+v", c.TaskID, c.Status, c.Error)
		}
		return c
	}

	// volume.create: the volume is a file; its output is the volume.
	c := ok(run("t-vol", api.TaskCreateVolume, "", api.CreateVolume{Name: "tv", SizeGiB: 1}))
	if c.Output == nil || c.Output.Volume == nil || c.Output.Volume.Name != "tv" || c.Output.Volume.Pool != "default" {
		t.Fatalf("volume.create output: %+v", c.Output)
	}
	volPath, _ := hh.h.volumePath("", "tv")
	if _, err := os.Stat(volPath); err != nil {
		t.Fatal(err)
	}

	id := uuid.NewString()
	ud := "#cloud-config\n#otherix-run: mkdir -p /www && echo hello-through-a-task > /www/index.html && httpd -p 80 -h /www\n"
	ok(run("t-create", api.TaskCreate, id, api.CreateVM{Name: "tasks", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		UserData: ud, VNCEnabled: true, VNCPassword: "pw", Devices: []api.Device{{DevType: api.DevCDROM, Source: small}}}))
	con := hh.console("tasks")
	wait(t, con, "OTHERIX-GUEST run-exit 1 0")

	// vm.disk.attach, delivered twice: attached once, the guest sees it.
	c = ok(runTwice("t-attach", api.TaskAttachDisk, id, api.Device{DevType: api.DevDisk, Source: "tv"}))
	wait(t, con, "vdb:1073741824:0")
	if c.VM == nil || !slices.ContainsFunc(c.VM.Devices, func(d api.Device) bool { return d.Source == "tv" }) {
		t.Fatalf("attach: the view's devices lack the volume: %+v", c.VM)
	}
	waitDelivered(t, cp, "t-attach")

	// vm.cdrom.change: index 1 (the seed ISO is 0) gets the big ISO.
	ok(run("t-medium", api.TaskChangeMedium, id, api.MediumSpec{Index: 1, Source: big}))
	waitDisks(t, con, func(l string) bool { return strings.Contains(l, "sr1:"+strconv.Itoa(bigSize)) })
	// vm.disk.detach: the guest loses vdb.
	ok(run("t-detach", api.TaskDetachDisk, id, api.Device{Source: "tv"}))
	waitDisks(t, con, func(l string) bool { return !strings.Contains(l, "vdb:") })
	// vm.cdrom.eject: QEMU's drive is empty (the guest keeps showing the
	// last medium's size until one is inserted); a new medium is seen.
	ok(run("t-eject", api.TaskEjectMedium, id, api.MediumSpec{Index: 1}))
	if inserted(t, hh, "tasks", "cd1-dev") {
		t.Fatal("CD-ROM 1 still has a medium after vm.cdrom.eject")
	}
	ok(run("t-medium-2", api.TaskChangeMedium, id, api.MediumSpec{Index: 1, Source: small}))
	waitDisks(t, con, func(l string) bool { return strings.Contains(l, "sr1:"+strconv.Itoa(smallSize)) })

	// vm.forward.add, delivered twice (a second run would be refused: the
	// port is taken), and vm.forward.remove.
	port := netdevtest.FreePort(t)
	ok(runTwice("t-fwd", api.TaskAddForward, id, api.Device{DevType: api.DevProxy, SourceProto: "TCP", SourcePort: port, DestProto: "TCP", DestPort: 80}))
	if body := httpGet(t, port); !strings.Contains(body, "hello-through-a-task") {
		t.Fatalf("forward answered %q", body)
	}
	waitDelivered(t, cp, "t-fwd")
	c = ok(run("t-unfwd", api.TaskRemoveForward, id, api.Device{SourceProto: "tcp", SourcePort: port}))
	if conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second); err == nil {
		conn.Close()
		t.Fatalf("port %d still open after vm.forward.remove", port)
	}
	if len(c.VM.Forwards) != 0 {
		t.Fatalf("forwards after remove: %+v", c.VM.Forwards)
	}

	// vm.screenshot and vm.console.tail: results, not views.
	c = ok(run("t-shot", api.TaskScreenshot, id, nil))
	if c.Output == nil || c.Output.Screenshot == nil || len(c.Output.Screenshot.Data) < 8 || string(c.Output.Screenshot.Data[1:4]) != "PNG" {
		t.Fatalf("screenshot output: %+v", c.Output)
	}
	c = ok(run("t-tail", api.TaskConsoleTail, id, api.ConsoleTailSpec{Bytes: 2048}))
	tail := c.Output.Console
	if tail == nil || len(tail.Data) == 0 || len(tail.Data) > 2048 || tail.Offset+int64(len(tail.Data)) != tail.Size ||
		!strings.Contains(tail.Data, "OTHERIX-GUEST") {
		t.Fatalf("console tail: %+v", tail)
	}
	c = ok(run("t-tail-max", api.TaskConsoleTail, id, api.ConsoleTailSpec{Bytes: 1 << 30}))
	if n := len(c.Output.Console.Data); n > api.MaxConsoleTail {
		t.Fatalf("console tail of %d bytes, over the cap", n)
	}

	// vm.update: CPU and memory of a running VM apply at its next start,
	// a VNC password at once (the old one stops working), and it is in no
	// answer.
	vcpus, mem, auto, pw := 2, 384, false, "Nw9!pass"
	c = ok(run("t-update", api.TaskUpdate, id, api.UpdateVM{VCPUs: &vcpus, MemoryMB: &mem, Autostart: &auto, VNCPassword: &pw}))
	if b, _ := json.Marshal(c); strings.Contains(string(b), pw) {
		t.Fatal("the vm.update completion holds the VNC password")
	}
	vncAddr := fmt.Sprintf("127.0.0.1:%d", c.VM.VNCPort)
	if rc, err := rfbtest.Dial(context.Background(), vncAddr, pw); err != nil {
		t.Fatalf("vnc login with the new password: %v", err)
	} else {
		rc.Close()
	}
	if _, err := rfbtest.Dial(context.Background(), vncAddr, "pw"); err == nil {
		t.Fatal("the old VNC password still logs in")
	}
	if c.VM.PendingChanges == nil || c.VM.PendingChanges.VCPUs != 2 || c.VM.PendingChanges.MemoryMB != 384 || c.VM.Autostart {
		t.Fatalf("update: %+v %+v", c.VM, c.VM.PendingChanges)
	}
	if c.VM.LastTask == nil || c.VM.LastTask.ID != "t-update" {
		t.Fatalf("last task: %+v", c.VM.LastTask)
	}

	// volume.delete, now that no VM has it.
	ok(run("t-rmvol", api.TaskDeleteVolume, "", api.VolumeRef{Name: "tv"}))
	if _, err := os.Stat(volPath); !os.IsNotExist(err) {
		t.Fatalf("volume file after volume.delete: %v", err)
	}

	// image.pull of the root image: a hit, pinned by the VM; image.delete
	// of it is a conflict. An ISO pulled, unused, is deleted.
	c = ok(run("t-pull", api.TaskImagePull, "", api.PullImage{URL: hh.image}))
	root := c.Output.Image
	if root == nil || !slices.Contains(root.PinnedBy, id) {
		t.Fatalf("pull output: %+v", c.Output)
	}
	if c := run("t-rmroot", api.TaskDeleteImage, "", api.ImageRef{Digest: root.Digest}); c.Status != api.TaskFailed || c.Error.Code != "conflict" {
		t.Fatalf("delete of a used image: %s %+v", c.Status, c.Error)
	}
	c = ok(run("t-pulliso", api.TaskImagePull, "", api.PullImage{URL: strings.TrimSuffix(hh.image, "guest.qcow2") + "guest.iso", Pool: "default"}))
	iso := c.Output.Image.Digest
	ok(run("t-rmiso", api.TaskDeleteImage, "", api.ImageRef{Pool: "default", Digest: iso}))
	imgs, _ := hh.h.Images("default")
	if slices.ContainsFunc(imgs, func(i api.Image) bool { return i.Digest == iso }) {
		t.Fatalf("image %s still cached after image.delete", iso)
	}
	if c := run("t-rmiso-again", api.TaskDeleteImage, "", api.ImageRef{Digest: iso}); c.Status != api.TaskFailed || c.Error.Code != "not_found" {
		t.Fatalf("delete of a deleted image: %s %+v", c.Status, c.Error)
	}
}

// inserted reports whether QEMU's device dev of a VM holds a medium.
func inserted(t *testing.T, hh *hostHarness, name, dev string) bool {
	t.Helper()
	var blocks []struct {
		QDev     string          `json:"qdev"`
		Inserted json.RawMessage `json:"inserted"`
	}
	if err := hh.h.Engine().QMP(context.Background(), name, "query-block", nil, &blocks); err != nil {
		t.Fatal(err)
	}
	for _, b := range blocks {
		if strings.Contains(b.QDev, dev) {
			return len(b.Inserted) > 0 && string(b.Inserted) != "null"
		}
	}
	t.Fatalf("no block device %s in %+v", dev, blocks)
	return false
}

// waitDelivered waits for the duplicate delivery of a task and checks it
// was not run again: every completion says success.
func waitDelivered(t *testing.T, cp *cptest.Server, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := cp.WaitFor(ctx, func() bool { return cp.Deliveries(id) >= 2 }); err != nil {
		t.Fatalf("%s delivered %d times: %v", id, cp.Deliveries(id), err)
	}
	for _, c := range cp.CompletionsOf(id) {
		if c.Status != api.TaskSuccess {
			t.Fatalf("a redelivered %s was executed again: %+v", id, c.Error)
		}
	}
}

// waitDisks waits for the guest's disk list to satisfy ok.
func waitDisks(t *testing.T, con interface {
	WaitFor(context.Context, string) (string, error)
	Text() string
}, ok func(line string) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	for {
		line, err := con.WaitFor(ctx, "OTHERIX-GUEST disks ")
		if err != nil {
			t.Fatalf("waiting for the guest's disks: %v\n%s", err, con.Text())
		}
		if ok(line) {
			return
		}
	}
}
