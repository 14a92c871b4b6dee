package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
	"github.com/otherix/otherix-agent/agent/testguest"
)

// These tests run otherix-agent as production hosts do: from a config file
// with control_plane.url on https (a private CA, a 0600 token file),
// against a control plane on real HTTP (cptest, the protocol's one server
// side with fault injection), with the real test guest.

// cpHTTPS is the fake control plane served over TLS on a fixed loopback
// address, so that it can go away and come back where the agent looks.
type cpHTTPS struct {
	t    *testing.T
	cp   *cptest.Server
	addr string
	tls  *tls.Config
	srv  *http.Server
}

func (c *cpHTTPS) start() {
	c.t.Helper()
	addr := c.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		c.t.Fatal(err)
	}
	c.addr = ln.Addr().String()
	c.srv = &http.Server{Handler: c.cp, TLSConfig: c.tls, ErrorLog: nil}
	go c.srv.Serve(tls.NewListener(ln, c.tls))
}

// stop ends the server and every connection: the control plane is gone.
func (c *cpHTTPS) stop() { c.srv.Close() }

// newCA makes a private CA and a server certificate for 127.0.0.1 signed
// by it, and writes the CA's PEM to dir/ca.pem.
func newCA(t *testing.T, dir string) (caFile string, cert tls.Certificate) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "otherix test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "control plane"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caFile = filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		t.Fatal(err)
	}
	return caFile, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// writeToken replaces the token file as an operator rotates it: a new
// file renamed over the old one.
func writeToken(t *testing.T, path, token string) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// startCPAgent starts otherix-agent (no --standalone) from a config whose
// control_plane points at c.
func startCPAgent(t *testing.T, c *cpHTTPS, caFile, tokenFile, extraYAML string) *standaloneAgent {
	t.Helper()
	run, err := os.MkdirTemp("/tmp", "oxc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	a := &standaloneAgent{t: t, dir: t.TempDir(), log: &syncBuffer{}}
	a.cfgPath = filepath.Join(t.TempDir(), "agent.yaml")
	cfg := fmt.Sprintf("node_name: hv-e2e\ndata_dir: %s\nrun_dir: %s\nlisten:\n  api: 127.0.0.1:0\n  socket: \"\"\n  metrics: \"\"\n  forwards: 127.0.0.1\n"+
		"control_plane:\n  url: https://%s\n  token_file: %s\n  ca_file: %s\nqemu:\n  stop_timeout: 60s\n%s",
		a.dir, run, c.addr, tokenFile, caFile, extraYAML)
	if err := os.WriteFile(a.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	a.cmd = exec.Command(filepath.Join(binDir, "otherix-agent"), "--config", a.cfgPath)
	a.cmd.Stderr = a.log
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		a.kill()
		a.killVMs()
		if t.Failed() {
			t.Logf("agent log tail:\n%s", tail(a.logText(), 6000))
		}
	})
	return a
}

// cpTask is one task type run against the real guest through the control
// plane: its spec, and what its completion must show. Steps run in order
// on one VM; a type added to the protocol gets a row here.
type cpTask struct {
	name  string
	typ   string
	vm    bool // the task names the VM
	spec  any
	check func(t *testing.T, c cptest.Completion)
}

func TestControlPlaneAgent(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	dir := t.TempDir()
	caFile, cert := newCA(t, dir)
	tokenFile := filepath.Join(dir, "token")
	writeToken(t, tokenFile, "token-one-0123456789")
	cp := &cptest.Server{Token: "token-one-0123456789", LeaseTTL: 60 * time.Second, HeartbeatInterval: 2 * time.Second}
	c := &cpHTTPS{t: t, cp: cp, tls: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}}
	c.start()
	t.Cleanup(func() { c.stop() })

	media := t.TempDir()
	if err := os.WriteFile(filepath.Join(media, "blank.iso"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	a := startCPAgent(t, c, caFile, tokenFile, fmt.Sprintf("devices:\n  allowed_paths: [%s]\n", media))
	images := httptest.NewServer(http.FileServer(http.Dir(testguest.Dir(t))))
	t.Cleanup(images.Close)

	// Registration over https with the private CA: a version token a
	// control plane can compare, in the body and the User-Agent.
	if err := cp.WaitFor(ctx, func() bool { return len(cp.Registrations()) > 0 }); err != nil {
		t.Fatalf("no registration: %v", err)
	}
	reg := cp.Registrations()[0]
	token := regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$`)
	if reg.Node.Name != "hv-e2e" || !token.MatchString(reg.Node.AgentVersion) {
		t.Errorf("registration: node %q agent_version %q", reg.Node.Name, reg.Node.AgentVersion)
	}
	if ua := cp.UserAgent(); ua != "otherix-agent/"+reg.Node.AgentVersion+" (protocol 1; linux/amd64)" {
		t.Errorf("User-Agent %q", ua)
	}

	vmName, vmUUID := "cp-1", uuid.NewString()
	fwdPort := netdevtest.FreePort(t)
	var digest string
	var pid int
	// The guest's serial console, read from the agent's data dir: the
	// guest prints its disk list there whenever it changes.
	var con *testguest.Console
	t.Cleanup(func() {
		if con != nil {
			con.Close()
		}
	})
	running := func(t *testing.T, c cptest.Completion) {
		if c.VM == nil || c.VM.Status != api.StatusRunning || c.VM.QEMUPID == 0 {
			t.Fatalf("vm %+v", c.VM)
		}
	}
	steps := []cpTask{
		{name: "pull", typ: api.TaskImagePull, spec: api.PullImage{URL: images.URL + "/guest.qcow2"}, check: func(t *testing.T, c cptest.Completion) {
			if c.Output == nil || c.Output.Image == nil || len(c.Output.Image.Digest) != 64 {
				t.Fatalf("output %+v", c.Output)
			}
			digest = c.Output.Image.Digest
		}},
		{name: "volume", typ: api.TaskCreateVolume, spec: api.CreateVolume{Name: "vol-1", SizeGiB: 1}, check: func(t *testing.T, c cptest.Completion) {
			if c.Output == nil || c.Output.Volume == nil || c.Output.Volume.Name != "vol-1" {
				t.Fatalf("output %+v", c.Output)
			}
		}},
		{name: "create", typ: api.TaskCreate, vm: true, spec: api.CreateVM{Name: vmName, ImageURL: images.URL + "/guest.qcow2", Arch: "amd64",
			VCPUs: 1, MemoryMB: 256, VNCEnabled: true, VNCPassword: "pw-e2e-1"}, check: func(t *testing.T, c cptest.Completion) {
			running(t, c)
			pid = c.VM.QEMUPID
			con = testguest.OpenConsole(filepath.Join(a.dir, "vms", vmUUID, "console.log"))
		}},
		{name: "console", typ: api.TaskConsoleTail, vm: true, spec: api.ConsoleTailSpec{Bytes: 4096}, check: func(t *testing.T, c cptest.Completion) {
			if c.Output == nil || c.Output.Console == nil || c.Output.Console.Offset > c.Output.Console.Size {
				t.Fatalf("output %+v", c.Output)
			}
		}},
		{name: "screenshot", typ: api.TaskScreenshot, vm: true, check: func(t *testing.T, c cptest.Completion) {
			if c.Output == nil || c.Output.Screenshot == nil || c.Output.Screenshot.Format != "png" || len(c.Output.Screenshot.Data) == 0 {
				t.Fatalf("output %+v", c.Output)
			}
		}},
		{name: "pause", typ: api.TaskPause, vm: true, check: func(t *testing.T, c cptest.Completion) {
			if c.VM == nil || c.VM.Status != api.StatusPaused {
				t.Fatalf("vm %+v", c.VM)
			}
		}},
		{name: "resume", typ: api.TaskResume, vm: true, check: running},
		{name: "reset", typ: api.TaskReset, vm: true, check: func(t *testing.T, c cptest.Completion) {
			running(t, c)
			if c.VM.QEMUPID != pid {
				t.Errorf("reset changed the pid %d -> %d", pid, c.VM.QEMUPID)
			}
		}},
		{name: "update", typ: api.TaskUpdate, vm: true, spec: api.UpdateVM{Autostart: ptr(true)}, check: func(t *testing.T, c cptest.Completion) {
			if c.VM == nil || !c.VM.Autostart {
				t.Fatalf("vm %+v", c.VM)
			}
		}},
		{name: "attach", typ: api.TaskAttachDisk, vm: true, spec: api.Device{DevType: "DISK", Source: "vol-1", StoragePool: "default"}, check: func(t *testing.T, c cptest.Completion) {
			if c.VM == nil || !hasDisk(c.VM, "vol-1") {
				t.Fatalf("vm devices %+v", c.VM)
			}
			// The guest (rebooted by reset just before) binds the
			// hot-plugged disk: only then may it be unplugged, an unplug
			// request before the guest has bound the device is ignored.
			waitGuestDisks(t, con, func(l string) bool { return strings.Contains(l, "vdb:1073741824:") })
		}},
		{name: "detach", typ: api.TaskDetachDisk, vm: true, spec: api.Device{Source: "vol-1", StoragePool: "default"}, check: func(t *testing.T, c cptest.Completion) {
			if c.VM == nil || hasDisk(c.VM, "vol-1") {
				t.Fatalf("vm devices %+v", c.VM)
			}
			waitGuestDisks(t, con, func(l string) bool { return !strings.Contains(l, "vdb:") })
		}},
		{name: "eject", typ: api.TaskEjectMedium, vm: true, spec: api.MediumSpec{Index: 0}, check: running},
		{name: "medium", typ: api.TaskChangeMedium, vm: true, spec: api.MediumSpec{Index: 0, Source: filepath.Join(media, "blank.iso")}, check: running},
		{name: "forward", typ: api.TaskAddForward, vm: true, spec: api.Device{DevType: "PROXY", SourceProto: "tcp", SourcePort: fwdPort, DestProto: "tcp", DestPort: 22},
			check: func(t *testing.T, c cptest.Completion) {
				if c.VM == nil || len(c.VM.Forwards) != 1 || c.VM.Forwards[0].SourcePort != fwdPort {
					t.Fatalf("vm forwards %+v", c.VM)
				}
			}},
		{name: "unforward", typ: api.TaskRemoveForward, vm: true, spec: api.Device{SourceProto: "tcp", SourcePort: fwdPort}, check: func(t *testing.T, c cptest.Completion) {
			if c.VM == nil || len(c.VM.Forwards) != 0 {
				t.Fatalf("vm forwards %+v", c.VM)
			}
		}},
		{name: "reboot", typ: api.TaskReboot, vm: true, check: func(t *testing.T, c cptest.Completion) {
			running(t, c)
			if c.VM.QEMUPID == pid {
				t.Errorf("reboot kept the pid %d", pid)
			}
			pid = c.VM.QEMUPID
		}},
		{name: "stop", typ: api.TaskStop, vm: true, spec: api.StopSpec{}, check: stoppedVM},
		{name: "start", typ: api.TaskStart, vm: true, check: running},
		{name: "poweroff", typ: api.TaskPoweroff, vm: true, check: stoppedVM},
		{name: "delete", typ: api.TaskDelete, vm: true},
		{name: "unvolume", typ: api.TaskDeleteVolume, spec: api.VolumeRef{Name: "vol-1"}},
		{name: "evict", typ: api.TaskDeleteImage, spec: func() any { return api.ImageRef{Digest: digest} }},
	}

	// run is called from the subtests: failures go to the subtest's t,
	// never to the parent's (FailNow on a parent from a subtest).
	run := func(t *testing.T, i int, s cpTask) (string, cptest.Completion) {
		t.Helper()
		id := fmt.Sprintf("task-%02d-%s", i, s.name)
		task := protocol.Task{ID: id, Type: s.typ}
		if s.vm {
			task.VMName, task.VMUUID = vmName, vmUUID
		}
		spec := s.spec
		if f, ok := spec.(func() any); ok {
			spec = f()
		}
		if spec != nil {
			task.Spec, _ = json.Marshal(spec)
		}
		cp.Enqueue(task)
		return id, complete(t, ctx, cp, a, id)
	}
	for i, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			switch s.typ {
			case api.TaskCreate:
				// The control plane goes away while the create runs and
				// comes back: the outcome is delivered once it is back.
				id := fmt.Sprintf("task-%02d-%s", i, s.name)
				spec, _ := json.Marshal(s.spec)
				cp.Enqueue(protocol.Task{ID: id, Type: s.typ, VMName: vmName, VMUUID: vmUUID, Spec: spec})
				if err := cp.WaitFor(ctx, func() bool { return cp.Leased(id) }); err != nil {
					t.Fatal(err)
				}
				// Leased is recorded before the answer is written: stopping
				// now could drop the answer, and the agent would never get
				// the task. Stop once the agent has started it.
				if err := waitLogLine(ctx, a, `"task started"`, `"task":"`+id+`"`); err != nil {
					t.Fatalf("the agent never started %s: %v", id, err)
				}
				c.stop()
				// The create finishes meanwhile: the agent tries to deliver
				// its outcome and cannot.
				if err := waitLogCtx(ctx, a, `"op":"complete"`); err != nil {
					t.Fatalf("no completion attempted while the control plane was away: %v", err)
				}
				c.start()
				got := complete(t, ctx, cp, a, id)
				s.check(t, got)
				return
			case api.TaskPause:
				// The token is rotated: the agent re-reads its file after
				// a 401 and goes on.
				writeToken(t, tokenFile, "token-two-9876543210")
				cp.SetToken("token-two-9876543210")
			}
			id, got := run(t, i, s)
			if s.check != nil {
				s.check(t, got)
			}
			if s.typ == api.TaskReboot {
				// Delivered again after it finished (the control plane
				// lost the acknowledgement): not run again, the stored
				// outcome is re-sent.
				cp.Enqueue(protocol.Task{ID: id, Type: s.typ, VMName: vmName, VMUUID: vmUUID})
				if err := cp.WaitFor(ctx, func() bool { return len(cp.CompletionsOf(id)) >= 2 }); err != nil {
					t.Fatal(err)
				}
				again := cp.CompletionsOf(id)[1]
				if again.Status != api.TaskSuccess || again.VM == nil || again.VM.QEMUPID != pid || again.Attempt != 1 {
					t.Errorf("redelivered reboot: %+v", again)
				}
			}
		})
		if t.Failed() {
			return
		}
	}
	// Each task took effect once: one completion each, but the
	// redelivered one.
	for i, s := range steps {
		id := fmt.Sprintf("task-%02d-%s", i, s.name)
		n := 0
		for _, c := range cp.CompletionsOf(id) {
			if !c.Duplicate {
				n++
			}
		}
		want := 1
		if s.typ == api.TaskReboot {
			want = 2 // queued again after it finished: both completions are news to the fake
		}
		if n != want {
			t.Errorf("%s: %d completions, want %d", id, n, want)
		}
	}
}

// waitLogCtx waits until the agent's log has substr (the agent is another
// process: its log is what it tells).
func waitLogCtx(ctx context.Context, a *standaloneAgent, substr string) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(a.logText(), substr) {
		select {
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// waitLogLine waits until one line of the agent's log has every one of
// subs.
func waitLogLine(ctx context.Context, a *standaloneAgent, subs ...string) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, line := range strings.Split(a.logText(), "\n") {
			if containsAll(line, subs) {
				return nil
			}
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

// complete waits for a task's first completion and wants it successful.
func complete(t *testing.T, ctx context.Context, cp *cptest.Server, a *standaloneAgent, id string) cptest.Completion {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	c, err := cp.WaitCompletion(wctx, id)
	if err != nil {
		t.Fatalf("%s: %v", id, err)
	}
	if c.Status != api.TaskSuccess {
		t.Fatalf("%s: %s %+v", id, c.Status, c.Error)
	}
	if c.Node != "hv-e2e" || c.LeaseID == "" {
		t.Errorf("%s: node %q lease %q", id, c.Node, c.LeaseID)
	}
	return c
}

// waitGuestDisks waits for a disk list on the guest's console that ok
// accepts (lines "OTHERIX-GUEST disks name:size:ro ...", printed at boot
// and on every change).
func waitGuestDisks(t *testing.T, con *testguest.Console, ok func(line string) bool) {
	t.Helper()
	if con == nil {
		t.Fatal("no console: the create step did not run")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	for {
		line, err := con.WaitFor(ctx, "OTHERIX-GUEST disks")
		if err != nil {
			t.Fatalf("waiting for the guest's disks: %v\n%s", err, tail(con.Text(), 4000))
		}
		if ok(line) {
			return
		}
	}
}

func stoppedVM(t *testing.T, c cptest.Completion) {
	if c.VM == nil || c.VM.Status != api.StatusStopped {
		t.Fatalf("vm %+v", c.VM)
	}
}

func hasDisk(v *api.VM, source string) bool {
	for _, d := range v.Devices {
		if d.DevType == "DISK" && strings.Contains(d.Source, source) {
			return true
		}
	}
	return false
}

func ptr[T any](v T) *T { return &v }
