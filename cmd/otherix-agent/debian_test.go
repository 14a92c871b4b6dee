package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/testguest"
)

// debianBootTimeout bounds one boot of the Debian image to its report:
// systemd and cloud-init's four stages under TCG: about 3 minutes on a
// 2-core machine at load 20-30.
const debianBootTimeout = 10 * time.Minute

// The user-data leaves evidence where the image's report reads it
// (/var/lib/otherix-report): write_files and runcmd run once per instance,
// bootcmd on every boot; runcmd records the boot id it ran in.
const debianUserData = `#cloud-config
write_files:
  - path: /var/lib/otherix-report/write-files
    content: "written by write_files\n"
bootcmd:
  - [sh, -c, "mkdir -p /var/lib/otherix-report && cat /proc/sys/kernel/random/boot_id >> /var/lib/otherix-report/bootcmd"]
runcmd:
  - [sh, -c, "cat /proc/sys/kernel/random/boot_id >> /var/lib/otherix-report/runcmd"]
`

// A static address on SLIRP's network (QEMU's DHCP would hand out
// 10.0.2.15): on the NIC only if cloud-init applied this file. The entry
// is the NIC's name, the predictable one its PCI address gives it (the
// agent puts the first NIC at slot 0x10 of the root bus): cloud-init 22.4
// renders a version-2 entry for networkd as [Match] Name=<entry id> unless
// it has set-name or a macaddress, so a match by name glob would be
// silently ignored, and the MAC is not known before the create.
const debianNetworkConfig = `version: 2
ethernets:
  enp0s16:
    addresses: [10.0.2.50/24]
    routes:
      - to: 0.0.0.0/0
        via: 10.0.2.2
    nameservers:
      addresses: [10.0.2.3]
`

const debianStaticIP = "10.0.2.50"

// TestDebianCloudInit boots a real distribution through the standalone
// agent: a Debian 12 cloud image built from Debian packages
// (testdata/debian), created with user-data and network-config. Its
// cloud-init's own files, printed on the serial console after every boot
// (testguest.ReadDebianReport), prove that the seed the agent built is one
// real cloud-init reads: the NoCloud datasource found it without errors,
// user-data's per-instance modules ran on the first boot only (the
// instance-id, the VM's uuid, is stable across a reboot), bootcmd on every
// boot, the static address of network-config is on the NIC and the
// hostname is the VM's name. The guest agent reports that address in the
// VM view. Last, a graceful stop issued as the guest starts booting, long
// before systemd-logind listens for the power button, still succeeds: the
// engine re-presses it until logind acts.
func TestDebianCloudInit(t *testing.T) {
	t.Parallel()
	t0 := time.Now()
	img := testguest.Debian(t)
	tBuild := time.Since(t0)
	a := startDebianAgent(t, img)
	dir := t.TempDir()
	ud := filepath.Join(dir, "user-data")
	nc := filepath.Join(dir, "network-config")
	if err := os.WriteFile(ud, []byte(debianUserData), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(nc, []byte(debianNetworkConfig), 0o600); err != nil {
		t.Fatal(err)
	}

	tCreate := time.Now()
	a.ok("vm", "create", "deb-1", "--image-url", a.image, "--arch", "amd64", "--vcpus", "1",
		"--memory-mb", "512", "--user-data", ud, "--network-config", nc, "--wait")
	v := a.getVM("deb-1")
	con := a.console("deb-1")
	defer con.Close()

	// First boot.
	r1 := debianReport(t, con)
	tBoot1 := time.Since(tCreate)
	if r1.Boot != 1 {
		t.Fatalf("first report is of boot %d", r1.Boot)
	}
	checkDebianInstance(t, r1, v.UUID)
	if got := r1.Files["/var/lib/cloud/data/previous-instance-id"]; got != "" && strings.TrimSpace(got) != v.UUID {
		// cloud-init writes it on its first run as the id it found before:
		// none (absent or empty) or this one.
		t.Errorf("previous-instance-id on the first boot = %q", got)
	}
	runcmd1 := lines(r1.Files["/var/lib/otherix-report/runcmd"])
	if len(runcmd1) != 1 {
		t.Errorf("runcmd ran %d times on the first boot (%q), want 1", len(runcmd1), runcmd1)
	}
	if got := lines(r1.Files["/var/lib/otherix-report/bootcmd"]); len(got) != 1 {
		t.Errorf("bootcmd ran %d times on the first boot (%q), want 1", len(got), got)
	}
	if got := r1.Files["/var/lib/otherix-report/write-files"]; got != "written by write_files\n" {
		t.Errorf("write_files wrote %q", got)
	}
	waitGuestAgentIP(t, a, "deb-1", debianStaticIP)

	// A reboot (graceful stop, new QEMU): the same instance.
	tReboot := time.Now()
	a.ok("vm", "reboot", "deb-1", "--wait")
	r2 := debianReport(t, con)
	tBoot2 := time.Since(tReboot)
	if r2.Boot != 2 {
		t.Fatalf("report after the reboot is of boot %d, want 2", r2.Boot)
	}
	checkDebianInstance(t, r2, v.UUID)
	if got := strings.TrimSpace(r2.Files["/var/lib/cloud/data/previous-instance-id"]); got != v.UUID {
		t.Errorf("previous-instance-id after the reboot = %q, want %q (the instance-id changed?)", got, v.UUID)
	}
	if got := lines(r2.Files["/var/lib/otherix-report/runcmd"]); !slices.Equal(got, runcmd1) {
		t.Errorf("runcmd after the reboot: %q, want only the first boot's %q (per-instance modules ran again)", got, runcmd1)
	}
	if got := lines(r2.Files["/var/lib/otherix-report/bootcmd"]); len(got) != 2 || got[0] == got[1] {
		t.Errorf("bootcmd after the reboot: %q, want one line for each of two boots", got)
	}
	for path, sem := range r1.Files {
		if strings.HasPrefix(path, "/var/lib/cloud/instance/sem/") && r2.Files[path] != sem {
			t.Errorf("%s changed across the reboot (%q -> %q): its module ran again", path, sem, r2.Files[path])
		}
	}
	if log := r2.Cmds["cloud-init-log"]; !strings.Contains(log, "config-runcmd already ran") {
		t.Errorf("cloud-init.log does not say runcmd already ran:\n%s", log)
	}
	waitGuestAgentIP(t, a, "deb-1", debianStaticIP)

	// A graceful stop of the booted guest: logind is up.
	presses := func() float64 {
		return scrape(t, a.url)[`otherix_agent_qmp_command_duration_seconds_count{command="system_powerdown"}`]
	}
	p0 := presses()
	tStop := time.Now()
	a.ok("vm", "stop", "deb-1", "--wait")
	stopUp, pressesUp := time.Since(tStop), int(presses()-p0)
	if v := a.getVM("deb-1"); v.Status != api.StatusStopped {
		t.Fatalf("after the stop: status %s (%s)", v.Status, v.StatusReason)
	}

	// A graceful stop as the guest starts booting: the first press comes
	// while the firmware or the kernel runs, long before systemd-logind
	// (which turns the power button into a poweroff) listens, so it is
	// lost, and the stop succeeds only because the engine presses again.
	a.ok("vm", "start", "deb-1", "--wait")
	p0 = presses()
	tStop = time.Now()
	a.ok("vm", "stop", "deb-1", "--wait")
	stopEarly, pressesEarly := time.Since(tStop), int(presses()-p0)
	if v := a.getVM("deb-1"); v.Status != api.StatusStopped {
		t.Fatalf("after the stop during boot: status %s (%s)", v.Status, v.StatusReason)
	}
	if pressesEarly < 2 {
		t.Errorf("the stop during boot took %d power button presses, want at least 2 (the first comes before logind)", pressesEarly)
	}
	if strings.Contains(con.Text(), testguest.DebianPrefix+"boot n=3 ") {
		t.Errorf("the third boot reached its report before the stop: the stop was not early in the boot")
	}
	t.Logf("Debian image ready in %v (build or cache); first boot to report %v (logind up %s after the kernel started); "+
		"reboot to report %v (logind %s); stop of the booted guest %v (%d presses); stop issued at power-on %v (%d presses); total %v",
		tBuild.Round(time.Second), tBoot1.Round(time.Second), logindUp(r1), tBoot2.Round(time.Second), logindUp(r2),
		stopUp.Round(time.Second), pressesUp, stopEarly.Round(time.Second), pressesEarly, time.Since(t0).Round(time.Second))

	a.ok("vm", "delete", "deb-1", "--force", "--wait")
}

// checkDebianInstance checks what every boot's report must show.
func checkDebianInstance(t *testing.T, r *testguest.DebianReport, uuid string) {
	t.Helper()
	if got := strings.TrimSpace(r.Files["/var/lib/cloud/data/instance-id"]); got != uuid {
		t.Errorf("boot %d: cloud-init's instance-id = %q, want the VM uuid %q", r.Boot, got, uuid)
	}
	var result struct {
		V1 struct {
			Datasource string   `json:"datasource"`
			Errors     []string `json:"errors"`
		} `json:"v1"`
	}
	if err := json.Unmarshal([]byte(r.Files["/run/cloud-init/result.json"]), &result); err != nil {
		t.Errorf("boot %d: result.json: %v: %q", r.Boot, err, r.Files["/run/cloud-init/result.json"])
	}
	if !strings.Contains(result.V1.Datasource, "NoCloud") || len(result.V1.Errors) != 0 {
		t.Errorf("boot %d: cloud-init result: datasource %q, errors %q", r.Boot, result.V1.Datasource, result.V1.Errors)
	}
	if _, ok := r.Files["/var/lib/cloud/instance/boot-finished"]; !ok {
		t.Errorf("boot %d: no boot-finished: cloud-final did not finish", r.Boot)
	}
	if got := strings.TrimSpace(r.Cmds["hostname"]); got != "deb-1" {
		t.Errorf("boot %d: hostname = %q, want deb-1", r.Boot, got)
	}
	if got := strings.TrimSpace(r.Files["/etc/hostname"]); got != "deb-1" {
		t.Errorf("boot %d: /etc/hostname = %q, want deb-1", r.Boot, got)
	}
	addr := r.Cmds["ip-addr"]
	if !regexpLine(addr, `^\d+: enp0s16\s+inet `+strings.ReplaceAll(debianStaticIP, ".", `\.`)+`/24 `) {
		t.Errorf("boot %d: the static address %s/24 is not on enp0s16:\n%s", r.Boot, debianStaticIP, addr)
	}
	if strings.Contains(addr, "10.0.2.15/") {
		t.Errorf("boot %d: the NIC has SLIRP's DHCP address too: network-config was not the only config:\n%s", r.Boot, addr)
	}
	for _, sem := range []string{"config_write_files", "config_runcmd", "config_scripts_user"} {
		if _, ok := r.Files["/var/lib/cloud/instance/sem/"+sem]; !ok {
			t.Errorf("boot %d: no semaphore %s: the module never ran", r.Boot, sem)
		}
	}
}

// logindUp is when systemd-logind became active in the reported boot,
// after the kernel started (its unit's ActiveEnterTimestampMonotonic).
func logindUp(r *testguest.DebianReport) string {
	for _, l := range strings.Split(r.Cmds["logind"], "\n") {
		if v, ok := strings.CutPrefix(l, "ActiveEnterTimestampMonotonic="); ok {
			if us, err := strconv.ParseInt(v, 10, 64); err == nil {
				return (time.Duration(us) * time.Microsecond).Round(time.Second).String()
			}
		}
	}
	return "?"
}

// debianReport waits for the guest's next report.
func debianReport(t *testing.T, con *testguest.Console) *testguest.DebianReport {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), debianBootTimeout)
	defer cancel()
	r, err := testguest.ReadDebianReport(ctx, con)
	if err != nil {
		t.Fatalf("Debian report: %v", err)
	}
	return r
}

// waitGuestAgentIP waits for the VM view to list ip (the agent polls the
// guest agent every 10 s).
func waitGuestAgentIP(t *testing.T, a *standaloneAgent, name, ip string) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		v := a.getVM(name)
		if slices.Contains(v.IPAddresses, ip) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest agent did not report %s: view ip_addresses %q", ip, v.IPAddresses)
		}
		time.Sleep(time.Second)
	}
}

func lines(s string) []string {
	return strings.Fields(s)
}

// startDebianAgent starts otherix-agent --standalone serving the Debian
// image, with a stop timeout that covers a boot up to logind under TCG.
func startDebianAgent(t *testing.T, imageDir string) *standaloneAgent {
	t.Helper()
	run, err := os.MkdirTemp("/tmp", "oxd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	a := &standaloneAgent{t: t, dir: t.TempDir()}
	a.cfgPath = filepath.Join(t.TempDir(), "agent.yaml")
	cfg := fmt.Sprintf("node_name: node-1\ndata_dir: %s\nrun_dir: %s\nlisten:\n  api: 127.0.0.1:0\n  socket: \"\"\n  metrics: \"\"\nqemu:\n  stop_timeout: 10m\n", a.dir, run)
	if err := os.WriteFile(a.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(imageDir)))
	t.Cleanup(srv.Close)
	a.image = srv.URL + "/debian.qcow2"
	a.start()
	t.Cleanup(func() {
		a.kill()
		a.killVMs()
	})
	return a
}
