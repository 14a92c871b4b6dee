package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vnc/rfbtest"
)

// TestSecretsNeverLeak: user-data, network-config, VNC passwords and the
// control-plane token are secrets. A whole VM life runs with a unique
// marker in each (user-data: a YAML comment and a value; network-config: a
// comment and a value; the VNC password; the standalone control plane's
// token), created from a manifest, the agent logging at debug level; then
// every CLI output, every raw API answer (VMs, every task, node, images,
// metrics, console), QEMU's argv and environment, the agent's whole log
// and every file under the data and run dirs (but the seed ISO, whose job
// is to hold user-data, and the token file) are searched for the markers.
// The guest proves it got the user-data by its sha256, a VNC login that
// the password is live, and the tasks that the token is.
func TestSecretsNeverLeak(t *testing.T) {
	t.Parallel()
	mark := func(what string) string {
		var b [8]byte
		rand.Read(b[:])
		return "oxsecret" + what + hex.EncodeToString(b[:])
	}
	markers := map[string]string{
		"user-data comment":      mark("udcomment"),
		"user-data value":        mark("udvalue"),
		"network-config comment": mark("nccomment"),
		"network-config value":   mark("ncvalue"),
		"control-plane token":    mark("cptoken"),
		"VNC password":           vncPassword(),
	}
	userData := "#cloud-config\n# " + markers["user-data comment"] + "\nwrite_files:\n  - path: /etc/otherix-secret\n    content: " +
		markers["user-data value"] + "\n    permissions: '0600'\n#otherix-run: echo secrets-test-ran\n"
	netConfig := "version: 2\nethernets:\n  # " + markers["network-config comment"] + "\n  eth0:\n    dhcp4: true\n" +
		"    nameservers:\n      search: [" + markers["network-config value"] + ".example]\n"

	a := startAgent(t, "log:\n  level: debug\n")
	// The agent keeps an existing token file: restart it with a marked one.
	a.kill()
	if err := os.WriteFile(filepath.Join(a.dir, "standalone.token"), []byte(markers["control-plane token"]+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a.start()

	var seen []source // everything the markers must not be in
	keep := func(name string, b []byte) { seen = append(seen, source{name: name, data: b}) }
	run := func(args ...string) result {
		t.Helper()
		r := a.ok(args...)
		keep("otherix "+strings.Join(args, " ")+" (stdout)", []byte(r.stdout))
		keep("otherix "+strings.Join(args, " ")+" (stderr)", []byte(r.stderr))
		return r
	}
	get := func(path string) {
		t.Helper()
		code, b := getRaw(t, a.url+path)
		if code != 200 {
			t.Fatalf("GET %s: %d %s", path, code, b)
		}
		keep("GET "+path, b)
	}
	tasks := map[string]bool{}
	taskRE := regexp.MustCompile(`task=([0-9a-f-]{36})`)
	noteTasks := func(r result) {
		for _, m := range taskRE.FindAllStringSubmatch(r.stdout+r.stderr, -1) {
			tasks[m[1]] = true
		}
	}
	qemu := func(pid int) {
		t.Helper()
		for _, f := range []string{"cmdline", "environ"} {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, f))
			if err != nil {
				t.Fatalf("qemu %s: %v", f, err)
			}
			keep(fmt.Sprintf("/proc/<qemu %d>/%s", pid, f), bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
		}
	}

	manifest, err := yaml.Marshal(api.CreateVM{Name: "sec-1", ImageURL: a.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		UserData: userData, NetworkConfig: netConfig, VNCEnabled: true, VNCPassword: markers["VNC password"]})
	if err != nil {
		t.Fatal(err)
	}
	manifestPath := filepath.Join(t.TempDir(), "sec-1.yaml")
	os.WriteFile(manifestPath, manifest, 0o600)
	noteTasks(run("create", "-f", manifestPath, "--wait"))
	con := a.console("sec-1")
	sum := sha256.Sum256([]byte(userData))
	waitConsole(t, con, "OTHERIX-GUEST cidata user-data-sha256="+hex.EncodeToString(sum[:]))
	waitConsole(t, con, "OTHERIX-GUEST ready")
	waitConsole(t, con, "secrets-test-ran")

	v := a.getVM("sec-1")
	if v.LastTask != nil {
		tasks[v.LastTask.ID] = true
	}
	qemu(v.QEMUPID)
	vncLogin(t, v, markers["VNC password"])
	for _, args := range [][]string{
		{"vm", "get", "sec-1"}, {"vm", "get", "sec-1", "-o", "json"}, {"vm", "get", "sec-1", "-o", "yaml"},
		{"vm", "list"}, {"vm", "list", "--show-ids"}, {"vm", "list", "-o", "json"}, {"vm", "list", "-o", "yaml"},
		{"vm", "console", "sec-1"}, {"image", "list"},
	} {
		run(args...)
	}
	for _, p := range []string{"/v1/vms", "/v1/vms/sec-1", "/v1/vms/sec-1/console", "/v1/node", "/v1/images", "/metrics"} {
		get(p)
	}
	run("vm", "pause", "sec-1")
	run("vm", "resume", "sec-1")
	noteTasks(run("vm", "stop", "sec-1", "--wait"))
	noteTasks(run("vm", "start", "sec-1", "--wait"))
	v = a.getVM("sec-1")
	qemu(v.QEMUPID)
	waitConsole(t, con, "OTHERIX-GUEST ready")
	vncLogin(t, v, markers["VNC password"]) // set again at the new start
	get("/v1/vms/sec-1")

	// The control plane forgets a task's spec once the task is done.
	checkSpecsGone(t, filepath.Join(a.dir, "standalone.json"))
	// Files of the running VM, before delete removes them.
	var seeds []string
	walk := func(root string) {
		t.Helper()
		filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || !d.Type().IsRegular() {
				return nil
			}
			switch d.Name() {
			case "seed.iso":
				seeds = append(seeds, path)
				return nil
			case "standalone.token":
				return nil
			}
			b, err := os.ReadFile(path)
			if err == nil {
				keep(path, b)
			}
			return nil
		})
	}
	runDir := configValue(t, a.cfgPath, "run_dir")
	walk(a.dir)
	walk(runDir)
	// Controls: the markers are where they belong, so the search can
	// find them: the seed ISO holds user-data and network-config.
	if len(seeds) != 1 {
		t.Fatalf("seed ISOs under the data dir: %v", seeds)
	}
	iso, err := os.ReadFile(seeds[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, what := range []string{"user-data comment", "user-data value", "network-config comment", "network-config value"} {
		if !bytes.Contains(iso, []byte(markers[what])) {
			t.Fatalf("the seed ISO lacks the %s marker", what)
		}
	}
	if !strings.Contains(a.logText(), `"level":"debug"`) {
		t.Fatal("the agent logged nothing at debug level")
	}

	noteTasks(run("vm", "delete", "sec-1", "--force", "--wait"))
	for id := range tasks {
		get("/v1/tasks/" + id)
	}
	get("/v1/vms")
	walk(a.dir)
	walk(runDir)
	keep("agent log", []byte(a.logText()))

	for what, m := range markers {
		for _, s := range seen {
			for i, line := range strings.Split(string(s.data), "\n") {
				if strings.Contains(line, m) {
					t.Errorf("%s leaked: %s line %d: %s", what, s.name, i+1, clip(line, m))
				}
			}
		}
	}
	t.Logf("searched %d sources (%d tasks) for %d markers", len(seen), len(tasks), len(markers))
}

// vncPassword is a VNC password marker: VNC passwords are at most 8
// bytes, so all 8 are random (62^8: no chance match in the files searched).
func vncPassword() string {
	const chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	var b [8]byte
	rand.Read(b[:])
	for i := range b {
		b[i] = chars[int(b[i])%len(chars)]
	}
	return string(b[:])
}

// vncLogin proves the VM's VNC server takes password.
func vncLogin(t *testing.T, v api.VM, password string) {
	t.Helper()
	if !v.VNCEnabled || v.VNCPort == 0 {
		t.Fatalf("vm without VNC: %+v", v)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := rfbtest.Dial(ctx, fmt.Sprintf("127.0.0.1:%d", v.VNCPort), password)
	if err != nil {
		t.Fatalf("vnc login with the password: %v", err)
	}
	c.Close()
}

type source struct {
	name string
	data []byte
}

// clip shows the part of line around m.
func clip(line, m string) string {
	i := strings.Index(line, m)
	from, to := max(0, i-120), min(len(line), i+len(m)+120)
	return strconv.Quote(line[from:to])
}

// checkSpecsGone fails if a finished task of the control plane's state
// still holds its spec (a create's holds user-data).
func checkSpecsGone(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Tasks []struct {
			api.Task
			Spec json.RawMessage `json:"spec"`
		} `json:"tasks"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	for _, task := range st.Tasks {
		switch task.Status {
		case api.TaskSuccess, api.TaskFailed, api.TaskCancelled:
			if len(task.Spec) > 0 && string(task.Spec) != "null" {
				t.Errorf("standalone.json: %s task %s is %s and still holds its spec", task.Type, task.ID, task.Status)
			}
		}
	}
}

// configValue reads a top-level key of the agent's config file.
func configValue(t *testing.T, path, key string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^` + key + `: (.+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("%s has no %s", path, key)
	}
	return strings.TrimSpace(string(m[1]))
}
