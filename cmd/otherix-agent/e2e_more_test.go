package main

import (
	debugbuildinfo "debug/buildinfo"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/buildinfo"
)

func matchRE(re, s string) (bool, error) { return regexp.MatchString(re, s) }

// TestCLIErrors: every error code of the API surface, through the CLI.
func TestCLIErrors(t *testing.T) {
	t.Parallel()
	a := startAgent(t, "")
	img := a.image
	a.fails(1, "validation_failed", "vm", "create", "0f8fad5b-d9cb-469f-a165-70867728950e", "--image-url", img, "--arch", "amd64")
	a.fails(1, "validation_failed", "vm", "get", "0f8fad5b-d9cb-469f-a165-70867728950e")
	a.fails(1, "pool_not_on_node", "vm", "create", "x1", "--image-url", img, "--arch", "amd64", "--node", "elsewhere")
	a.fails(1, "pool_not_found", "vm", "create", "x1", "--image-url", img, "--arch", "amd64", "--pool", "nope")
	a.fails(1, "network_not_found", "vm", "create", "x1", "--image-url", img, "--arch", "amd64", "--network", "nope")
	a.fails(1, "not_found", "vm", "start", "ghost")
	a.fails(1, "not_found", "vm", "get", "ghost")
	a.fails(1, "validation_failed", "vm", "create", "x1", "--image-url", img, "--arch", "amd64", "--vcpus", "129")
	a.fails(1, "validation_failed", "vm", "create", "x1", "--image-url", img, "--arch", "amd64", "--memory-mb", "64")
	a.fails(1, "validation_failed", "vm", "create", "bad_name", "--image-url", img, "--arch", "amd64")
	// Flags that exclude each other are refused by the CLI and by the API.
	a.fails(1, "no-cloud-init", "vm", "create", "x1", "--image-url", img, "--arch", "amd64", "--no-cloud-init", "--user-data", "-")
	a.fails(1, "firmware", "vm", "create", "x1", "--image-url", img, "--arch", "amd64", "--firmware", "bios", "--firmware-id", "0f8fad5b-d9cb-469f-a165-70867728950e")
	for _, body := range []string{
		`{"name":"x1","image_url":"` + img + `","arch":"amd64","no_cloud_init":true,"user_data":"#cloud-config\n{}"}`,
		`{"name":"x1","image_url":"` + img + `","arch":"amd64","firmware":"bios","firmware_id":"0f8fad5b-d9cb-469f-a165-70867728950e"}`,
		`{"name":"x1","image_url":"` + img + `","arch":"amd64","bogus":1}`,
		`{"name":"x1","image_url":"` + img + `","arch":"amd64","user_data":"not cloud config"}`,
	} {
		code, env := postRaw(t, a.url+"/v1/vms", body)
		if code != 400 || env.Error.Code != "validation_failed" {
			t.Errorf("POST %s: %d %+v", body, code, env)
		}
	}
	// A task that fails: --wait prints "task <id> failed: <code>: <message>" and exits 1.
	r := a.fails(1, "failed: image_checksum_mismatch:", "vm", "create", "x2", "--image-url", img, "--arch", "amd64",
		"--image-sha256", strings.Repeat("0", 64), "--wait")
	if !regexp.MustCompile(`task [0-9a-f-]{36} failed: image_checksum_mismatch: `).MatchString(r.stderr) {
		t.Errorf("failed task line: %q", r.stderr)
	}
	a.fails(1, "failed: image_download_failed:", "vm", "create", "x3", "--image-url", img+".missing", "--arch", "amd64", "--wait")
	a.fails(1, "not_found", "vm", "get", "x2")

	// Volumes: create, list, refuse a second of the same name, delete.
	a.ok("volume", "create", "vol-1", "--size-gib", "1")
	a.fails(1, "conflict", "volume", "create", "vol-1", "--size-gib", "1")
	if r := a.ok("volume", "list"); !strings.Contains(r.stdout, "vol-1") {
		t.Fatalf("volume list:\n%s", r.stdout)
	}
	a.ok("volume", "delete", "vol-1")
	a.fails(1, "not_found", "volume", "delete", "vol-1")

	// The firmware catalogue, per arch.
	r = a.ok("firmware", "list")
	for _, want := range []string{"bios", "uefi", "uefi-secure", "amd64", "arm64"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("firmware list lacks %s:\n%s", want, r.stdout)
		}
	}
	a.fails(1, "validation_failed", "vm", "create", "x4", "--image-url", img, "--arch", "amd64", "--firmware", "nope")
}

// TestNoDefaultPool: with no default pool, a create naming none is refused.
func TestNoDefaultPool(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	a := startAgent(t, "pools:\n  p1: {path: "+dir+"}\ndefault_pool: \"\"\n")
	a.fails(1, "default_pool_not_set", "vm", "create", "x1", "--image-url", a.image, "--arch", "amd64")

	// Images can be pulled ahead of creates into a named pool.
	r := a.ok("image", "pull", a.image, "--pool", "p1")
	list := a.ok("image", "list", "--pool", "p1").stdout
	if !strings.Contains(list, a.image) && !strings.Contains(list, "qcow2") {
		t.Fatalf("image list after pull:\n%s\n(pull said %s)", list, r.stdout)
	}
	m := scrape(t, a.url)
	found := false
	for k, v := range m {
		if strings.HasPrefix(k, "otherix_agent_image_ingest_bytes_total") && v > 0 {
			found = true
		}
	}
	if !found {
		t.Errorf("no image ingest bytes in /metrics")
	}
}

// TestManifestPaginationRestart: vm get -o yaml round-trips through
// create -f; list paginates; a SIGKILLed agent comes back, re-adopts the
// running VMs with the same PIDs and keeps its tasks.
func TestManifestPaginationRestart(t *testing.T) {
	t.Parallel()
	a := startAgent(t, "")
	a.ok("vm", "create", "m-1", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1", "--memory-mb", "256", "--wait")
	manifest := a.ok("vm", "get", "m-1", "-o", "yaml").stdout
	if strings.Contains(manifest, "status") || !strings.Contains(manifest, "name: m-1") {
		t.Fatalf("manifest:\n%s", manifest)
	}
	path := filepath.Join(t.TempDir(), "m2.yaml")
	os.WriteFile(path, []byte(strings.Replace(manifest, "name: m-1", "name: m-2", 1)), 0o600)
	r := a.ok("create", "-f", path, "--wait")
	if !strings.Contains(r.stdout, "vm running task=") {
		t.Fatalf("create -f: %q", r.stdout)
	}
	v1, v2 := a.getVM("m-1"), a.getVM("m-2")
	if v1.ImageSHA256 != v2.ImageSHA256 || v1.VCPUs != v2.VCPUs || v1.MemoryMB != v2.MemoryMB || v1.DiskGiB != v2.DiskGiB || v1.CloudInit != v2.CloudInit {
		t.Fatalf("round trip differs:\n%+v\n%+v", v1, v2)
	}

	// Pagination: one per page.
	r = a.ok("vm", "list", "--limit", "1", "-o", "json")
	var page struct {
		VMs        []api.VM `json:"vms"`
		NextCursor string   `json:"next_cursor"`
	}
	json.Unmarshal([]byte(r.stdout), &page)
	if len(page.VMs) != 1 || page.VMs[0].Name != "m-1" {
		t.Fatalf("page 1: %s", r.stdout)
	}
	r = a.ok("vm", "list", "--limit", "1", "--cursor", "m-1")
	if !strings.Contains(r.stdout, "m-2") || strings.Contains(r.stdout, "m-1") {
		t.Fatalf("page 2:\n%s", r.stdout)
	}
	r = a.ok("vm", "list", "--status", "stopped")
	if strings.Contains(r.stdout, "m-1") {
		t.Fatalf("status filter:\n%s", r.stdout)
	}

	// vm set on a running VM: pending until the next start.
	r = a.ok("vm", "set", "m-1", "--vcpus", "2", "--memory-mb", "320", "--autostart=false")
	if !strings.Contains(r.stdout, "vm m-1 vcpus=1 memory_mb=256 autostart=false restart_policy=on-failure vnc_enabled=false pending_changes(next start): vcpus=2 memory_mb=320") {
		t.Fatalf("vm set: %q", r.stdout)
	}
	a.fails(1, "validation_failed", "vm", "set", "m-1", "--vcpus", "0")
	if code, env := patchRaw(t, a.url+"/v1/vms/m-1", `{"cpu":"2"}`); code != 400 || env.Error.Code != "validation_failed" || !strings.Contains(env.Error.Message, "cpu") {
		t.Fatalf("PATCH with an unknown field: %d %+v", code, env)
	}

	// Hot-plug through the CLI: a volume attached to the running VM shows
	// in the guest and goes away when detached; the seed CD-ROM ejects.
	a.ok("volume", "create", "hv", "--size-gib", "1")
	con := a.console("m-1")
	waitConsole(t, con, "OTHERIX-GUEST ready")
	if r := a.ok("vm", "attach-disk", "m-1", "hv"); !strings.Contains(r.stdout, "vm m-1 disk hv attached") {
		t.Fatalf("attach-disk: %q", r.stdout)
	}
	waitConsole(t, con, "vdb:1073741824:0")
	a.fails(1, "conflict", "volume", "delete", "hv")
	a.ok("vm", "detach-disk", "m-1", "hv")
	for line := waitConsole(t, con, "OTHERIX-GUEST disks"); strings.Contains(line, "vdb:"); line = waitConsole(t, con, "OTHERIX-GUEST disks") {
	}
	a.ok("volume", "delete", "hv")
	if r := a.ok("vm", "cdrom", "m-1", "0"); !strings.Contains(r.stdout, "ejected") {
		t.Fatalf("cdrom eject: %q", r.stdout)
	}
	a.fails(1, "validation_failed", "vm", "screenshot", "m-1", filepath.Join(t.TempDir(), "s.png")) // no display

	// Crash the agent; VMs keep running and are re-adopted.
	a.cmd.Process.Signal(syscall.SIGKILL)
	a.cmd.Wait()
	for _, v := range []api.VM{v1, v2} {
		if err := syscall.Kill(v.QEMUPID, 0); err != nil {
			t.Fatalf("qemu of %s died with the agent: %v", v.Name, err)
		}
	}
	a.start()
	for _, v := range []api.VM{v1, v2} {
		got := a.getVM(v.Name)
		if got.Status != "running" || got.QEMUPID != v.QEMUPID {
			t.Fatalf("after restart %s: %+v, want pid %d", v.Name, got, v.QEMUPID)
		}
	}
	// The tasks survived too.
	code, _ := getRaw(t, a.url+"/v1/tasks/"+v1.LastTask.ID)
	if code != 200 {
		t.Fatalf("task %s lost across restart: %d", v1.LastTask.ID, code)
	}
	a.ok("vm", "delete", "m-1", "--force", "--wait")
	a.ok("vm", "delete", "m-2", "--force", "--wait")
}

// TestReloadOnSIGHUP: SIGHUP applies the new log level and names the keys
// that need a restart; a bad file is rejected and the agent keeps running.
func TestReloadOnSIGHUP(t *testing.T) {
	t.Parallel()
	a := startAgent(t, "")
	b, _ := os.ReadFile(a.cfgPath)
	os.WriteFile(a.cfgPath, append(b, []byte("log:\n  level: debug\nlimits:\n  concurrent_creates: 5\n")...), 0o600)
	a.cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, a, "reload: log level changed")
	waitLog(t, a, `"keys":["limits"]`)
	os.WriteFile(a.cfgPath, []byte("bogus: 1\n"), 0o600)
	a.cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, a, "reload: config rejected")
	a.ok("vm", "list")
}

// TestListenBeyondLoopbackNeedsTLS: the standalone API refuses to start on
// a non-loopback address without TLS and a token.
func TestListenBeyondLoopbackNeedsTLS(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "agent.yaml")
	os.WriteFile(cfg, []byte("data_dir: "+dir+"/data\nrun_dir: "+dir+"/run\nlisten: {api: \"0.0.0.0:0\", socket: \"\", metrics: \"\"}\n"), 0o600)
	out, err := exec.Command(filepath.Join(binDir, "otherix-agent"), "--standalone", "--config", cfg).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "TLS") {
		t.Fatalf("agent on 0.0.0.0 without TLS: %v\n%s", err, out)
	}
}

// TestLoopbackNeedsToken: on loopback too the TCP API asks for the token
// the agent keeps in <data_dir>/api.token (0600, the same across
// restarts); the CLI without one is told where it is.
func TestLoopbackNeedsToken(t *testing.T) {
	t.Parallel()
	a := startAgentSocket(t, nil, "", true)
	fi, err := os.Stat(filepath.Join(a.dir, "api.token"))
	if err != nil || fi.Mode().Perm() != 0o600 || len(a.token) < 32 {
		t.Fatalf("api.token: %v %v, token of %d characters", err, fi, len(a.token))
	}
	resp, err := http.Get(a.url + "/v1/vms")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /v1/vms without a token: %d, want 401", resp.StatusCode)
	}
	if code, _ := getRaw(t, a.url+"/v1/vms"); code != 200 {
		t.Errorf("GET /v1/vms with the token: %d", code)
	}
	cmd := exec.Command(filepath.Join(binDir, "otherix"), "vm", "list")
	cmd.Env = append(os.Environ(), "OTHERIX_URL="+a.url, "OTHERIX_TOKEN=")
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "unauthorized") || !strings.Contains(string(out), "api.token") {
		t.Errorf("otherix without a token: %v\n%s", err, out)
	}
	// The unix socket (0660) asks for no token: its file mode guards it.
	if fi, err := os.Stat(a.socket); err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket %s: %v %v, want mode 0660", a.socket, fi, err)
	}
	cmd = exec.Command(filepath.Join(binDir, "otherix"), "vm", "list", "--server", "unix://"+a.socket)
	cmd.Env = append(os.Environ(), "OTHERIX_TOKEN=")
	if out, err := cmd.CombinedOutput(); err != nil || !strings.HasPrefix(string(out), "NAME") {
		t.Errorf("otherix over the unix socket without a token: %v\n%s", err, out)
	}
	before := a.token
	a.kill()
	a.start()
	if a.token != before {
		t.Errorf("the token changed across a restart")
	}
	a.ok("vm", "list")
}

// TestVersions: both binaries say their module version and VCS revision.
func TestVersions(t *testing.T) {
	t.Parallel()
	// --version prints the token internal/buildinfo makes from the build
	// info stamped into the binary (in a git clone, -buildvcs=auto: a
	// pseudo-version from the commit), a semantic version with no space.
	semver := regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$`)
	for _, args := range [][]string{{"otherix-agent", "--version"}, {"otherix-agent", "version"}, {"otherix", "--version"}, {"otherix", "version"}} {
		bin := filepath.Join(binDir, args[0])
		bi, err := debugbuildinfo.ReadFile(bin)
		if err != nil {
			t.Fatal(err)
		}
		want := buildinfo.FromBuildInfo(bi)
		out, err := exec.Command(bin, args[1:]...).CombinedOutput()
		f := strings.Fields(string(out))
		if err != nil || len(f) < 4 || f[0] != args[0] || f[1] != want.Version || !semver.MatchString(f[1]) || f[2] != "revision" || f[3] != want.Revision {
			t.Errorf("%v: %v %q, want version %s revision %s", args, err, out, want.Version, want.Revision)
		}
	}
}
