package vm

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/internal/errcode"
)

var update = flag.Bool("update", false, "rewrite golden files")

func goldenSpec() Spec {
	return Spec{
		Name: "web-1", UUID: "0f8fad5b-d9cb-469f-a165-70867728950e", Arch: ArchAMD64,
		VCPUs: 2, MemoryMB: 2048,
		Disks:  []Disk{{Path: "/var/lib/otherix/pools/default/vms/0f8fad5b/root.qcow2", Format: "qcow2"}},
		CDROMs: []CDROM{{Path: "/var/lib/otherix/vms/0f8fad5b/seed.iso"}},
	}
}

var goldenPaths = Paths{
	QMPSocket:  "/run/otherix/0f8fad5bd9cb/qmp.sock",
	QGASocket:  "/run/otherix/0f8fad5bd9cb/qga.sock",
	ConsoleLog: "/var/lib/otherix/vms/0f8fad5b/console.log",
}

func TestBuildArgsGolden(t *testing.T) {
	comma := goldenSpec()
	comma.Disks[0].Path = "/pools/a,b/root.qcow2"
	comma.Disks[0].Backing = &Backing{Path: "/pools/images/sha256/ab,cd", Format: "raw"}
	comma.CDROMs = nil
	nvme := goldenSpec()
	nvme.Disks = append(nvme.Disks, Disk{Path: "/pools/data.raw", Format: "raw", Bus: BusNVMe, ReadOnly: true}, Disk{Path: "/pools/d2.qcow2", Format: "qcow2", Bus: BusVirtioSCSI})
	nvme.Disks[0].Bus = BusNVMe
	arm := goldenSpec()
	arm.Arch = ArchARM64
	arm.Firmware = &Firmware{Name: "uefi", Interface: "uefi", Code: "/usr/share/AAVMF/AAVMF_CODE.fd", CodeFormat: "raw", Vars: "/pools/vm/efivars.fd", VarsFormat: "raw"}
	secure := goldenSpec()
	secure.MemoryMB = 512
	secure.Firmware = &Firmware{Name: "uefi-secure", Interface: "uefi", Code: "/usr/share/OVMF/OVMF_CODE_4M.ms.fd", CodeFormat: "raw", Vars: "/pools/vm/efivars.fd", VarsFormat: "raw", RequiresSMM: true, SecureBoot: true}
	// Host devices: a GPU and its audio function, an mdev, two USB
	// devices and the host's TPM 1.2, as hostdev.Host.Resolve plans them.
	passthrough := goldenSpec()
	passthrough.VNC = &VNC{Listen: "127.0.0.1", Port: 5901}
	passthrough.HostDevices = &hostdev.Spec{
		PCI: []hostdev.PCI{{Address: "0000:01:00.1"}},
		GPU: []hostdev.GPU{{Type: hostdev.GPUPhysical, PCI: "0000:01:00.0"}, {Type: hostdev.GPUMdev, Mdev: "i915-GVTg_V5_4"}},
		USB: []hostdev.USB{{VendorID: "0x0781", ProductID: "0x5583"}, {Bus: new(3), Dev: new(7)}},
		TPM: &hostdev.TPM{Path: "/dev/tpm0"},
	}
	passthroughPlan := &hostdev.Plan{VM: passthrough.UUID,
		VFIO: []hostdev.VFIODev{
			{Kind: hostdev.KindPCI, Address: "0000:01:00.1", Group: 12, Driver: "vfio-pci"},
			{Kind: hostdev.KindGPU, Address: "0000:01:00.0", Group: 12, Driver: "vfio-pci"},
			{Kind: hostdev.KindMdev, Mdev: &hostdev.MdevDev{UUID: "4b20d080-1b54-4048-85b3-a6a62d165c01", Parent: "0000:00:02.0", Type: "i915-GVTg_V5_4"}, Group: 20},
		},
		USB: []hostdev.USBDev{{Name: "1-1.2", Bus: 1, Dev: 5, Node: "/dev/bus/usb/001/005"}, {Name: "3-2", Bus: 3, Dev: 7, Node: "/dev/bus/usb/003/007"}},
		TPM: &hostdev.TPMDev{Path: "/dev/tpm0", Cancel: "/sys/class/tpm/tpm0/device/cancel", Version: 1},
	}
	for _, tc := range []struct {
		name  string
		spec  Spec
		accel string
		plan  *hostdev.Plan
	}{
		{"passthrough", passthrough, "tcg", passthroughPlan},
		{"amd64-seed", goldenSpec(), "tcg", nil},
		{"amd64-kvm", goldenSpec(), "kvm", nil},
		{"comma-path", comma, "tcg", nil},
		{"buses", nvme, "tcg", nil},
		{"arm64", arm, "tcg", nil},
		{"uefi-secure", secure, "tcg", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args, files, err := BuildArgs(&tc.spec, goldenPaths, Platform{Accel: tc.accel, HostDevices: tc.plan})
			if err != nil {
				t.Fatal(err)
			}
			got := strings.Join(args, "\n") + "\n-- inherited files (fd 3, 4, ...)\n"
			for _, f := range files {
				got += fmt.Sprintf("%s %d\n", f.Path, f.Kind)
			}
			path := filepath.Join("testdata", "argv", tc.name+".golden")
			if *update {
				os.MkdirAll(filepath.Dir(path), 0o755)
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update)", err)
			}
			if got != string(want) {
				t.Errorf("argv differs from %s:\n--- got\n%s--- want\n%s", path, got, want)
			}
		})
	}
}

func TestBuildArgsRefusesInjection(t *testing.T) {
	for _, tc := range []struct {
		name string
		mut  func(*Spec)
	}{
		{"name with comma", func(s *Spec) { s.Name = "a,b" }},
		{"name with equals", func(s *Spec) { s.Name = "a=b" }},
		{"name option", func(s *Spec) { s.Name = "-daemonize" }},
		{"uuid literal name", func(s *Spec) { s.Name = "0f8fad5b-d9cb-469f-a165-70867728950e" }},
		{"long name", func(s *Spec) { s.Name = strings.Repeat("a", 64) }},
		{"relative disk", func(s *Spec) { s.Disks[0].Path = "root.qcow2" }},
		{"dotdot disk", func(s *Spec) { s.Disks[0].Path = "/pools/../etc/shadow" }},
		{"newline path", func(s *Spec) { s.Disks[0].Path = "/pools/a\nb" }},
		{"bad format", func(s *Spec) { s.Disks[0].Format = "qcow2,file.driver=ssh" }},
		{"bad uuid", func(s *Spec) { s.UUID = "0f8fad5b,d9cb" }},
		{"vcpus 0", func(s *Spec) { s.VCPUs = 0 }},
		{"vcpus 129", func(s *Spec) { s.VCPUs = 129 }},
		{"memory 127", func(s *Spec) { s.MemoryMB = 127 }},
		{"memory too big", func(s *Spec) { s.MemoryMB = 524289 }},
		{"arch", func(s *Spec) { s.Arch = "riscv64" }},
		{"no disk", func(s *Spec) { s.Disks = nil }},
		{"bad mac", func(s *Spec) { s.NICs = []NIC{{Type: "user", MAC: "52:54:00:00:00:00,x"}} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := goldenSpec()
			tc.mut(&s)
			_, _, err := BuildArgs(&s, goldenPaths, Platform{})
			if errcode.Of(err) != errcode.ValidationFailed {
				t.Fatalf("got %v, want validation_failed", err)
			}
		})
	}
}

// parseOpts splits a QEMU option string into key/value pairs the way QEMU
// does: a doubled comma is a literal comma.
func parseOpts(s string) [][2]string {
	var out [][2]string
	var cur strings.Builder
	flush := func() {
		k, v, _ := strings.Cut(cur.String(), "=")
		out = append(out, [2]string{k, v})
		cur.Reset()
	}
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			flush()
			continue
		}
		cur.WriteByte(s[i])
	}
	flush()
	return out
}

// FuzzBuildArgs proves that no name or path can add a QEMU option: for
// every accepted input, QEMU's own parsing of the disk's -blockdev gives
// back exactly our keys with the path as the filename.
func FuzzBuildArgs(f *testing.F) {
	f.Add("web-1", "/pools/a/root.qcow2")
	f.Add("a,b", "/pools/a,b/root.qcow2")
	f.Add("x", "/p/,file.driver=ssh")
	f.Add("x", "/p/a,,b,")
	f.Fuzz(func(t *testing.T, name, path string) {
		s := goldenSpec()
		s.Name = name
		s.Disks[0].Path = path
		args, files, err := BuildArgs(&s, goldenPaths, Platform{})
		if err != nil {
			return
		}
		// No path reaches the command line: the disk is inherited as a
		// descriptor, and the -name value parses back to exactly the name.
		for _, a := range args {
			if a == path {
				t.Fatalf("path %q on the command line", path)
			}
			for _, kv := range parseOpts(a) {
				if kv[1] == path || kv[0] == path {
					t.Fatalf("path %q on the command line: %q", path, a)
				}
			}
		}
		found := false
		for _, f := range files {
			found = found || f.Path == path
		}
		if !found {
			t.Fatalf("disk %q not among inherited files %v", path, files)
		}
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "-name" {
				kv := parseOpts(args[i+1])
				if len(kv) != 2 || kv[0] != [2]string{"guest", name} || kv[1] != [2]string{"debug-threads", "on"} {
					t.Fatalf("name %q gave options %q", name, kv)
				}
				return
			}
		}
		t.Fatalf("no -name in %q", args)
	})
}

func TestSocketPathBudget(t *testing.T) {
	_, err := New(Config{StateDir: t.TempDir(), RunDir: "/" + strings.Repeat("r", 90)})
	if err == nil {
		t.Fatal("want an error for a runtime dir that makes socket paths too long")
	}
}

func TestMACFromUUID(t *testing.T) {
	a := MACFromUUID("0f8fad5b-d9cb-469f-a165-70867728950e", 0)
	b := MACFromUUID("0f8fad5b-d9cb-469f-a165-70867728950e", 1)
	if a != MACFromUUID("0f8fad5b-d9cb-469f-a165-70867728950e", 0) || a == b || !strings.HasPrefix(a, "52:54:00:") || !strings.HasPrefix(b, "52:54:00:") {
		t.Fatalf("got %s %s: want stable, distinct, under 52:54:00", a, b)
	}
}
