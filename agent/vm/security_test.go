package vm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// TestQEMUUnprivileged: QEMU runs as the unprivileged user with no
// capabilities, every file of a VM is root's and private, and the QEMU user
// can open neither its own VM's files nor another VM's by path: it holds
// only the descriptors the agent passed.
func TestQEMUUnprivileged(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHarness(t, nil)
	a := h.define("priv-a", "#cloud-config\n{}\n")
	b := h.define("priv-b", "")
	va, err := h.e.Start(ctx, "priv-a")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, h.console(a), "OTHERIX-GUEST cidata instance-id="+a.Spec.UUID, bootWait)

	status, err := os.ReadFile("/proc/" + itoa(va.PID) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Uid:\t65534\t65534\t65534\t65534", "Gid:\t65534\t65534\t65534\t65534", "CapEff:\t0000000000000000", "CapPrm:\t0000000000000000"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("/proc/%d/status lacks %q:\n%s", va.PID, want, status)
		}
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == "Groups:" && len(f) != 1 {
			t.Errorf("qemu has supplementary groups: %q", line)
		}
	}
	env, _ := os.ReadFile("/proc/" + itoa(va.PID) + "/environ")
	for _, kv := range strings.Split(string(env), "\x00") {
		if kv != "" && !strings.HasPrefix(kv, "PATH=") && !strings.HasPrefix(kv, "LANG=") {
			t.Errorf("qemu inherited %q", kv)
		}
	}

	// Permission matrix of the running VM's files and sockets.
	run := filepath.Join(h.run, ShortID(a.Spec.UUID))
	for path, want := range map[string]os.FileMode{
		h.e.vmDir(a.Spec.UUID):                               os.ModeDir | 0o700,
		filepath.Join(h.e.vmDir(a.Spec.UUID), "vm.json"):     0o600,
		filepath.Join(h.e.vmDir(a.Spec.UUID), "console.log"): 0o600,
		filepath.Join(h.e.vmDir(a.Spec.UUID), "qemu.log"):    0o600,
		run:                            os.ModeDir | 0o700,
		filepath.Join(run, "qmp.sock"): os.ModeSocket | 0o600,
	} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Errorf("%s: %v", path, err)
			continue
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", path, fi.Mode(), want)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 {
			t.Errorf("%s: owner %d, want root", path, st.Uid)
		}
	}

	// As the QEMU user, no VM file opens by path: not the other VM's disk
	// or seed, not even this VM's own.
	for _, p := range []string{b.Spec.Disks[0].Path, b.Spec.CDROMs[0].Path, a.Spec.Disks[0].Path, filepath.Join(run, "qmp.sock"), filepath.Join(h.e.vmDir(b.Spec.UUID), "vm.json")} {
		cmd := exec.Command("/bin/cat", p)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "Permission denied") {
			t.Errorf("as the qemu user, cat %s: %q %v", p, out, err)
		}
	}
	if _, err := h.e.Poweroff(ctx, "priv-a"); err != nil {
		t.Fatal(err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestPerVMUIDs: with a uid range each VM's QEMU runs as a uid and gid of
// its own (kept across restarts), so one QEMU cannot reach another's
// descriptors. The control: a process of VM b's uid reads b's disk through
// /proc/<pid>/fd, which is what any QEMU could do to any other with one
// shared user; a process of VM a's uid is refused.
func TestPerVMUIDs(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := &UIDRange{First: 2000000000, Count: 65536}
	h := newHarness(t, func(c *Config) { c.UIDs = r })
	h.define("uid-a", "")
	b := h.define("uid-b", "")
	va, err := h.e.Start(ctx, "uid-a")
	if err != nil {
		t.Fatal(err)
	}
	vb, err := h.e.Start(ctx, "uid-b")
	if err != nil {
		t.Fatal(err)
	}
	uidOf := func(pid int) uint32 {
		st, err := os.ReadFile("/proc/" + itoa(pid) + "/status")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(st), "\n") {
			if f := strings.Fields(line); len(f) == 5 && (f[0] == "Uid:" || f[0] == "Gid:") {
				if f[1] != f[2] || f[1] != f[3] || f[1] != f[4] {
					t.Errorf("pid %d: %s", pid, line)
				}
			}
		}
		for _, line := range strings.Split(string(st), "\n") {
			if f := strings.Fields(line); len(f) == 5 && f[0] == "Uid:" {
				n, _ := strconv.ParseUint(f[1], 10, 32)
				return uint32(n)
			}
		}
		t.Fatalf("no Uid in /proc/%d/status", pid)
		return 0
	}
	ua, ub := uidOf(va.PID), uidOf(vb.PID)
	if ua == ub || !r.Contains(ua) || !r.Contains(ub) {
		t.Fatalf("qemu uids %d and %d: want two distinct uids of %+v", ua, ub, r)
	}
	if c, _ := h.e.Credential("uid-a"); c == nil || c.Uid != ua || c.Gid != ua {
		t.Errorf("Credential(uid-a) = %+v, want uid %d", c, ua)
	}
	// b's root disk, as b's QEMU holds it.
	diskFD := ""
	ents, _ := os.ReadDir("/proc/" + itoa(vb.PID) + "/fd")
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/" + itoa(vb.PID) + "/fd/" + e.Name()); l == b.Spec.Disks[0].Path {
			diskFD = "/proc/" + itoa(vb.PID) + "/fd/" + e.Name()
		}
	}
	if diskFD == "" {
		t.Fatalf("qemu %d holds no descriptor of %s", vb.PID, b.Spec.Disks[0].Path)
	}
	peek := func(uid uint32) (string, error) {
		cmd := exec.Command("head", "-c", "4", diskFD)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := peek(ub); err != nil || out != "QFI\xfb" {
		t.Errorf("control: a process of b's uid reads %q (%v), want b's qcow2 magic", out, err)
	}
	if out, err := peek(ua); err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("a process of a's uid read b's disk: %q %v", out, err)
	}
	// The uid is persisted: an agent restart and a new start keep it.
	h.e.Close()
	h.open()
	if _, err := h.e.Poweroff(ctx, "uid-a"); err != nil {
		t.Fatal(err)
	}
	va, err = h.e.Start(ctx, "uid-a")
	if err != nil {
		t.Fatal(err)
	}
	if got := uidOf(va.PID); got != ua {
		t.Errorf("after restart and start uid-a runs as %d, want %d", got, ua)
	}
}
