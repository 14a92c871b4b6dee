package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/doctor"
)

func writeDoctorConfig(t *testing.T, body string) string {
	t.Helper()
	dir := t.TempDir()
	p := filepath.Join(dir, "agent.yaml")
	cfg := "node_name: node-1\ndata_dir: " + filepath.Join(dir, "data") + "\nrun_dir: " + filepath.Join(dir, "run") + "\n" + body
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestDoctorThisHost runs the real doctor on this machine: the table has
// its shape, QEMU and qemu-img are OK, and the exit status follows the
// worst verdict.
func TestDoctorThisHost(t *testing.T) {
	cfgPath := writeDoctorConfig(t, "")
	var out, errb bytes.Buffer
	code := runDoctor(t.Context(), []string{"--config", cfgPath}, &out, &errb, doctor.Host())
	if errb.Len() != 0 {
		t.Errorf("stderr: %s", errb.String())
	}
	lines := strings.Split(strings.TrimRight(out.String(), "\n"), "\n")
	if len(lines) < 5 {
		t.Fatalf("table too short:\n%s", out.String())
	}
	if f := strings.Fields(lines[0]); strings.Join(f, " ") != "STATUS CHECK DETAIL FIX" {
		t.Errorf("header = %q", lines[0])
	}
	col := strings.Index(lines[0], "CHECK")
	statuses := map[string]string{}
	var fails int
	for _, line := range lines[1 : len(lines)-2] {
		st, _, _ := strings.Cut(line, " ")
		switch st {
		case "OK", "WARN", "FAIL":
		default:
			t.Errorf("row %q does not start with OK, WARN or FAIL", line)
			continue
		}
		if len(line) <= col || line[col-1] != ' ' || line[col] == ' ' {
			t.Errorf("row %q: CHECK column not aligned at %d", line, col)
			continue
		}
		check := strings.TrimSpace(line[col:])
		check = check[:strings.Index(check+"  ", "  ")]
		statuses[check] = st
		if st == "FAIL" {
			fails++
		}
	}
	if lines[len(lines)-2] != "" || !strings.HasSuffix(lines[len(lines)-1], " fail") {
		t.Errorf("summary lines = %q", lines[len(lines)-2:])
	}
	for _, c := range []string{"config", "qemu amd64", "qemu arm64", "qemu-img", "data_dir", "run_dir", "pool default", "socket path"} {
		if statuses[c] != "OK" {
			t.Errorf("%s = %q, want OK\n%s", c, statuses[c], out.String())
		}
	}
	if want := map[bool]int{true: 1, false: 0}[fails > 0]; code != want {
		t.Errorf("exit = %d with %d FAIL rows, want %d", code, fails, want)
	}

	out.Reset()
	code = runDoctor(t.Context(), []string{"--config", cfgPath, "-o", "json"}, &out, &errb, doctor.Host())
	var rep doctor.Report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("json: %v\n%s", err, out.String())
	}
	if len(rep.Checks) != len(statuses) {
		t.Errorf("json has %d checks, table %d", len(rep.Checks), len(statuses))
	}
	if want := map[bool]int{true: 1, false: 0}[rep.Status == doctor.Fail]; code != want {
		t.Errorf("json exit = %d with status %s, want %d", code, rep.Status, want)
	}
	for _, r := range rep.Checks {
		if statuses[r.Check] != string(r.Status) {
			t.Errorf("json %s = %s, table says %s", r.Check, r.Status, statuses[r.Check])
		}
	}
}

// TestDoctorFails: a failing check makes the exit status 1.
func TestDoctorFails(t *testing.T) {
	cfgPath := writeDoctorConfig(t, "qemu:\n  uid_range: \"\"\n  user: no-such-user-xyz\n  binary_amd64: /nonexistent/qemu\n")
	var out, errb bytes.Buffer
	if code := runDoctor(t.Context(), []string{"--config", cfgPath, "-o", "json"}, &out, &errb, doctor.Host()); code != 1 {
		t.Errorf("exit = %d, want 1\n%s%s", code, out.String(), errb.String())
	}
	var rep doctor.Report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatal(err)
	}
	got := map[string]doctor.Result{}
	for _, r := range rep.Checks {
		got[r.Check] = r
	}
	if r := got["qemu user"]; r.Status != doctor.Fail || !strings.Contains(r.Fix, "useradd") {
		t.Errorf("qemu user = %+v", r)
	}
	if r := got["qemu amd64"]; r.Status == doctor.OK {
		t.Errorf("qemu amd64 = %+v, want not OK", r)
	}
}

func TestDoctorBadConfig(t *testing.T) {
	cfgPath := writeDoctorConfig(t, "bogus_key: 1\n")
	var out, errb bytes.Buffer
	code := runDoctor(t.Context(), []string{"--config", cfgPath}, &out, &errb, doctor.Host())
	if code != 1 {
		t.Errorf("exit = %d, want 1", code)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[1], "FAIL    config") || !strings.Contains(lines[1], "unknown key bogus_key") {
		t.Errorf("output:\n%s", out.String())
	}
}

func TestDoctorUsage(t *testing.T) {
	for _, args := range [][]string{{"-o", "xml"}, {"extra"}, {"--nope"}} {
		var out, errb bytes.Buffer
		if code := runDoctor(t.Context(), args, &out, &errb, doctor.Host()); code != 2 || out.Len() != 0 || errb.Len() == 0 {
			t.Errorf("doctor %v: exit %d stdout %q stderr %q, want 2 with a message", args, code, out.String(), errb.String())
		}
	}
}
