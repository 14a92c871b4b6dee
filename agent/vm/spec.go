// Package vm is the QEMU VM engine: it owns every VM on this host, builds
// QEMU's command line, launches and re-adopts QEMU processes, drives them
// over QMP and persists their state.
//
// One owner per VM: operations on one VM are serialized (a second operation
// arriving while one runs gets a conflict error, never a silent wait), and
// operations on different VMs run concurrently. QEMU processes live in their
// own process group (or systemd scope) so they outlive the agent; a new agent
// process re-adopts them from the persisted state.
package vm

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Limits from seed 004.
const (
	MinVCPUs    = 1
	MaxVCPUs    = 128
	MinMemoryMB = 128
	MaxMemoryMB = 524288
)

// MinCPULimit is the smallest CPU cap (one percent of a CPU); the largest
// is MaxVCPUs.
const MinCPULimit = 0.01

// ValidateCPULimit accepts 0 (no cap) or MinCPULimit..MaxVCPUs CPUs.
func ValidateCPULimit(l float64) error {
	if l == 0 || (l >= MinCPULimit && l <= MaxVCPUs) {
		return nil
	}
	return errcode.New(errcode.ValidationFailed, "cpu_limit %g out of range %g..%d CPUs (0: no cap)", l, MinCPULimit, MaxVCPUs)
}

// Arches the engine knows.
const (
	ArchAMD64 = "amd64"
	ArchARM64 = "arm64"
)

// Disk buses.
const (
	BusVirtioBlk  = "virtio-blk"
	BusVirtioSCSI = "virtio-scsi"
	BusNVMe       = "nvme"
)

// Spec is what the engine needs to run a VM. It is persisted with the VM.
type Spec struct {
	Name     string `json:"name"`
	UUID     string `json:"uuid"`
	Arch     string `json:"arch"`
	VCPUs    int    `json:"vcpus"`
	MemoryMB int    `json:"memory_mb"`
	// CPULimit caps the CPU time of the VM's QEMU, in CPUs (0.5 is half
	// of one CPU's time; 0 is no cap). It needs systemd scopes.
	CPULimit float64 `json:"cpu_limit,omitempty"`
	// Disks in boot order; the first is the root disk.
	Disks []Disk `json:"disks"`
	// CDROMs, e.g. the cloud-init seed ISO.
	CDROMs []CDROM `json:"cdroms,omitempty"`
	// NICs; none means one SLIRP (user-mode) NIC.
	NICs []NIC `json:"nics,omitempty"`
	// Firmware is the guest firmware; nil means QEMU's default (SeaBIOS on
	// amd64).
	Firmware *Firmware `json:"firmware,omitempty"`
	// TPM, when set, gives the guest a TPM 2.0 emulated by a per-VM swtpm
	// whose state lives in TPM.State.
	TPM *TPM `json:"tpm,omitempty"`
	// VNC, when set, gives the guest a display adapter and a VNC console
	// with password authentication; the password is set over QMP after
	// start (Config.AfterStart), never on the command line.
	VNC *VNC `json:"vnc,omitempty"`
	// HostDevices are host PCI functions, GPUs, USB devices and a host TPM
	// passed through (Config.HostDevices resolves and acquires them at
	// every start).
	HostDevices *hostdev.Spec `json:"host_devices,omitempty"`
	// OwnedPaths are files and directories created for this VM (overlay
	// disk, seed ISO, ...) that delete removes. Each must be absolute.
	OwnedPaths []string `json:"owned_paths,omitempty"`
}

// Disk is a block device backed by a file.
type Disk struct {
	Path   string `json:"path"`
	Format string `json:"format"` // qcow2 or raw
	// Backing is the read-only image a qcow2 overlay sits on (the cached
	// image). QEMU gets it as an explicit node, opened by the agent, so it
	// never opens the path named in the overlay's header.
	Backing   *Backing `json:"backing,omitempty"`
	Bus       string   `json:"bus,omitempty"`
	ReadOnly  bool     `json:"readonly,omitempty"`
	BootIndex int      `json:"boot_index,omitempty"` // 0 = not bootable unless root
}

// Firmware is a resolved firmware catalogue entry and the VM's own UEFI
// variable store.
type Firmware struct {
	Name        string `json:"name"`      // bios, uefi, uefi-secure
	Interface   string `json:"interface"` // bios or uefi
	Code        string `json:"code,omitempty"`
	CodeFormat  string `json:"code_format,omitempty"`
	Vars        string `json:"vars,omitempty"` // the VM's copy of the template
	VarsFormat  string `json:"vars_format,omitempty"`
	RequiresSMM bool   `json:"requires_smm,omitempty"`
	SecureBoot  bool   `json:"secure_boot,omitempty"`
}

// VNC is a VNC console on Listen:Port.
type VNC struct {
	Listen string `json:"listen"`
	Port   int    `json:"port"`
}

// TPM is an emulated TPM 2.0.
type TPM struct {
	State string `json:"state"` // swtpm's state directory, kept across restarts
}

// Backing is a disk's backing image.
type Backing struct {
	Path   string `json:"path"`
	Format string `json:"format"`
}

// CDROM is a read-only ISO attached as virtio-scsi scsi-cd.
type CDROM struct {
	Path      string `json:"path"`
	BootIndex int    `json:"boot_index,omitempty"`
}

// NIC types.
const (
	NICUser    = "user"    // SLIRP, in QEMU
	NICBridge  = "bridge"  // a tap on a host bridge
	NICMACVLAN = "macvlan" // a macvtap on a host interface
)

// NIC is a network interface.
type NIC struct {
	Type    string `json:"type"`
	MAC     string `json:"mac"`
	Bridge  string `json:"bridge,omitempty"`  // NICBridge
	Parent  string `json:"parent,omitempty"`  // NICMACVLAN
	Network string `json:"network,omitempty"` // the configured network's name, for views
	// Forwards are host ports forwarded into the guest by SLIRP (user
	// NICs only; bridged VMs get the agent's proxy).
	Forwards []portfwd.Rule `json:"forwards,omitempty"`
}

var (
	uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	macRE  = regexp.MustCompile(`^[0-9a-f]{2}(:[0-9a-f]{2}){5}$`)
	// ifnameRE: a Linux interface name (IFNAMSIZ-1), no separators.
	ifnameRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)
)

// IsUUID reports whether s is a UUID literal (any case).
func IsUUID(s string) bool { return api.IsUUID(s) }

// ValidateName checks a VM name: a hostname label (1..63 of [A-Za-z0-9-],
// no leading or trailing dash) that is not a UUID literal. Names reach file
// names, QEMU's argv and the guest's hostname, so the charset is strict.
func ValidateName(name string) error {
	if IsUUID(name) {
		return errcode.New(errcode.ValidationFailed, "name %q is a UUID literal; VMs are name-keyed", name)
	}
	if !api.IsName(name) {
		return errcode.New(errcode.ValidationFailed, "name %q is invalid: use 1 to 63 letters, digits and dashes, not starting or ending with a dash", name)
	}
	return nil
}

// Validate checks a spec before anything is created for it.
func (s *Spec) Validate() error {
	if err := ValidateName(s.Name); err != nil {
		return err
	}
	if !uuidRE.MatchString(s.UUID) {
		return errcode.New(errcode.ValidationFailed, "uuid %q is not a lowercase UUID", s.UUID)
	}
	switch s.Arch {
	case ArchAMD64, ArchARM64:
	default:
		return errcode.New(errcode.ValidationFailed, "arch %q is not supported: use amd64 or arm64", s.Arch)
	}
	if s.VCPUs < MinVCPUs || s.VCPUs > MaxVCPUs {
		return errcode.New(errcode.ValidationFailed, "vcpus %d out of range %d..%d", s.VCPUs, MinVCPUs, MaxVCPUs)
	}
	if s.MemoryMB < MinMemoryMB || s.MemoryMB > MaxMemoryMB {
		return errcode.New(errcode.ValidationFailed, "memory_mb %d out of range %d..%d", s.MemoryMB, MinMemoryMB, MaxMemoryMB)
	}
	if err := ValidateCPULimit(s.CPULimit); err != nil {
		return err
	}
	if len(s.Disks) == 0 {
		return errcode.New(errcode.ValidationFailed, "a VM needs a root disk")
	}
	for i, d := range s.Disks {
		if err := checkPath(d.Path); err != nil {
			return errcode.Wrap(errcode.ValidationFailed, err, "disk %d", i)
		}
		switch d.Format {
		case "qcow2", "raw":
		default:
			return errcode.New(errcode.ValidationFailed, "disk %d: format %q is not supported", i, d.Format)
		}
		if b := d.Backing; b != nil {
			if d.Format != "qcow2" {
				return errcode.New(errcode.ValidationFailed, "disk %d: only qcow2 disks have a backing image", i)
			}
			if err := checkPath(b.Path); err != nil {
				return errcode.Wrap(errcode.ValidationFailed, err, "disk %d backing", i)
			}
			if b.Format != "qcow2" && b.Format != "raw" {
				return errcode.New(errcode.ValidationFailed, "disk %d: backing format %q is not supported", i, b.Format)
			}
		}
		switch d.Bus {
		case "", BusVirtioBlk, BusVirtioSCSI, BusNVMe:
		default:
			return errcode.New(errcode.ValidationFailed, "disk %d: bus %q is not supported", i, d.Bus)
		}
	}
	for i, c := range s.CDROMs {
		if err := checkPath(c.Path); err != nil {
			return errcode.Wrap(errcode.ValidationFailed, err, "cdrom %d", i)
		}
	}
	if len(s.NICs) > netdev.MaxNICs {
		return errcode.New(errcode.ValidationFailed, "%d NICs: at most %d", len(s.NICs), netdev.MaxNICs)
	}
	var forwards []portfwd.Rule
	for i, n := range s.NICs {
		switch n.Type {
		case NICUser:
		case NICBridge:
			if !ifnameRE.MatchString(n.Bridge) {
				return errcode.New(errcode.ValidationFailed, "nic %d: bridge %q is not an interface name", i, n.Bridge)
			}
		case NICMACVLAN:
			if !ifnameRE.MatchString(n.Parent) {
				return errcode.New(errcode.ValidationFailed, "nic %d: parent %q is not an interface name", i, n.Parent)
			}
		default:
			return errcode.New(errcode.ValidationFailed, "nic %d: type %q is not supported", i, n.Type)
		}
		if !macRE.MatchString(n.MAC) {
			return errcode.New(errcode.ValidationFailed, "nic %d: mac %q is not a lowercase MAC address", i, n.MAC)
		}
		if err := netdev.ValidateMAC(n.MAC); err != nil {
			return err
		}
		if len(n.Forwards) > 0 && n.Type != NICUser {
			return errcode.New(errcode.ValidationFailed, "nic %d: port forwards of a %s NIC are the agent's proxy, not QEMU's", i, n.Type)
		}
		forwards = append(forwards, n.Forwards...)
	}
	if _, err := portfwd.Validate(nil, forwards); err != nil {
		return err
	}
	if f := s.Firmware; f != nil && f.Interface == "uefi" {
		for _, p := range []string{f.Code, f.Vars} {
			if err := checkPath(p); err != nil {
				return errcode.Wrap(errcode.ValidationFailed, err, "firmware")
			}
		}
		for _, fmt := range []string{f.CodeFormat, f.VarsFormat} {
			if fmt != "raw" && fmt != "qcow2" {
				return errcode.New(errcode.ValidationFailed, "firmware format %q is not supported", fmt)
			}
		}
	}
	if s.TPM != nil {
		if err := checkPath(s.TPM.State); err != nil {
			return errcode.Wrap(errcode.ValidationFailed, err, "tpm state")
		}
	}
	if hd := s.HostDevices; !hd.Empty() {
		if err := hd.Validate(); err != nil {
			return err
		}
		if hd.TPM != nil && s.TPM != nil {
			return errcode.New(errcode.ValidationFailed, "a vm has one TPM: emulated or the host's, not both")
		}
	}
	for _, p := range s.OwnedPaths {
		if err := checkPath(p); err != nil {
			return errcode.Wrap(errcode.ValidationFailed, err, "owned path")
		}
	}
	return nil
}

// checkPath refuses paths that are relative, unclean or carry characters
// that have a meaning to QEMU's option parser beyond the comma (which
// escapeOpt doubles) or to a terminal.
func checkPath(p string) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("path %q is not absolute", p)
	}
	if filepath.Clean(p) != p {
		return fmt.Errorf("path %q is not clean", p)
	}
	for _, r := range p {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("path %q has a control character", p)
		}
	}
	return nil
}

// ShortID is the per-VM id used for runtime paths and device names: the
// first 12 hex digits of the uuid. It never derives from the VM's name.
func ShortID(uuid string) string {
	return strings.ReplaceAll(uuid, "-", "")[:12]
}

// MACFromUUID derives a stable, locally administered MAC under 52:54:00
// from the VM's uuid and the NIC's index.
func MACFromUUID(uuid string, index int) string { return netdev.GenerateMAC(uuid, index) }
