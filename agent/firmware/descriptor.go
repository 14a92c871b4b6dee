package firmware

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
)

// Descriptor is one of QEMU's firmware interop descriptors
// (docs/interop/firmware.json in QEMU; Debian's ovmf and qemu-efi-aarch64
// ship them under /usr/share/qemu/firmware). Only the members this
// package uses are kept; others are ignored.
type Descriptor struct {
	Description    string   `json:"description"`
	InterfaceTypes []string `json:"interface-types"`
	Mapping        Mapping  `json:"mapping"`
	Targets        []Target `json:"targets"`
	Features       []string `json:"features"`
	Tags           []string `json:"tags"`
}

// Mapping says how the firmware is given to the guest.
type Mapping struct {
	Device string `json:"device"` // "flash", "memory" or "kernel"
	// flash
	Mode          string     `json:"mode"` // "split" (the default), "combined", "stateless"
	Executable    *FlashFile `json:"executable"`
	NVRAMTemplate *FlashFile `json:"nvram-template"`
	// memory, kernel
	Filename string `json:"filename"`
}

// FlashFile is a flash image and its format ("raw" or "qcow2").
type FlashFile struct {
	Filename string `json:"filename"`
	Format   string `json:"format"`
}

// Target is a QEMU architecture ("x86_64", "aarch64") and the machine
// types the firmware supports, as globs ("pc-q35-*").
type Target struct {
	Architecture string   `json:"architecture"`
	Machines     []string `json:"machines"`
}

// maxDescriptorSize bounds a descriptor file; real ones are under 1 KiB.
const maxDescriptorSize = 64 << 10

// ParseDescriptor parses and checks one descriptor. It accepts what QEMU
// documents and refuses what cannot be used safely: no interface type, an
// unknown mapping device, flash without an absolute executable path, a
// format other than raw or qcow2, no target, a target without
// architecture or machines, a malformed machine glob.
func ParseDescriptor(data []byte) (*Descriptor, error) {
	if len(data) > maxDescriptorSize {
		return nil, fmt.Errorf("descriptor is %d bytes, more than %d", len(data), maxDescriptorSize)
	}
	var d Descriptor
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&d); err != nil {
		return nil, fmt.Errorf("descriptor: %w", err)
	}
	if dec.More() {
		return nil, errors.New("descriptor: data after the JSON object")
	}
	if err := d.check(); err != nil {
		return nil, fmt.Errorf("descriptor: %w", err)
	}
	return &d, nil
}

func (d *Descriptor) check() error {
	if len(d.InterfaceTypes) == 0 {
		return errors.New("no interface-types")
	}
	for _, it := range d.InterfaceTypes {
		if it == "" {
			return errors.New("empty interface type")
		}
	}
	m := &d.Mapping
	switch m.Device {
	case "flash":
		switch m.Mode {
		case "", "split", "combined", "stateless":
		default:
			return fmt.Errorf("unknown flash mode %q", m.Mode)
		}
		if m.Executable == nil {
			return errors.New("flash mapping without executable")
		}
		if err := m.Executable.check("executable"); err != nil {
			return err
		}
		if m.NVRAMTemplate != nil {
			if err := m.NVRAMTemplate.check("nvram-template"); err != nil {
				return err
			}
		}
		if m.mode() == "split" && m.NVRAMTemplate == nil {
			return errors.New("split flash mapping without nvram-template")
		}
	case "memory", "kernel":
		if err := checkFile("filename", m.Filename); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown mapping device %q", m.Device)
	}
	if len(d.Targets) == 0 {
		return errors.New("no targets")
	}
	for _, t := range d.Targets {
		if t.Architecture == "" {
			return errors.New("target without architecture")
		}
		if len(t.Machines) == 0 {
			return fmt.Errorf("target %s without machines", t.Architecture)
		}
		for _, g := range t.Machines {
			if _, err := filepath.Match(g, ""); err != nil || g == "" {
				return fmt.Errorf("target %s: bad machine glob %q", t.Architecture, g)
			}
		}
	}
	return nil
}

// mode is the flash mode, "split" when absent.
func (m *Mapping) mode() string {
	if m.Mode == "" {
		return "split"
	}
	return m.Mode
}

func (f *FlashFile) check(what string) error {
	if err := checkFile(what, f.Filename); err != nil {
		return err
	}
	switch f.Format {
	case "raw", "qcow2":
		return nil
	default:
		return fmt.Errorf("%s: format %q is not raw or qcow2", what, f.Format)
	}
}

// checkFile refuses file names that are relative or could not be given to
// QEMU as an option value (control characters).
func checkFile(what, name string) error {
	if name == "" || !filepath.IsAbs(name) || filepath.Clean(name) != name {
		return fmt.Errorf("%s: %q is not a clean absolute path", what, name)
	}
	if strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("%s: %q holds a control character", what, name)
	}
	return nil
}

// Has reports whether the descriptor lists feature.
func (d *Descriptor) Has(feature string) bool { return slices.Contains(d.Features, feature) }

// SupportsInterface reports whether the descriptor lists interface type it.
func (d *Descriptor) SupportsInterface(it string) bool {
	return slices.Contains(d.InterfaceTypes, it)
}

// MatchMachine reports whether the descriptor supports QEMU architecture
// arch ("x86_64") on the machine type machine, which must be a resolved,
// versioned name ("pc-q35-7.2", not the alias "q35").
func (d *Descriptor) MatchMachine(arch, machine string) bool {
	for _, t := range d.Targets {
		if t.Architecture != arch {
			continue
		}
		for _, g := range t.Machines {
			if ok, _ := filepath.Match(g, machine); ok {
				return true
			}
		}
	}
	return false
}
