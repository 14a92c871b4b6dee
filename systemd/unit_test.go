package systemd

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// unitFile is the repository's unit, installed as-is by packaging.
const unitFile = "../dist/otherix-agent.service"

// analyzeVerify runs `systemd-analyze verify` on path and returns its
// stderr. verify insists that ExecStart's binary exists, so it runs in a
// private mount namespace where a stub directory is bind-mounted over
// /usr/local/bin; nothing on the machine changes.
func analyzeVerify(t *testing.T, path string) (stderr string) {
	t.Helper()
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Fatalf("systemd-analyze not found (%v): install the Debian package systemd (apt-get install -y systemd); CI must install it", err)
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Fatalf("unshare not found (%v): install the Debian package util-linux", err)
	}
	if os.Geteuid() != 0 {
		t.Fatal("verifying the unit needs root (a private mount namespace hides a stub agent binary under /usr/local/bin)")
	}
	stub := t.TempDir()
	if err := os.WriteFile(filepath.Join(stub, "otherix-agent"), []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--",
		"sh", "-c", `mount --bind "$1" /usr/local/bin && exec systemd-analyze verify --man=no "$2"`,
		"sh", stub, abs)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.Dir = t.TempDir()
	err = cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatalf("run systemd-analyze verify: %v", err)
	}
	t.Logf("systemd-analyze verify %s: %v\nstdout: %s", filepath.Base(path), err, out.String())
	if err != nil && errb.Len() == 0 {
		t.Fatalf("systemd-analyze verify failed without a message: %v", err)
	}
	return errb.String()
}

func TestUnitFileVerifies(t *testing.T) {
	if stderr := analyzeVerify(t, unitFile); stderr != "" {
		t.Errorf("systemd-analyze verify %s wrote to stderr:\n%s", unitFile, stderr)
	}
}

// TestUnitFileVerifyCatchesMistakes shows that the check above would see a
// broken unit: systemd only warns about unknown keys and bad values.
func TestUnitFileVerifyCatchesMistakes(t *testing.T) {
	orig, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	broken := strings.Replace(string(orig), "\nKillMode=process\n", "\nKillMode=proces\nWatchdogSecs=30\n", 1)
	path := filepath.Join(t.TempDir(), "otherix-agent.service")
	if err := os.WriteFile(path, []byte(broken), 0o644); err != nil {
		t.Fatal(err)
	}
	stderr := analyzeVerify(t, path)
	for _, want := range []string{"WatchdogSecs", "kill mode"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
}

// TestUnitFileSettings pins the settings the agent's behaviour relies on.
func TestUnitFileSettings(t *testing.T) {
	f, err := os.Open(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := map[string][]string{} // "Section.Key" -> values in order
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[':
			section = strings.Trim(line, "[]")
		default:
			k, v, _ := strings.Cut(line, "=")
			got[section+"."+k] = append(got[section+"."+k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"Service.Type":                      {"notify"},
		"Service.NotifyAccess":              {"main"},
		"Service.WatchdogSec":               {"30"},
		"Service.Restart":                   {"on-failure"},
		"Service.KillMode":                  {"process"},
		"Service.StateDirectory":            {"otherix"},
		"Service.RuntimeDirectory":          {"otherix"},
		"Service.RuntimeDirectoryPreserve":  {"yes"},
		"Service.CacheDirectory":            {"otherix"},
		"Service.ExecStart":                 {"/usr/local/bin/otherix-agent --config /etc/otherix/agent.yaml"},
		"Service.ExecReload":                {"/bin/kill -HUP $MAINPID"},
		"Service.ProtectSystem":             {"full"},
		"Service.ProtectHome":               {"yes"},
		"Service.PrivateTmp":                {"yes"},
		"Service.RestrictAddressFamilies":   {"AF_UNIX AF_INET AF_INET6 AF_NETLINK"},
		"Install.WantedBy":                  {"multi-user.target"},
		"Service.MemoryDenyWriteExecute":    nil, // QEMU's TCG JIT needs W+X memory
		"Service.PrivateDevices":            nil, // would hide /dev/kvm
		"Service.PrivateNetwork":            nil, // taps live in the host's network
		"Service.DynamicUser":               nil,
		"Service.RuntimeDirectoryPreserves": nil,
	}
	for k, v := range want {
		if !slices.Equal(got[k], v) {
			t.Errorf("%s: got %q, want %q", k, got[k], v)
		}
	}
	if len(got["Service.TimeoutStopSec"]) != 1 {
		t.Errorf("TimeoutStopSec: got %q, want one value", got["Service.TimeoutStopSec"])
	}
	// Host devices too: VFIO (QEMU opens it before it leaves this unit's
	// cgroup), USB and the host's TPM (the agent opens them).
	for _, dev := range []string{"/dev/kvm rw", "/dev/net/tun rw", "/dev/vhost-net rw", "char-macvtap rw",
		"/dev/vfio/vfio rw", "char-vfio rw", "char-usb_device rw", "/dev/tpm0 rw", "char-tpm rw"} {
		if !slices.Contains(got["Service.DeviceAllow"], dev) {
			t.Errorf("DeviceAllow lacks %q: %q", dev, got["Service.DeviceAllow"])
		}
	}
	caps := strings.Fields(strings.Join(got["Service.CapabilityBoundingSet"], " "))
	for _, c := range []string{"CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER",
		"CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_SYS_RESOURCE"} {
		if !slices.Contains(caps, c) {
			t.Errorf("CapabilityBoundingSet lacks %s: %q", c, caps)
		}
	}
}
