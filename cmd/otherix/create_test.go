package main

import (
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
)

const imageURL = "https://cloud-images.example/noble-arm64.img"

func TestVMCreateFlagPlacement(t *testing.T) {
	want := api.CreateVM{
		Name: "web-1", ImageURL: imageURL, Arch: "arm64", ImageSHA256: strings.Repeat("c", 64),
		Firmware: "uefi", Format: "qcow2", DiskGiB: 10, Pool: "fast", Node: "node-1", Network: "br0",
		VCPUs: 4, MemoryMB: 4096,
	}
	flags := []string{"--image-url", imageURL, "--arch=arm64", "--image-sha256", want.ImageSHA256,
		"--firmware", "uefi", "--format", "qcow2", "--disk-gib", "10", "--pool", "fast", "--node", "node-1",
		"--network", "br0", "--vcpus", "4", "-memory-mb", "4096"}
	for name, args := range map[string][]string{
		"after":  append([]string{"vm", "create", "web-1"}, flags...),
		"before": append(append([]string{"vm", "create"}, flags...), "web-1"),
		"middle": append(append(append([]string{"vm", "create"}, flags[:3]...), "web-1"), flags[3:]...),
	} {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t)
			r := h.must(args...)
			if got, want := r.stdout, "created task=task-1 status=pending\n"; got != want {
				t.Errorf("stdout = %q, want %q", got, want)
			}
			if r.stderr != "" {
				t.Errorf("stderr = %q, want nothing", r.stderr)
			}
			got := h.api.Creates(t)
			if len(got) != 1 || !reflect.DeepEqual(got[0], want) {
				t.Errorf("create bodies = %+v, want [%+v]", got, want)
			}
		})
	}
}

func TestVMCreateDefaults(t *testing.T) {
	h := newHarness(t)
	h.must("vm", "create", "web-1", "--image-url", imageURL, "--arch", "amd64")
	want := api.CreateVM{Name: "web-1", ImageURL: imageURL, Arch: "amd64", VCPUs: 2, MemoryMB: 2048}
	if got := h.api.Creates(t); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Errorf("create bodies = %+v, want [%+v]", got, want)
	}
}

func TestVMCreateWait(t *testing.T) {
	h := newHarness(t)
	r := h.must("vm", "create", "web-1", "--image-url", imageURL, "--arch", "arm64", "--wait")
	if want := "created task=task-1 status=pending\nvm running task=task-1\n"; r.stdout != want {
		t.Errorf("stdout = %q, want %q", r.stdout, want)
	}
	// The fake finishes a task on its third poll: three polls, three dots.
	if want := "...\n"; r.stderr != want {
		t.Errorf("stderr = %q, want %q", r.stderr, want)
	}
	if v, _ := h.api.VM("web-1"); v.Status != api.StatusRunning {
		t.Errorf("vm status = %q, want running", v.Status)
	}
}

func TestVMCreateWaitFailedOrCancelled(t *testing.T) {
	for _, tc := range []struct {
		name       string
		script     func(*fakeAPI)
		wantStderr string
	}{
		{"failed", func(f *fakeAPI) {
			f.FailNext = &api.Error{Code: "image_checksum_mismatch", Message: "sha256 of the image is 00ff, want abcd"}
		}, "...\ntask task-1 failed: image_checksum_mismatch: sha256 of the image is 00ff, want abcd\n"},
		{"cancelled", func(f *fakeAPI) { f.CancelNext = true }, "...\ntask task-1 cancelled\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			tc.script(h.api)
			r := h.run("", "vm", "create", "web-1", "--image-url", imageURL, "--arch", "arm64", "--wait")
			if r.code != exitFailure {
				t.Errorf("exit = %d, want %d", r.code, exitFailure)
			}
			if want := "created task=task-1 status=pending\n"; r.stdout != want {
				t.Errorf("stdout = %q, want %q", r.stdout, want)
			}
			if r.stderr != tc.wantStderr {
				t.Errorf("stderr = %q, want %q", r.stderr, tc.wantStderr)
			}
		})
	}
}

func TestWaitTimeout(t *testing.T) {
	h := newHarness(t)
	h.api.PollsToFinish = 1 << 30
	r := h.run("", "vm", "create", "web-1", "--image-url", imageURL, "--arch", "arm64", "--wait", "--wait-timeout", "30ms")
	if r.code != exitTimeout {
		t.Fatalf("exit = %d, want %d (stderr %q)", r.code, exitTimeout, r.stderr)
	}
	if want := "created task=task-1 status=pending\n"; r.stdout != want {
		t.Errorf("stdout = %q, want %q", r.stdout, want)
	}
	if !strings.Contains(r.stderr, "error: timed out after 30ms waiting for task task-1 (status running)") {
		t.Errorf("stderr = %q, want the timeout message", r.stderr)
	}
	if !strings.HasPrefix(r.stderr, ".") {
		t.Errorf("stderr = %q, want dots first", r.stderr)
	}
}

func TestWaitRetriesTransientErrors(t *testing.T) {
	h := newHarness(t)
	h.api.TaskErrors = 2 // two 503 answers without an envelope, then the task
	r := h.must("vm", "create", "web-1", "--image-url", imageURL, "--arch", "arm64", "--wait")
	if want := "created task=task-1 status=pending\nvm running task=task-1\n"; r.stdout != want {
		t.Errorf("stdout = %q, want %q", r.stdout, want)
	}
	if want := ".....\n"; r.stderr != want {
		t.Errorf("stderr = %q, want %q (2 failed polls + 3 polls)", r.stderr, want)
	}
}

func TestWaitFinalErrorStops(t *testing.T) {
	h := newHarness(t)
	var out, errb strings.Builder
	c := &cli{stdout: &out, stderr: &errb, env: func(k string) string { return h.env[k] }}
	cl, err := c.client()
	if err != nil {
		t.Fatal(err)
	}
	// A 404 is final: no retry until the timeout.
	err = c.waitTask(t.Context(), cl, &api.Task{ID: "no-such-task", Status: api.TaskPending}, "running", defaultWaitTimeout)
	if err == nil || err.Error() != "not_found: task not found" {
		t.Errorf("waitTask = %v, want not_found: task not found", err)
	}
	if errb.String() != ".\n" || out.String() != "" {
		t.Errorf("stdout %q stderr %q, want one dot on stderr", out.String(), errb.String())
	}
}

func TestVMCreateCloudInitInputs(t *testing.T) {
	dir := t.TempDir()
	ud := filepath.Join(dir, "user-data.yaml")
	nc := filepath.Join(dir, "network-config.yaml")
	const userData = "#cloud-config\nhostname: web-1\n"
	const netConfig = "version: 2\nethernets: {eth0: {dhcp4: true}}\n"
	for _, p := range []struct{ path, data string }{{ud, userData}, {nc, netConfig}} {
		if err := os.WriteFile(p.path, []byte(p.data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name   string
		stdin  string
		args   []string
		ud, nc string
	}{
		{"files", "", []string{"--user-data", ud, "--network-config", nc}, userData, netConfig},
		{"user-data stdin", userData, []string{"--user-data", "-", "--network-config", nc}, userData, netConfig},
		{"network-config stdin", netConfig, []string{"--network-config", "-"}, "", netConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			args := append([]string{"vm", "create", "web-1", "--image-url", imageURL, "--arch", "amd64"}, tc.args...)
			if r := h.run(tc.stdin, args...); r.code != 0 {
				t.Fatalf("exit %d: %s", r.code, r.stderr)
			}
			got := h.api.Creates(t)
			if len(got) != 1 || got[0].UserData != tc.ud || got[0].NetworkConfig != tc.nc {
				t.Errorf("create bodies = %+v, want user_data %q network_config %q", got, tc.ud, tc.nc)
			}
		})
	}
}

func TestVMCreateRefusedClientSide(t *testing.T) {
	base := []string{"vm", "create", "web-1", "--image-url", imageURL, "--arch", "amd64"}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"firmware both", append(base, "--firmware", "uefi", "--firmware-id", "6d1c1a8e-0000-4000-8000-000000000001"),
			"error: validation_failed: --firmware and --firmware-id are mutually exclusive\n"},
		{"no-cloud-init user-data", append(base, "--no-cloud-init", "--user-data", "/nonexistent"),
			"error: validation_failed: --no-cloud-init and --user-data are mutually exclusive\n"},
		{"network-config no-cloud-init", append(base, "--network-config", "-", "--no-cloud-init"),
			"error: validation_failed: --no-cloud-init and --network-config are mutually exclusive\n"},
		{"both stdin", append(base, "--network-config", "-", "--user-data", "-"),
			"error: validation_failed: --user-data and --network-config cannot both read stdin\n"},
		{"no image-url", []string{"vm", "create", "web-1", "--arch", "amd64"},
			"error: validation_failed: --image-url is required\n"},
		{"empty arch", []string{"vm", "create", "web-1", "--image-url", imageURL, "--arch="},
			"error: validation_failed: --arch is required\n"},
		{"missing user-data file", append(base, "--user-data", "/nonexistent/ud"),
			"error: read --user-data: open /nonexistent/ud: no such file or directory\n"},
		{"no name", []string{"vm", "create", "--image-url", imageURL, "--arch", "amd64"},
			"error: missing VM name\nusage: otherix vm create ... (see otherix vm create -h)\n"},
		{"two names", append(base, "web-2"),
			"error: unexpected arguments after the VM name: web-2\nusage: otherix vm create ... (see otherix vm create -h)\n"},
		{"bad wait-timeout", append(base, "--wait", "--wait-timeout", "0s"),
			"error: --wait-timeout must be positive, got 0s\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			r := h.run("", tc.args...)
			if r.code != exitFailure || r.stderr != tc.want || r.stdout != "" {
				t.Errorf("got exit %d stdout %q stderr %q, want exit 1 stderr %q", r.code, r.stdout, r.stderr, tc.want)
			}
			if reqs := h.api.Requests(true); len(reqs) != 0 {
				t.Errorf("the CLI sent %d requests, want none", len(reqs))
			}
		})
	}
}

func TestVMCreateAPIError(t *testing.T) {
	h := newHarness(t)
	h.api.CreateError = &api.Error{Code: "default_pool_not_set", Message: "no pool given and the cluster has no default pool"}
	h.api.CreateStatus = 400
	r := h.run("", "vm", "create", "web-1", "--image-url", imageURL, "--arch", "amd64", "--wait")
	if want := "error: default_pool_not_set: no pool given and the cluster has no default pool\n"; r.code != 1 || r.stderr != want || r.stdout != "" {
		t.Errorf("got exit %d stdout %q stderr %q, want exit 1 stderr %q", r.code, r.stdout, r.stderr, want)
	}
}

func TestCreateManifest(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := "name: db-1\nimage_url: " + imageURL + "\narch: amd64\nvcpus: 2\nmemory_mb: 1024\nuser_data: |\n  #cloud-config\n  hostname: db-1\n"
	wantGood := api.CreateVM{Name: "db-1", ImageURL: imageURL, Arch: "amd64", VCPUs: 2, MemoryMB: 1024, UserData: "#cloud-config\nhostname: db-1\n"}
	for _, tc := range []struct {
		name   string
		args   []string
		stdin  string
		want   *api.CreateVM
		stdout string
		stderr string
	}{
		{name: "file", args: []string{"-f", write("good.yaml", good)}, want: &wantGood, stdout: "created task=task-1 status=pending\n"},
		{name: "stdin wait", args: []string{"--wait", "-f", "-"}, stdin: good, want: &wantGood,
			stdout: "created task=task-1 status=pending\nvm running task=task-1\n", stderr: "...\n"},
		{name: "unknown keys", args: []string{"-f", write("unknown.yaml", "name: x\nimage_url: u\ncolour: red\narch: amd64\ncpus: 2\n")},
			stderr: "error: validation_failed: " + dir + "/unknown.yaml: unknown keys: colour (line 3), cpus (line 5) (allowed: " + allowedKeys() + ")\n"},
		{name: "bad type", args: []string{"-f", "-"}, stdin: "name: x\nimage_url: u\narch: amd64\nvcpus: two\n",
			stderr: "error: validation_failed: stdin: line 4: cannot unmarshal !!str `two` into int\n"},
		{name: "two documents", args: []string{"-f", "-"}, stdin: good + "---\n" + good,
			stderr: "error: validation_failed: stdin: a manifest holds one document (found a second one or bad YAML after the first)\n"},
		{name: "empty", args: []string{"-f", "-"}, stdin: "",
			stderr: "error: validation_failed: stdin: manifest is empty\n"},
		{name: "not a mapping", args: []string{"-f", "-"}, stdin: "- name: x\n",
			stderr: "error: validation_failed: stdin: manifest must be a mapping of keys to values\n"},
		{name: "missing arch", args: []string{"-f", "-"}, stdin: "name: x\nimage_url: u\n",
			stderr: "error: validation_failed: stdin: arch is required\n"},
		{name: "exclusive", args: []string{"-f", "-"}, stdin: good + "no_cloud_init: true\n",
			stderr: "error: validation_failed: stdin: no_cloud_init and user_data are mutually exclusive\n"},
		{name: "no file", args: []string{"--wait"},
			stderr: "error: missing -f FILE\nusage: otherix create ... (see otherix create -h)\n"},
		{name: "missing file", args: []string{"-f", dir + "/nope.yaml"},
			stderr: "error: read manifest: open " + dir + "/nope.yaml: no such file or directory\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			r := h.run(tc.stdin, append([]string{"create"}, tc.args...)...)
			wantCode := 0
			if tc.want == nil {
				wantCode = 1
			}
			if r.code != wantCode || r.stdout != tc.stdout || r.stderr != tc.stderr {
				t.Errorf("got exit %d\nstdout %q\nstderr %q\nwant exit %d\nstdout %q\nstderr %q", r.code, r.stdout, r.stderr, wantCode, tc.stdout, tc.stderr)
			}
			got := h.api.Creates(t)
			if tc.want == nil && len(got) != 0 || tc.want != nil && (len(got) != 1 || !reflect.DeepEqual(got[0], *tc.want)) {
				t.Errorf("create bodies = %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestManifestRoundTrip: a VM created with flags, shown with vm get -o
// yaml, deleted and re-created with create -f sends the same body.
func TestManifestRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flags []string
	}{
		{"full", []string{"--image-sha256", strings.Repeat("0123456789abcdef", 4), "--disk-gib", "20", "--pool", "fast",
			"--network", "br0", "--vcpus", "4", "--memory-mb", "4096"}},
		{"no cloud-init", []string{"--no-cloud-init", "--pool", "default", "--image-sha256", strings.Repeat("ab", 32), "--disk-gib", "3"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.must(append([]string{"vm", "create", "web-1", "--image-url", imageURL, "--arch", "arm64", "--wait"}, tc.flags...)...)
			manifest := h.must("vm", "get", "web-1", "-o", "yaml").stdout
			h.must("vm", "delete", "web-1", "--force", "--wait")
			if r := h.run(manifest, "create", "-f", "-", "--wait"); r.code != 0 {
				t.Fatalf("create -f: exit %d: %s\nmanifest:\n%s", r.code, r.stderr, manifest)
			}
			bodies := h.api.Creates(t)
			if len(bodies) != 2 || !reflect.DeepEqual(bodies[0], bodies[1]) {
				t.Errorf("create bodies differ:\nflags:    %+v\nmanifest: %+v\nmanifest text:\n%s", bodies[0], bodies[1], manifest)
			}
		})
	}
}

// allowedKeys is the sorted list of manifest keys, as the error names them.
func allowedKeys() string {
	var ks []string
	for k := range manifestKeys() {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return strings.Join(ks, ", ")
}
