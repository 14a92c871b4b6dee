package firmware

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/agent/tpm"
)

// These tests boot the real platform guest in QEMU (TCG) with each
// firmware of the host's catalogue, through the argv fragments of this
// package, the way the engine splices them in. They log boot-to-marker
// times (figures; no timed assertions).

const bootTimeout = 3 * time.Minute // TCG on a busy 2-core machine

type bootCase struct {
	firmware, arch string
	disk           string // the qcow2 base
	memoryMB       int
	seed           string
	fdset          bool     // pass the flash as descriptors (FlashArgs), as the engine does
	extra          []string // more QEMU arguments
}

// boot starts QEMU on an overlay of bc.disk with the firmware's arguments.
func boot(t *testing.T, c *Catalog, bc bootCase) *testguest.Machine {
	t.Helper()
	e, err := c.Resolve(bc.firmware, bc.arch, bc.memoryMB)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	vars := filepath.Join(dir, "vars.fd")
	if err := PrepareVars(e, vars); err != nil {
		t.Fatal(err)
	}
	o := testguest.MachineOptions{
		Arch:        bc.arch,
		MachineOpts: e.MachineOpts(),
		MemoryMB:    bc.memoryMB,
		Disk:        testguest.OverlayOf(t, bc.disk, dir),
		Seed:        bc.seed,
		Args:        append(e.Globals(), bc.extra...),
	}
	if bc.fdset {
		code, err := os.Open(e.Code)
		if err != nil {
			t.Fatal(err)
		}
		defer code.Close()
		vf, err := os.OpenFile(vars, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer vf.Close()
		o.Files = []*os.File{code, vf} // fd 4, 5
		o.Args = append(o.Args, "-add-fd", "fd=4,set=1", "-add-fd", "fd=5,set=2")
		o.Args = append(o.Args, e.FlashArgs("/dev/fdset/1", "/dev/fdset/2")...)
	} else {
		o.Args = append(o.Args, e.Args(vars)...)
	}
	return testguest.StartMachine(t, o)
}

// expectMarker waits for the next marker of want's kind and checks it.
func expectMarker(ctx context.Context, t *testing.T, m *testguest.Machine, want string) {
	t.Helper()
	w, _ := testguest.ParseMarker(want)
	line := m.Expect(ctx, t, testguest.Prefix+w.Kind+" ")
	if got, _ := testguest.ParseMarker(line); got != w {
		t.Errorf("got %q, want %q", line, want)
	}
}

func TestBootAMD64(t *testing.T) {
	c, _ := loadHost(t)
	t.Parallel()
	for _, tc := range []struct {
		name string
		bc   bootCase
		want string // the firmware marker, or a console line
	}{
		{"bios", bootCase{firmware: BIOS, memoryMB: 256}, "OTHERIX-GUEST firmware bios"},
		{"uefi", bootCase{firmware: UEFI, memoryMB: 256, fdset: true}, "OTHERIX-GUEST firmware uefi secureboot=0 lockdown=none"},
		{"uefi-secure-signed", bootCase{firmware: UEFISecure, memoryMB: 512, disk: "secureboot"},
			"OTHERIX-GUEST firmware uefi secureboot=1 lockdown=integrity"},
		// systemd-boot is not signed: the firmware refuses it.
		{"uefi-secure-unsigned", bootCase{firmware: UEFISecure, memoryMB: 512}, "Access Denied"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			bc := tc.bc
			bc.arch = "amd64"
			if bc.disk == "secureboot" {
				bc.disk = testguest.SecureBootImage(t)
			} else {
				bc.disk = testguest.QCOW2Arch(t, "amd64")
			}
			m := boot(t, c, bc)
			ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
			defer cancel()
			if tc.want == "Access Denied" {
				line := m.Expect(ctx, t, "Access Denied")
				t.Logf("refused after %v: %q", time.Since(m.Started).Round(time.Millisecond), line)
				return
			}
			m.Expect(ctx, t, testguest.Prefix+"booted ")
			t.Logf("boot-to-marker %s: %v", tc.name, time.Since(m.Started).Round(time.Millisecond))
			expectMarker(ctx, t, m, tc.want)
		})
	}
}

// TestBootARM64 boots the arm64 guest with AAVMF and a TPM (swtpm,
// tpm-tis-device): it reads its seed (as a virtio-scsi CD), its TPM
// answers, and system_powerdown (ACPI, booted via UEFI) powers it off;
// swtpm goes with QEMU.
func TestBootARM64(t *testing.T) {
	c, _ := loadHost(t)
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	dir := t.TempDir()
	seed := testguest.SeedISO(t, dir, "instance-id: arm-1\nlocal-hostname: arm1\n", "#cloud-config\n")
	run, err := os.MkdirTemp("/tmp", "fw")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(run)
	sw, err := tpm.Start(ctx, tpm.Config{StateDir: filepath.Join(dir, "tpm"), RunDir: run})
	if err != nil {
		t.Fatal(err)
	}
	// Registered before boot's cleanup, so it runs after QEMU is gone
	// (pass or fail), bounded: swtpm may not outlive the test.
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		sw.Stop(c)
	})
	tpmArgs, err := tpm.Args("arm64", sw.Socket())
	if err != nil {
		t.Fatal(err)
	}
	m := boot(t, c, bootCase{firmware: UEFI, arch: "arm64", disk: testguest.QCOW2Arch(t, "arm64"),
		memoryMB: 256, seed: seed, extra: tpmArgs})

	line := m.Expect(ctx, t, testguest.Prefix+"booted ")
	t.Logf("boot-to-marker arm64 uefi: %v", time.Since(m.Started).Round(time.Millisecond))
	mk, _ := testguest.ParseMarker(line)
	if f := testguest.Fields(mk.Value); f["arch"] != "arm64" {
		t.Errorf("booted marker %q, want arch=arm64", line)
	}
	expectMarker(ctx, t, m, "OTHERIX-GUEST firmware uefi secureboot=0 lockdown=none")
	expectMarker(ctx, t, m, "OTHERIX-GUEST tpm present=1 getrandom=ok")
	expectMarker(ctx, t, m, "OTHERIX-GUEST cidata label=cidata dev=sr0")
	expectMarker(ctx, t, m, "OTHERIX-GUEST cidata files=meta-data,user-data")
	expectMarker(ctx, t, m, "OTHERIX-GUEST cidata instance-id=arm-1")
	m.Expect(ctx, t, testguest.Prefix+"ready")
	t.Logf("boot-to-ready arm64 uefi: %v", time.Since(m.Started).Round(time.Millisecond))

	if err := m.QMP(ctx, "system_powerdown"); err != nil {
		t.Fatal(err)
	}
	m.Expect(ctx, t, testguest.Prefix+"powering off")
	if err := m.WaitExit(ctx); err != nil {
		t.Fatalf("qemu: %v", err)
	}
	select {
	case <-sw.Done():
	case <-ctx.Done():
		t.Fatal("swtpm outlived QEMU")
	}
}
