package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
)

func TestAsyncOps(t *testing.T) {
	for _, tc := range []struct {
		args       []string
		status     string // the VM's status before
		method     string
		path       string
		body       string
		stdout     string
		wantStatus string // after; "" when deleted
	}{
		{[]string{"start", "web-1"}, "stopped", "POST", "/v1/vms/web-1/start", "", "start task=task-1 status=pending\n", "stopped"},
		{[]string{"start", "web-1", "--wait"}, "stopped", "POST", "/v1/vms/web-1/start", "", "start task=task-1 status=pending\nvm running task=task-1\n", "running"},
		{[]string{"stop", "web-1"}, "running", "POST", "/v1/vms/web-1/stop", "{}", "stop task=task-1 status=pending\n", "running"},
		{[]string{"stop", "web-1", "--wait", "--wait-timeout", "1m"}, "running", "POST", "/v1/vms/web-1/stop", "{}", "stop task=task-1 status=pending\nvm stopped task=task-1\n", "stopped"},
		{[]string{"stop", "--force", "web-1"}, "running", "POST", "/v1/vms/web-1/poweroff", "", "poweroff task=task-1 status=pending\n", "running"},
		{[]string{"stop", "web-1", "--force", "--wait"}, "running", "POST", "/v1/vms/web-1/poweroff", "", "poweroff task=task-1 status=pending\nvm stopped task=task-1\n", "stopped"},
		{[]string{"poweroff", "web-1", "--wait"}, "running", "POST", "/v1/vms/web-1/poweroff", "", "poweroff task=task-1 status=pending\nvm stopped task=task-1\n", "stopped"},
		{[]string{"reboot", "web-1", "--wait"}, "running", "POST", "/v1/vms/web-1/reboot", "", "reboot task=task-1 status=pending\nvm running task=task-1\n", "running"},
		{[]string{"delete", "web-1", "--force"}, "running", "DELETE", "/v1/vms/web-1", "", "delete task=task-1 status=pending\n", "running"},
		{[]string{"delete", "--wait", "web-1", "--force"}, "stopped", "DELETE", "/v1/vms/web-1", "", "delete task=task-1 status=pending\nvm deleted task=task-1\n", ""},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			h := newHarness(t)
			h.api.AddVM(api.VM{Name: "web-1", Status: tc.status})
			r := h.must(append([]string{"vm"}, tc.args...)...)
			if r.stdout != tc.stdout {
				t.Errorf("stdout = %q, want %q", r.stdout, tc.stdout)
			}
			wantStderr := ""
			if strings.Contains(tc.stdout, "\nvm ") {
				wantStderr = "...\n"
			}
			if r.stderr != wantStderr {
				t.Errorf("stderr = %q, want %q", r.stderr, wantStderr)
			}
			reqs := h.api.Requests(false)
			if len(reqs) != 1 || reqs[0].Method != tc.method || reqs[0].Path != tc.path || string(reqs[0].Body) != tc.body {
				t.Errorf("requests = %+v, want one %s %s with body %q", reqs, tc.method, tc.path, tc.body)
			}
			v, ok := h.api.VM("web-1")
			if got := map[bool]string{true: v.Status}[ok]; got != tc.wantStatus {
				t.Errorf("vm status after = %q, want %q", got, tc.wantStatus)
			}
		})
	}
}

func TestAsyncWaitFailure(t *testing.T) {
	h := newHarness(t)
	h.api.AddVM(api.VM{Name: "web-1", Status: "running"})
	h.api.FailNext = &api.Error{Code: "stop_timeout", Message: "guest did not power down within 2m0s"}
	r := h.run("", "vm", "stop", "web-1", "--wait")
	if r.code != 1 {
		t.Errorf("exit = %d, want 1", r.code)
	}
	if want := "stop task=task-1 status=pending\n"; r.stdout != want {
		t.Errorf("stdout = %q, want %q", r.stdout, want)
	}
	if want := "...\ntask task-1 failed: stop_timeout: guest did not power down within 2m0s\n"; r.stderr != want {
		t.Errorf("stderr = %q, want %q", r.stderr, want)
	}
}

func TestAsyncNotFound(t *testing.T) {
	h := newHarness(t)
	r := h.run("", "vm", "start", "ghost", "--wait")
	if want := "error: not_found: vm \"ghost\" not found\n"; r.code != 1 || r.stderr != want || r.stdout != "" {
		t.Errorf("exit %d stdout %q stderr %q, want exit 1 stderr %q", r.code, r.stdout, r.stderr, want)
	}
}

func TestDeleteConfirmation(t *testing.T) {
	for _, tc := range []struct {
		name     string
		terminal bool
		stdin    string
		code     int
		stderr   string
		deleted  bool
	}{
		{"no terminal", false, "y\n", 1, "error: refusing to delete vm web-1 without confirmation: stdin is not a terminal (pass --force)\n", false},
		{"yes", true, "y\n", 0, "Delete vm web-1? [y/N] ...\n", true},
		{"YES", true, " YES \n", 0, "Delete vm web-1? [y/N] ...\n", true},
		{"no", true, "n\n", 1, "Delete vm web-1? [y/N] delete of vm web-1 aborted\n", false},
		{"empty", true, "\n", 1, "Delete vm web-1? [y/N] delete of vm web-1 aborted\n", false},
		{"eof", true, "", 1, "Delete vm web-1? [y/N] delete of vm web-1 aborted\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.terminal = tc.terminal
			h.api.AddVM(api.VM{Name: "web-1", Status: "stopped"})
			r := h.run(tc.stdin, "vm", "delete", "web-1", "--wait")
			if r.code != tc.code || r.stderr != tc.stderr {
				t.Errorf("exit %d stderr %q, want exit %d stderr %q", r.code, r.stderr, tc.code, tc.stderr)
			}
			_, exists := h.api.VM("web-1")
			if exists == tc.deleted {
				t.Errorf("vm exists = %v, want deleted %v", exists, tc.deleted)
			}
			if !tc.deleted && len(h.api.Requests(true)) != 0 {
				t.Errorf("requests = %+v, want none", h.api.Requests(true))
			}
		})
	}
}

func TestSyncOps(t *testing.T) {
	h := newHarness(t)
	h.api.AddVM(api.VM{Name: "web-1", Status: "running", Arch: "amd64"})
	for _, tc := range []struct {
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{[]string{"pause", "web-1"}, 0, "vm web-1 status=paused\n", ""},
		{[]string{"pause", "web-1"}, 1, "", "error: conflict: vm \"web-1\" is paused\n"},
		{[]string{"reset", "web-1"}, 1, "", "error: conflict: vm \"web-1\" is paused\n"},
		{[]string{"resume", "web-1", "-o", "text"}, 0, "vm web-1 status=running\n", ""},
		{[]string{"resume", "web-1"}, 1, "", "error: conflict: vm \"web-1\" is running\n"},
		{[]string{"reset", "web-1"}, 0, "vm web-1 status=running\n", ""},
		{[]string{"pause", "-o", "yaml", "web-1"}, 1, "", "error: unknown output format \"yaml\": want text, json\n"},
		{[]string{"resume", "ghost"}, 1, "", "error: not_found: vm \"ghost\" not found\n"},
	} {
		r := h.run("", append([]string{"vm"}, tc.args...)...)
		if r.code != tc.code || r.stdout != tc.stdout || r.stderr != tc.stderr {
			t.Errorf("vm %s: exit %d stdout %q stderr %q, want exit %d stdout %q stderr %q",
				strings.Join(tc.args, " "), r.code, r.stdout, r.stderr, tc.code, tc.stdout, tc.stderr)
		}
	}

	r := h.must("vm", "pause", "web-1", "--output", "json")
	var v api.VM
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil || v.Name != "web-1" || v.Status != "paused" || v.Arch != "amd64" {
		t.Errorf("pause -o json = %s (err %v)", r.stdout, err)
	}
	for _, req := range h.api.Requests(true) {
		if req.Method != "POST" && req.Path != "" {
			t.Errorf("sync op sent %s %s", req.Method, req.Path)
		}
	}
}

func TestPollIntervalEnv(t *testing.T) {
	h := newHarness(t)
	h.api.AddVM(api.VM{Name: "web-1", Status: "stopped"})
	h.env[envPollInterval] = "soon"
	r := h.run("", "vm", "start", "web-1", "--wait")
	if want := "error: invalid OTHERIX_POLL_INTERVAL \"soon\": want a positive duration such as 500ms\n"; r.code != 1 || r.stderr != want {
		t.Errorf("exit %d stderr %q, want exit 1 stderr %q", r.code, r.stderr, want)
	}
	if n := len(h.api.Requests(true)); n != 0 {
		t.Errorf("a bad poll interval still sent %d requests", n)
	}
	// Without --wait the variable is not read.
	if r := h.run("", "vm", "start", "web-1"); r.code != 0 {
		t.Errorf("start without --wait: exit %d: %s", r.code, r.stderr)
	}
}

// TestVMSetVNC: vm set sends vnc_enabled, vnc_port and a password read
// from a file or stdin (its first line), never echoing the password.
func TestVMSetVNC(t *testing.T) {
	const pw = "s3cr!t"
	file := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(file, []byte(pw+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		stdin string
		args  []string
		body  string
	}{
		{"", []string{"--vnc-enabled=true", "--vnc-port", "5905", "--vnc-password-file", file}, `{"vnc_enabled":true,"vnc_port":5905,"vnc_password":"s3cr!t"}`},
		{pw + "\r\n", []string{"--vnc-password-file", "-"}, `{"vnc_password":"s3cr!t"}`},
		{"", []string{"--vnc-enabled=false"}, `{"vnc_enabled":false}`},
		{"", []string{"--vnc-port", "auto"}, `{"vnc_port":null}`},
	} {
		h := newHarness(t)
		h.api.AddVM(api.VM{Name: "web-1", Status: "running", VNCEnabled: true, VNCPort: 5901})
		r := h.run(tc.stdin, append([]string{"vm", "set", "web-1"}, tc.args...)...)
		if r.code != 0 || strings.Contains(r.stdout+r.stderr, pw) || !strings.Contains(r.stdout, "vnc_enabled=true vnc_port=5901") {
			t.Errorf("%v: code %d stdout %q stderr %q", tc.args, r.code, r.stdout, r.stderr)
		}
		reqs := h.api.Requests(false)
		if len(reqs) != 1 || reqs[0].Method != "PATCH" || string(reqs[0].Body) != tc.body {
			t.Errorf("%v: requests %+v, want a PATCH with %s", tc.args, reqs, tc.body)
		}
	}
	h := newHarness(t)
	if r := h.run("", "vm", "set", "web-1", "--vnc-enabled=maybe"); r.code == 0 || !strings.Contains(r.stderr, "--vnc-enabled takes true or false") {
		t.Errorf("bad --vnc-enabled: %+v", r)
	}
	if r := h.run("", "vm", "set", "web-1", "--vnc-port=59o1"); r.code == 0 || !strings.Contains(r.stderr, "--vnc-port takes a port or auto") {
		t.Errorf("bad --vnc-port: %+v", r)
	}
}
