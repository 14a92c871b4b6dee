package main

import (
	"bytes"
	"encoding/pem"
	"flag"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
)

// TestRun drives the entry point main uses.
func TestRun(t *testing.T) {
	f := &fakeAPI{}
	srv := httptest.NewServer(f)
	defer srv.Close()
	f.AddVM(api.VM{Name: "web-1", Status: "running"})
	var out, errb bytes.Buffer
	env := map[string]string{envURL: srv.URL}
	code := run([]string{"vm", "pause", "web-1"}, strings.NewReader(""), &out, &errb, func(k string) string { return env[k] })
	if code != 0 || out.String() != "vm web-1 status=paused\n" || errb.String() != "" {
		t.Errorf("exit %d stdout %q stderr %q", code, out.String(), errb.String())
	}
	// A strings.Reader is not a terminal: delete without --force refuses.
	out.Reset()
	errb.Reset()
	if code := run([]string{"vm", "delete", "web-1"}, strings.NewReader("y\n"), &out, &errb, func(k string) string { return env[k] }); code != 1 {
		t.Errorf("delete without a terminal: exit %d, stderr %q", code, errb.String())
	}
}

func TestIsTerminal(t *testing.T) {
	f, err := os.Open(filepath.Join(t.TempDir(), "."))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if isTerminal(f) || isTerminal(strings.NewReader("")) {
		t.Error("a directory or a strings.Reader is not a terminal")
	}
	if tty, err := os.Open("/dev/tty"); err == nil { // absent without a controlling terminal
		defer tty.Close()
		if !isTerminal(tty) {
			t.Error("/dev/tty is a terminal")
		}
	}
}

func TestServerAndToken(t *testing.T) {
	var gotAuth []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth = append(gotAuth, r.Header.Get("Authorization"))
		fakeJSON(w, 200, map[string]any{"vms": []any{}})
	}))
	defer srv.Close()
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("file-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	defaultFile := filepath.Join(t.TempDir(), "api.token")
	old := defaultTokenPath
	defaultTokenPath = defaultFile
	t.Cleanup(func() { defaultTokenPath = old })
	emptyFile := filepath.Join(t.TempDir(), "empty")
	if err := os.WriteFile(emptyFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		env      map[string]string
		args     []string
		wantAuth string
		wantErr  string
	}{
		{"env url", map[string]string{envURL: srv.URL}, []string{"vm", "list"}, "", ""},
		{"flag before command", map[string]string{envURL: "http://127.0.0.1:1"}, []string{"--server", srv.URL, "vm", "list"}, "", ""},
		{"flag after command", map[string]string{envURL: "http://127.0.0.1:1"}, []string{"vm", "list", "--server=" + srv.URL + "/"}, "", ""},
		{"env token", map[string]string{envURL: srv.URL, envToken: "env-secret"}, []string{"vm", "list"}, "Bearer env-secret", ""},
		{"token file wins", map[string]string{envURL: srv.URL, envToken: "env-secret"}, []string{"vm", "list", "--token-file", tokenFile}, "Bearer file-secret", ""},
		{"global token file", map[string]string{envURL: srv.URL}, []string{"--token-file", tokenFile, "vm", "list"}, "Bearer file-secret", ""},
		{"empty token file", map[string]string{envURL: srv.URL}, []string{"vm", "list", "--token-file", emptyFile}, "", "error: token file " + emptyFile + " is empty\n"},
		{"default token file", map[string]string{envURL: srv.URL}, []string{"vm", "list"}, "Bearer default-secret", ""},
		{"env token before the default file", map[string]string{envURL: srv.URL, envToken: "env-secret"}, []string{"vm", "list"}, "Bearer env-secret", ""},
		{"bad url", map[string]string{envURL: "127.0.0.1:7480"}, []string{"vm", "list"}, "", "error: invalid server URL \"127.0.0.1:7480\": want http://HOST:PORT or unix:///PATH\n"},
		{"unreachable", map[string]string{}, []string{"vm", "list", "--server", "http://127.0.0.1:1"}, "", "error: cannot reach http://127.0.0.1:1: dial tcp 127.0.0.1:1: connect: connection refused\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gotAuth = nil
			os.Remove(defaultFile)
			if strings.Contains(tc.name, "default") {
				os.WriteFile(defaultFile, []byte("default-secret\n"), 0o600)
			}
			var out, errb bytes.Buffer
			code := run(tc.args, strings.NewReader(""), &out, &errb, func(k string) string { return tc.env[k] })
			if tc.wantErr != "" {
				if code != 1 || errb.String() != tc.wantErr {
					t.Errorf("exit %d stderr %q, want exit 1 stderr %q", code, errb.String(), tc.wantErr)
				}
				return
			}
			if code != 0 {
				t.Fatalf("exit %d: %s", code, errb.String())
			}
			if len(gotAuth) != 1 || gotAuth[0] != tc.wantAuth {
				t.Errorf("Authorization = %q, want [%q]", gotAuth, tc.wantAuth)
			}
		})
	}
}

func TestNonEnvelopeError(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "<html>bad gateway</html>", http.StatusBadGateway)
	}))
	defer srv.Close()
	var out, errb bytes.Buffer
	code := run([]string{"vm", "get", "web-1", "--server", srv.URL}, strings.NewReader(""), &out, &errb, func(string) string { return "" })
	if want := "error: internal: server answered 502 Bad Gateway: <html>bad gateway</html>\n"; code != 1 || errb.String() != want {
		t.Errorf("exit %d stderr %q, want %q", code, errb.String(), want)
	}
}

func TestUsage(t *testing.T) {
	h := newHarness(t)
	for _, tc := range []struct {
		args       []string
		code       int
		stdoutHas  string
		stderrWant string
	}{
		{nil, 1, "", ""},
		{[]string{"help"}, 0, "usage: otherix [--server URL]", ""},
		{[]string{"-h"}, 0, "usage: otherix [--server URL]", ""},
		{[]string{"vm", "stop", "-h"}, 0, "usage: otherix vm stop NAME [--force] [--wait] [--wait-timeout 5m]", ""},
		{[]string{"vm", "create", "web-1", "--help"}, 0, "  --image-url URL\n", ""},
		{[]string{"frobnicate"}, 1, "", "error: unknown command \"frobnicate\"\nusage: otherix COMMAND (see otherix help)\n"},
		{[]string{"vm", "migrate", "web-1"}, 1, "", "error: unknown command \"vm migrate\"\nusage: otherix COMMAND (see otherix help)\n"},
		{[]string{"vm"}, 1, "", "error: vm needs a subcommand\nusage: otherix vm create|list|get|start|stop|poweroff|reboot|delete|reset|pause|resume|console ... (see otherix help)\n"},
		{[]string{"vm", "start", "web-1", "--force"}, 1, "", "error: flag provided but not defined: -force\nusage: otherix vm start ... (see otherix vm start -h)\n"},
		{[]string{"vm", "detach-disk", "web-1", "vol-1", "--readonly"}, 1, "", "error: flag provided but not defined: -readonly\nusage: otherix vm detach-disk ... (see otherix vm detach-disk -h)\n"},
		{[]string{"vm", "get"}, 1, "", "error: missing VM name\nusage: otherix vm get ... (see otherix vm get -h)\n"},
		{[]string{"vm", "list", "extra"}, 1, "", "error: unexpected arguments: extra\nusage: otherix vm list ... (see otherix vm list -h)\n"},
		{[]string{"vm", "list", "-o", "wide"}, 1, "", "error: unknown output format \"wide\": want table, json, yaml\n"},
		{[]string{"vm", "get", "web-1", "-o", "table"}, 1, "", "error: unknown output format \"table\": want text, json, yaml\n"},
		{[]string{"task", "get"}, 1, "", "error: missing task id\nusage: otherix task get ... (see otherix task get -h)\n"},
		{[]string{"task", "cancel", "a", "b"}, 1, "", "error: unexpected arguments after the task id: b\nusage: otherix task cancel ... (see otherix task cancel -h)\n"},
		// Flag checks run before the client is made: a bad --server loses.
		{[]string{"vm", "top", "--interval", "10ms", "--server", "ftp://x"}, 1, "", "error: --interval must be at least 100ms\nusage: otherix vm top [--interval D] [-o table|json]\n"},
		{[]string{"vm", "console", "web-1", "--tail", "-1", "--server", "ftp://x"}, 1, "", "error: --tail must not be negative\n"},
		{[]string{"vm", "set", "web-1", "--server", "ftp://x"}, 1, "", "error: vm set needs --vcpus, --memory-mb, --cpu-limit, --autostart, --restart-policy, --vnc-enabled, --vnc-port or --vnc-password-file\nusage: " + vmSetSynopsis + "\n"},
		{[]string{"vm", "get", "web-1", "--server", "ftp://x"}, 1, "", "error: invalid server URL \"ftp://x\": want http://HOST:PORT or unix:///PATH\n"},
		{[]string{"vm", "list", "--limit", "many"}, 1, "", "error: invalid value \"many\" for flag -limit: parse error\nusage: otherix vm list ... (see otherix vm list -h)\n"},
		{[]string{"--bogus", "vm", "list"}, 1, "", "error: flag provided but not defined: -bogus\nusage: otherix [--server URL] [--token-file PATH] COMMAND [ARGS] (see otherix help)\n"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			r := h.run("", tc.args...)
			if r.code != tc.code || !strings.Contains(r.stdout, tc.stdoutHas) || (tc.stderrWant != "" && r.stderr != tc.stderrWant) {
				t.Errorf("exit %d\nstdout %q\nstderr %q\nwant exit %d, stdout with %q, stderr %q", r.code, r.stdout, r.stderr, tc.code, tc.stdoutHas, tc.stderrWant)
			}
		})
	}
	if r := h.run(""); !strings.Contains(r.stderr, "commands:\n  vm create") {
		t.Errorf("no command: stderr %q, want the usage", r.stderr)
	}
	if n := len(h.api.Requests(true)); n != 0 {
		t.Errorf("usage errors sent %d requests", n)
	}
}

func TestVersion(t *testing.T) {
	h := newHarness(t)
	for _, args := range [][]string{{"version"}, {"--version"}} {
		r := h.must(args...)
		if !strings.HasPrefix(r.stdout, "otherix ") || !strings.Contains(r.stdout, " revision ") || !strings.HasSuffix(r.stdout, "\n") {
			t.Errorf("%v: stdout %q", args, r.stdout)
		}
	}
	if r := h.run("", "version", "extra"); r.code != 1 {
		t.Errorf("version extra: exit %d", r.code)
	}
}

func TestSplitArgs(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.Bool("wait", false, "")
	fs.String("pool", "", "")
	fs.String("o", "", "")
	for _, tc := range []struct {
		args, flags, pos []string
	}{
		{[]string{"web-1", "--wait"}, []string{"--wait"}, []string{"web-1"}},
		{[]string{"--pool", "p", "web-1", "-o", "json"}, []string{"--pool", "p", "-o", "json"}, []string{"web-1"}},
		{[]string{"web-1", "--pool=p", "--wait=false"}, []string{"--pool=p", "--wait=false"}, []string{"web-1"}},
		{[]string{"--pool", "-", "web-1"}, []string{"--pool", "-"}, []string{"web-1"}},
		{[]string{"-", "--wait"}, []string{"--wait"}, []string{"-"}},
		{[]string{"--wait", "--", "--not-a-flag"}, []string{"--wait"}, []string{"--not-a-flag"}},
		{[]string{"--unknown", "web-1"}, []string{"--unknown"}, []string{"web-1"}},
		{[]string{"web-1", "--pool"}, []string{"--pool"}, []string{"web-1"}},
	} {
		flags, pos := splitArgs(fs, tc.args)
		if !reflect.DeepEqual(flags, tc.flags) || !reflect.DeepEqual(pos, tc.pos) {
			t.Errorf("splitArgs(%q) = %q, %q; want %q, %q", tc.args, flags, pos, tc.flags, tc.pos)
		}
	}
}

// TestCAFile: an https server whose certificate a private CA signed is
// reached with --ca-file (or $OTHERIX_CA_FILE) and refused without it.
func TestCAFile(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fakeJSON(w, 200, map[string]any{"vms": []any{}})
	}))
	defer srv.Close()
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	notPEM := filepath.Join(t.TempDir(), "junk")
	os.WriteFile(notPEM, []byte("junk"), 0o644)
	for _, tc := range []struct {
		name    string
		env     map[string]string
		args    []string
		wantErr string
	}{
		{"flag", map[string]string{envURL: srv.URL}, []string{"vm", "list", "--ca-file", ca}, ""},
		{"env", map[string]string{envURL: srv.URL, envCAFile: ca}, []string{"vm", "list"}, ""},
		{"system roots", map[string]string{envURL: srv.URL}, []string{"vm", "list"}, "certificate"},
		{"not pem", map[string]string{envURL: srv.URL}, []string{"vm", "list", "--ca-file", notPEM}, "holds no PEM certificate"},
		{"plain http", map[string]string{envURL: "http://127.0.0.1:1"}, []string{"vm", "list", "--ca-file", ca}, "a CA file is for https servers"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(tc.args, strings.NewReader(""), &out, &errb, func(k string) string { return tc.env[k] })
			if tc.wantErr == "" && code != 0 || tc.wantErr != "" && (code != 1 || !strings.Contains(errb.String(), tc.wantErr)) {
				t.Errorf("exit %d stderr %q, want error ~%q", code, errb.String(), tc.wantErr)
			}
		})
	}
}

// TestUnixSocketServer: --server unix:///PATH talks to the agent's unix
// socket (no token needed there).
func TestUnixSocketServer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var gotPath string
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotPath = r.URL.Path
		fakeJSON(w, 200, map[string]any{"vms": []any{}})
	})}
	go srv.Serve(ln)
	defer srv.Close()
	var out, errb bytes.Buffer
	if code := run([]string{"vm", "list", "--server", "unix://" + sock}, strings.NewReader(""), &out, &errb, func(string) string { return "" }); code != 0 || gotPath != "/v1/vms" {
		t.Errorf("exit %d stderr %q path %q", code, errb.String(), gotPath)
	}
	errb.Reset()
	if code := run([]string{"vm", "list", "--server", "unix://rel.sock"}, strings.NewReader(""), &out, &errb, func(string) string { return "" }); code != 1 || !strings.Contains(errb.String(), "unix:///ABSOLUTE/PATH") {
		t.Errorf("relative socket: exit %d stderr %q", code, errb.String())
	}
}
