// Package firmware is the catalogue of guest firmware the host can boot:
// SeaBIOS and the UEFI builds QEMU's firmware interop descriptors describe
// (/usr/share/qemu/firmware/*.json), each under a stable name and uuid,
// and the QEMU arguments that boot one.
//
// Names (per arch):
//
//	bios         amd64: SeaBIOS, QEMU's own default firmware
//	uefi         amd64, arm64: UEFI without secure boot (OVMF, AAVMF)
//	uefi-secure  amd64, arm64: UEFI with secure boot enforced, Microsoft's
//	             keys enrolled (descriptors with secure-boot and enrolled-keys)
//
// An entry's uuid is a version 5 uuid over "<name>/<arch>": the same on
// every host and every run. The default is bios on amd64, uefi on arm64.
package firmware

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Entry names.
const (
	BIOS       = "bios"
	UEFI       = "uefi"
	UEFISecure = "uefi-secure"
)

// Names lists the entry names, in catalogue order.
var Names = []string{BIOS, UEFI, UEFISecure}

// SecureBootMinMemoryMB is the least guest memory secure-boot OVMF boots
// with: with 256 MiB it resets in a loop.
const SecureBootMinMemoryMB = 384

// Namespace is the uuid namespace of entry uuids.
var Namespace = uuid.MustParse("6f1d1f8e-3c0a-4e57-9a63-7a6f74686572")

// EntryUUID returns the uuid of the entry name for arch.
func EntryUUID(name, arch string) string {
	return uuid.NewSHA1(Namespace, []byte(name+"/"+arch)).String()
}

// Arches and their QEMU names (descriptors' target architecture).
var qemuArch = map[string]string{"amd64": "x86_64", "arm64": "aarch64"}

// Defaults for Options.
var (
	DefaultDirs     = []string{"/etc/qemu/firmware", "/usr/share/qemu/firmware"}
	DefaultBinaries = map[string]string{"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}
	DefaultMachines = map[string]string{"amd64": "q35", "arm64": "virt"}
	defaultName     = map[string]string{"amd64": BIOS, "arm64": UEFI}
)

// Entry is one firmware of the catalogue. Its fields are read-only.
type Entry struct {
	Name string // bios, uefi, uefi-secure
	UUID string // EntryUUID(Name, Arch)
	Arch string // amd64, arm64

	Description string
	Interface   string // "bios" or "uefi"
	// Machine is the versioned machine type the entry was matched against
	// (what -machine q35 or virt resolves to: pc-q35-7.2, virt-7.2).
	Machine string
	// Descriptor is the interop descriptor's path; empty for bios.
	Descriptor string
	// Code is the firmware image (bios: the SeaBIOS file QEMU loads by
	// itself); VarsTemplate the UEFI variable store template, copied per VM.
	Code, CodeFormat         string
	VarsTemplate, VarsFormat string
	Features                 []string
	// SecureBoot: secure boot is enforced from the first boot (the
	// descriptor has secure-boot and enrolled-keys).
	SecureBoot bool
	// RequiresSMM: QEMU needs smm=on and a secure pflash (see MachineOpts
	// and Globals); without them the firmware hangs with no output at all.
	RequiresSMM bool
	// MinMemoryMB is the least guest memory it boots with (0: no limit
	// beyond the VM's own).
	MinMemoryMB int
}

// String names the entry for messages: "uefi-secure (amd64)".
func (e *Entry) String() string { return e.Name + " (" + e.Arch + ")" }

// Validate checks that a VM of arch with memoryMB of memory can boot e.
func (e *Entry) Validate(arch string, memoryMB int) error {
	if arch != e.Arch {
		return errcode.New(errcode.ValidationFailed, "firmware %s does not support arch %s", e, arch)
	}
	if e.MinMemoryMB > 0 && memoryMB < e.MinMemoryMB {
		return errcode.New(errcode.ValidationFailed, "firmware %s needs at least %d MiB of memory, the vm has %d", e, e.MinMemoryMB, memoryMB)
	}
	return nil
}

// NeedsVars reports whether a VM booting e needs its own variable store
// (PrepareVars).
func (e *Entry) NeedsVars() bool { return e.VarsTemplate != "" }

// Options says where Load looks. The zero value uses the defaults.
type Options struct {
	// Dirs are descriptor folders, most important first; a file name in an
	// earlier one hides the same name in later ones, and an empty file
	// hides it altogether (QEMU's interop rules). Default DefaultDirs.
	Dirs []string
	// Binaries is QEMU per arch (default DefaultBinaries); an arch whose
	// binary is missing gets no entries.
	Binaries map[string]string
	// Machines is the machine type per arch, as the engine gives it to
	// -machine (default DefaultMachines); descriptors are matched against
	// its resolved, versioned name.
	Machines map[string]string
	Logger   *zap.Logger
}

// Catalog is the firmware a host offers. It is immutable and safe for
// concurrent use.
type Catalog struct {
	entries []*Entry
	byUUID  map[string]*Entry
}

// descFile is a parsed descriptor and where it came from.
type descFile struct {
	path string
	d    *Descriptor
}

// Load builds the catalogue: it reads the descriptors, skips (with a log
// line) those that do not parse or name a file that does not exist, asks
// each arch's QEMU for its machine types and its firmware folders, and
// picks for each name and arch the first fitting descriptor in file name
// order (QEMU's priority order: 40-… before 60-…).
func Load(ctx context.Context, o Options) (*Catalog, error) {
	log := o.Logger
	if log == nil {
		log = zap.NewNop()
	}
	dirs := o.Dirs
	if dirs == nil {
		dirs = DefaultDirs
	}
	descs, err := readDescriptors(dirs, log)
	if err != nil {
		return nil, err
	}
	c := &Catalog{byUUID: map[string]*Entry{}}
	for _, arch := range []string{"amd64", "arm64"} {
		bin := pick(o.Binaries, DefaultBinaries, arch)
		mtype := pick(o.Machines, DefaultMachines, arch)
		machine, err := ResolveMachine(ctx, bin, mtype)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			log.Info("no firmware for this arch: cannot ask its qemu", zap.String("arch", arch), zap.Error(err))
			continue
		}
		if arch == "amd64" {
			if e, err := biosEntry(ctx, bin, machine); err != nil {
				log.Warn("no bios firmware", zap.String("arch", arch), zap.Error(err))
			} else {
				c.add(e)
			}
		}
		for _, name := range []string{UEFI, UEFISecure} {
			for _, df := range descs {
				if !df.d.MatchMachine(qemuArch[arch], machine) || !fits(name, df.d) {
					continue
				}
				c.add(uefiEntry(name, arch, machine, df))
				break
			}
		}
	}
	sort.Slice(c.entries, func(i, j int) bool {
		a, b := c.entries[i], c.entries[j]
		if a.Name != b.Name {
			return slices.Index(Names, a.Name) < slices.Index(Names, b.Name)
		}
		return a.Arch < b.Arch
	})
	for _, e := range c.entries {
		log.Debug("firmware", zap.String("firmware", e.Name), zap.String("arch", e.Arch),
			zap.String("uuid", e.UUID), zap.String("descriptor", e.Descriptor), zap.String("code", e.Code))
	}
	return c, nil
}

func pick(m, def map[string]string, arch string) string {
	if v := m[arch]; v != "" {
		return v
	}
	return def[arch]
}

// fits reports whether a descriptor can serve as the entry name.
func fits(name string, d *Descriptor) bool {
	if !d.SupportsInterface("uefi") || d.Mapping.Device != "flash" || d.Mapping.mode() != "split" {
		return false
	}
	switch name {
	case UEFI:
		return !d.Has("secure-boot")
	case UEFISecure:
		return d.Has("secure-boot") && d.Has("enrolled-keys")
	}
	return false
}

// readDescriptors returns the usable descriptors of dirs in priority
// order: by file name, a name in an earlier folder hiding later ones.
func readDescriptors(dirs []string, log *zap.Logger) ([]descFile, error) {
	chosen := map[string]string{} // file name → path
	for _, dir := range dirs {
		ents, err := os.ReadDir(dir)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, errcode.Wrap(errcode.Internal, err, "firmware: read %s", dir)
		}
		for _, e := range ents {
			if e.IsDir() || !strings.HasSuffix(e.Name(), ".json") {
				continue
			}
			if _, ok := chosen[e.Name()]; !ok {
				chosen[e.Name()] = filepath.Join(dir, e.Name())
			}
		}
	}
	names := make([]string, 0, len(chosen))
	for n := range chosen {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []descFile
	for _, n := range names {
		path := chosen[n]
		data, err := os.ReadFile(path)
		if err != nil {
			log.Warn("skip firmware descriptor", zap.String("descriptor", path), zap.Error(err))
			continue
		}
		if len(data) == 0 {
			continue // masked on purpose
		}
		d, err := ParseDescriptor(data)
		if err != nil {
			log.Warn("skip firmware descriptor", zap.String("descriptor", path), zap.Error(err))
			continue
		}
		if err := checkFiles(d); err != nil {
			log.Warn("skip firmware descriptor", zap.String("descriptor", path), zap.Error(err))
			continue
		}
		out = append(out, descFile{path: path, d: d})
	}
	return out, nil
}

// checkFiles checks that every file a descriptor names is a readable
// regular file (shipped descriptors can name files their package lacks).
func checkFiles(d *Descriptor) error {
	var files []string
	m := &d.Mapping
	if m.Executable != nil {
		files = append(files, m.Executable.Filename)
	}
	if m.NVRAMTemplate != nil {
		files = append(files, m.NVRAMTemplate.Filename)
	}
	if m.Filename != "" {
		files = append(files, m.Filename)
	}
	for _, f := range files {
		fi, err := os.Stat(f)
		if err != nil {
			return fmt.Errorf("firmware file missing: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("firmware file %s is not a regular file", f)
		}
		fh, err := os.Open(f)
		if err != nil {
			return fmt.Errorf("firmware file unreadable: %w", err)
		}
		fh.Close()
	}
	return nil
}

func uefiEntry(name, arch, machine string, df descFile) *Entry {
	d := df.d
	e := &Entry{
		Name: name, UUID: EntryUUID(name, arch), Arch: arch,
		Description:  d.Description,
		Interface:    "uefi",
		Machine:      machine,
		Descriptor:   df.path,
		Code:         d.Mapping.Executable.Filename,
		CodeFormat:   d.Mapping.Executable.Format,
		VarsTemplate: d.Mapping.NVRAMTemplate.Filename,
		VarsFormat:   d.Mapping.NVRAMTemplate.Format,
		Features:     slices.Clone(d.Features),
		SecureBoot:   d.Has("secure-boot") && d.Has("enrolled-keys"),
		RequiresSMM:  d.Has("requires-smm"),
	}
	if e.SecureBoot {
		e.MinMemoryMB = SecureBootMinMemoryMB
	}
	return e
}

// biosFile is what QEMU's PC machines load when no firmware is given.
const biosFile = "bios-256k.bin"

func biosEntry(ctx context.Context, bin, machine string) (*Entry, error) {
	dirs, err := DataDirs(ctx, bin)
	if err != nil {
		return nil, err
	}
	code, ok := findDataFile(dirs, biosFile)
	if !ok {
		return nil, fmt.Errorf("%s is in none of qemu's data folders %v", biosFile, dirs)
	}
	return &Entry{
		Name: BIOS, UUID: EntryUUID(BIOS, "amd64"), Arch: "amd64",
		Description: "SeaBIOS, QEMU's default PC firmware",
		Interface:   "bios",
		Machine:     machine,
		Code:        code,
		CodeFormat:  "raw",
	}, nil
}

func (c *Catalog) add(e *Entry) {
	c.entries = append(c.entries, e)
	c.byUUID[e.UUID] = e
}

// Entries returns the catalogue: by name (bios, uefi, uefi-secure), then
// arch.
func (c *Catalog) Entries() []*Entry { return slices.Clone(c.entries) }

// Default returns the default firmware of arch: bios on amd64, uefi on
// arm64.
func (c *Catalog) Default(arch string) (*Entry, error) {
	name, ok := defaultName[arch]
	if !ok {
		return nil, errcode.New(errcode.ValidationFailed, "firmware: arch %q is not supported: use amd64 or arm64", arch)
	}
	return c.Lookup(name, arch)
}

// Lookup finds the firmware ref (a name or an entry's uuid; empty: the
// arch's default) for a VM of arch. An unknown ref, or one that does not
// support arch, is validation_failed.
func (c *Catalog) Lookup(ref, arch string) (*Entry, error) {
	if _, ok := qemuArch[arch]; !ok {
		return nil, errcode.New(errcode.ValidationFailed, "firmware: arch %q is not supported: use amd64 or arm64", arch)
	}
	if ref == "" {
		return c.Default(arch)
	}
	if id, err := uuid.Parse(ref); err == nil {
		e, ok := c.byUUID[id.String()]
		if !ok {
			return nil, errcode.New(errcode.ValidationFailed, "unknown firmware uuid %s", id)
		}
		if e.Arch != arch {
			return nil, errcode.New(errcode.ValidationFailed, "firmware %s does not support arch %s", e, arch)
		}
		return e, nil
	}
	var other *Entry
	for _, e := range c.entries {
		if e.Name != ref {
			continue
		}
		if e.Arch == arch {
			return e, nil
		}
		other = e
	}
	if other != nil {
		return nil, errcode.New(errcode.ValidationFailed, "firmware %s does not support arch %s", ref, arch)
	}
	if slices.Contains(Names, ref) {
		return nil, errcode.New(errcode.ValidationFailed, "firmware %s is not available for %s on this host", ref, arch)
	}
	return nil, errcode.New(errcode.ValidationFailed, "unknown firmware %q: use %s", ref, strings.Join(Names, ", "))
}

// Resolve is Lookup followed by Entry.Validate with the VM's memory.
func (c *Catalog) Resolve(ref, arch string, memoryMB int) (*Entry, error) {
	e, err := c.Lookup(ref, arch)
	if err != nil {
		return nil, err
	}
	if err := e.Validate(arch, memoryMB); err != nil {
		return nil, err
	}
	return e, nil
}
