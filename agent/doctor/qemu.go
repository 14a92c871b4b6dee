package doctor

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/vm"
)

// minQEMU is the oldest QEMU the agent is tested with (Debian 12's 7.2
// is the reference); older ones get a WARN.
var minQEMU = [2]int{7, 0}

var versionRE = regexp.MustCompile(`version (\d+)\.(\d+)(?:\.(\d+))?`)

// parseVersion reads "QEMU emulator version 7.2.22 (Debian ...)" or
// "qemu-img version 7.2.22 ...": the dotted version and major, minor.
func parseVersion(out []byte) (string, int, int, bool) {
	line, _, _ := strings.Cut(string(out), "\n")
	m := versionRE.FindStringSubmatch(line)
	if m == nil {
		return "", 0, 0, false
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	v := m[1] + "." + m[2]
	if m[3] != "" {
		v += "." + m[3]
	}
	return v, major, minor, true
}

// versionOf runs bin --version with a bound.
func versionOf(ctx context.Context, env Env, bin string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return env.Output(ctx, bin, "--version")
}

// archInfo names what each guest arch needs.
var archInfo = []struct {
	arch, qemuArch, pkg, uefiPkg string
}{
	{vm.ArchAMD64, "x86_64", "qemu-system-x86", "ovmf"},
	{vm.ArchARM64, "aarch64", "qemu-system-arm", "qemu-efi-aarch64"},
}

// checkQEMU checks the QEMU binary of each guest arch. The host's own
// arch is required (FAIL); the other is optional (WARN).
func checkQEMU(ctx context.Context, cfg *config.Config, env Env) []Result {
	bins := map[string]string{vm.ArchAMD64: cfg.QEMU.X86_64, vm.ArchARM64: cfg.QEMU.AArch64}
	var out []Result
	for _, a := range archInfo {
		r := Result{Check: "qemu " + a.arch}
		bin := bins[a.arch]
		if bin == "" {
			bin = "qemu-system-" + a.qemuArch
		}
		missing := Warn
		if a.arch == runtime.GOARCH {
			missing = Fail
		}
		path, err := env.LookPath(bin)
		if err != nil {
			r.Status, r.Detail = missing, fmt.Sprintf("%s not found: %s guests cannot run", bin, a.arch)
			r.Fix = "apt-get install " + a.pkg
			out = append(out, r)
			continue
		}
		b, err := versionOf(ctx, env, path)
		if err != nil {
			r.Status, r.Detail = missing, fmt.Sprintf("%s --version failed: %v", path, err)
			r.Fix = "reinstall " + a.pkg + " (apt-get install --reinstall " + a.pkg + ")"
			out = append(out, r)
			continue
		}
		v, major, minor, ok := parseVersion(b)
		switch {
		case !ok:
			r.Status, r.Detail = Warn, fmt.Sprintf("%s: unrecognised version output %q", path, firstLine(b))
			r.Fix = "check that " + path + " is QEMU"
		case major < minQEMU[0] || major == minQEMU[0] && minor < minQEMU[1]:
			r.Status, r.Detail = Warn, fmt.Sprintf("%s: QEMU %s is older than %d.%d, the oldest tested", path, v, minQEMU[0], minQEMU[1])
			r.Fix = "upgrade " + a.pkg
		default:
			r.Status, r.Detail = OK, fmt.Sprintf("%s: QEMU %s", path, v)
		}
		out = append(out, r)
	}
	return out
}

func firstLine(b []byte) string {
	line, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return line
}

// checkKVM tells whether VMs get KVM or run under TCG, and why. The
// verdict is vm.DetectAccel's (what the engine uses); the reason comes
// from looking at /dev/kvm and the CPU flags.
func checkKVM(cfg *config.Config, env Env) Result {
	r := Result{Check: "kvm"}
	if cfg.QEMU.Accel == "tcg" {
		r.Status, r.Detail = OK, "qemu.accel is tcg: KVM is not used"
		return r
	}
	if env.Accel() == "kvm" {
		r.Status, r.Detail = OK, "/dev/kvm is usable: VMs run with KVM"
		return r
	}
	var why string
	f, err := os.OpenFile(env.path("/dev/kvm"), os.O_RDWR, 0)
	switch {
	case os.IsNotExist(err):
		why = "/dev/kvm does not exist"
		r.Fix = "enable VT-x/AMD-V in the firmware and load the module (modprobe kvm_intel or kvm_amd)"
	case err != nil:
		why = fmt.Sprintf("/dev/kvm cannot be opened (%v)", unwrapPath(err))
		r.Fix = "run the agent as root or in group kvm"
	default:
		f.Close()
		if (runtime.GOARCH == "amd64" || runtime.GOARCH == "386") && !cpuHasVirt(env) {
			why = "/dev/kvm opens but the CPU has no vmx/svm flag (nested virtualization off?)"
			r.Fix = "enable nested virtualization on the outer hypervisor or run on bare metal; or set qemu.accel: tcg"
		} else {
			why = "/dev/kvm opens but does not answer like KVM"
			r.Fix = "check dmesg for kvm errors"
		}
	}
	if cfg.QEMU.Accel == "kvm" {
		r.Status, r.Detail = Fail, "qemu.accel is kvm but "+why+": VMs will not start"
		r.Fix += "; or set qemu.accel: auto"
		return r
	}
	r.Status, r.Detail = Warn, why+": VMs run under TCG (emulation, slow)"
	return r
}

func unwrapPath(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// cpuHasVirt reports whether /proc/cpuinfo lists vmx or svm.
func cpuHasVirt(env Env) bool {
	b, err := os.ReadFile(env.path("/proc/cpuinfo"))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "flags") {
			continue
		}
		for _, f := range strings.Fields(line) {
			if f == "vmx" || f == "svm" {
				return true
			}
		}
		return false
	}
	return false
}

// checkQemuImg checks qemu-img, which the image cache needs to inspect
// images and create overlays.
func checkQemuImg(ctx context.Context, env Env) Result {
	r := Result{Check: "qemu-img"}
	path, err := env.LookPath("qemu-img")
	if err != nil {
		r.Status, r.Detail, r.Fix = Fail, "qemu-img not found: images cannot be checked nor disks created", "apt-get install qemu-utils"
		return r
	}
	b, err := versionOf(ctx, env, path)
	if err != nil {
		r.Status, r.Detail, r.Fix = Fail, fmt.Sprintf("%s --version failed: %v", path, err), "apt-get install --reinstall qemu-utils"
		return r
	}
	v, _, _, ok := parseVersion(b)
	if !ok {
		r.Status, r.Detail, r.Fix = Warn, fmt.Sprintf("%s: unrecognised version output %q", path, firstLine(b)), "check that "+path+" is qemu-img"
		return r
	}
	r.Status, r.Detail = OK, fmt.Sprintf("%s: %s", path, v)
	return r
}

// SeaBIOSPath is the BIOS QEMU boots amd64 guests with by default.
const SeaBIOSPath = "/usr/share/seabios/bios-256k.bin"

// FirmwareDescriptorDir holds QEMU's firmware descriptors (docs/interop/
// firmware.json): one JSON file per UEFI build.
const FirmwareDescriptorDir = "/usr/share/qemu/firmware"

// descriptor is the part of a QEMU firmware descriptor the check reads.
type descriptor struct {
	InterfaceTypes []string `json:"interface-types"`
	Mapping        struct {
		Device     string `json:"device"`
		Executable struct {
			Filename string `json:"filename"`
		} `json:"executable"`
		Filename string `json:"filename"` // device "memory"
	} `json:"mapping"`
	Targets []struct {
		Architecture string `json:"architecture"`
	} `json:"targets"`
}

// checkFirmware checks SeaBIOS (amd64 BIOS guests) and, per arch, that a
// UEFI firmware descriptor whose code file exists is installed (arm64
// guests boot only with UEFI).
func checkFirmware(env Env) []Result {
	bios := Result{Check: "firmware bios"}
	if exists(env.path(SeaBIOSPath)) {
		bios.Status, bios.Detail = OK, SeaBIOSPath
	} else {
		bios.Status, bios.Detail, bios.Fix = Fail, SeaBIOSPath+" missing: amd64 BIOS guests cannot boot", "apt-get install seabios"
	}
	found, bad, err := uefiDescriptors(env)
	out := []Result{bios}
	for _, a := range archInfo {
		r := Result{Check: "firmware uefi " + a.arch}
		names := found[a.qemuArch]
		switch {
		case len(names) > 0:
			r.Status, r.Detail = OK, fmt.Sprintf("%d descriptors in %s (%s)", len(names), FirmwareDescriptorDir, strings.Join(names, ", "))
		case err != nil:
			r.Status, r.Detail, r.Fix = Warn, fmt.Sprintf("cannot read %s: %v", FirmwareDescriptorDir, unwrapPath(err)), "apt-get install "+a.uefiPkg
		default:
			r.Status, r.Detail = Warn, fmt.Sprintf("no UEFI firmware for %s in %s", a.qemuArch, FirmwareDescriptorDir)
			if a.arch == vm.ArchARM64 {
				r.Detail += ": arm64 guests cannot boot"
			} else {
				r.Detail += ": only BIOS guests"
			}
			if len(bad) > 0 {
				r.Detail += fmt.Sprintf(" (unusable: %s)", strings.Join(bad, ", "))
			}
			r.Fix = "apt-get install " + a.uefiPkg
		}
		out = append(out, r)
	}
	return out
}

// uefiDescriptors reads the descriptor dir: for each QEMU arch, the
// descriptor files of UEFI builds whose code file exists; bad lists the
// ones that cannot be used (unreadable, or their file is missing).
func uefiDescriptors(env Env) (map[string][]string, []string, error) {
	dir := env.path(FirmwareDescriptorDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, err
	}
	found := map[string][]string{}
	var bad []string
	for _, e := range ents {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		var d descriptor
		if err == nil {
			err = json.Unmarshal(b, &d)
		}
		if err != nil {
			bad = append(bad, e.Name())
			continue
		}
		uefi := false
		for _, t := range d.InterfaceTypes {
			uefi = uefi || t == "uefi"
		}
		if !uefi {
			continue
		}
		file := d.Mapping.Executable.Filename
		if file == "" {
			file = d.Mapping.Filename
		}
		if file == "" || !exists(env.path(file)) {
			bad = append(bad, e.Name())
			continue
		}
		for _, t := range d.Targets {
			found[t.Architecture] = append(found[t.Architecture], e.Name())
		}
	}
	for _, v := range found {
		sort.Strings(v)
	}
	sort.Strings(bad)
	return found, bad, nil
}

// checkSwtpm checks swtpm, which emulated TPM devices need.
func checkSwtpm(env Env) Result {
	r := Result{Check: "swtpm"}
	if p, err := env.LookPath("swtpm"); err == nil {
		r.Status, r.Detail = OK, p
	} else {
		r.Status, r.Detail, r.Fix = Warn, "swtpm not found: VMs cannot have a TPM", "apt-get install swtpm swtpm-tools"
	}
	return r
}

// checkPassthrough: PCI and GPU passthrough need an IOMMU (groups under
// /sys/kernel/iommu_groups) and the vfio-pci driver; USB and host TPM
// passthrough need neither.
func checkPassthrough(env Env) Result {
	r := Result{Check: "passthrough"}
	groups, _ := os.ReadDir(env.path("/sys/kernel/iommu_groups"))
	switch {
	case len(groups) == 0:
		r.Status, r.Detail, r.Fix = Warn, "no IOMMU groups: PCI and GPU passthrough unavailable (USB and host TPM work)",
			"enable VT-d or AMD-Vi in the firmware, boot with intel_iommu=on or amd_iommu=on"
	case !exists(env.path("/sys/bus/pci/drivers/vfio-pci")):
		r.Status, r.Detail, r.Fix = Warn, fmt.Sprintf("%d IOMMU groups, vfio-pci not loaded: PCI and GPU passthrough unavailable", len(groups)), "modprobe vfio-pci"
	default:
		r.Status, r.Detail = OK, fmt.Sprintf("%d IOMMU groups, vfio-pci loaded", len(groups))
	}
	return r
}
