package firmware

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const validDescriptor = `{
    "description": "UEFI firmware for x86_64",
    "interface-types": ["uefi"],
    "mapping": {
        "device": "flash",
        "executable": {"filename": "/usr/share/OVMF/OVMF_CODE_4M.fd", "format": "raw"},
        "nvram-template": {"filename": "/usr/share/OVMF/OVMF_VARS_4M.fd", "format": "raw"}
    },
    "targets": [{"architecture": "x86_64", "machines": ["pc-i440fx-*", "pc-q35-*"]}],
    "features": ["acpi-s3", "verbose-dynamic"],
    "tags": []
}`

// edit returns validDescriptor with old replaced by new (which must occur).
func edit(t *testing.T, old, new string) string {
	t.Helper()
	if !strings.Contains(validDescriptor, old) {
		t.Fatalf("%q is not in the descriptor", old)
	}
	return strings.Replace(validDescriptor, old, new, 1)
}

func TestParseDescriptor(t *testing.T) {
	d, err := ParseDescriptor([]byte(validDescriptor))
	if err != nil {
		t.Fatal(err)
	}
	if !d.SupportsInterface("uefi") || d.SupportsInterface("bios") {
		t.Errorf("interfaces %v", d.InterfaceTypes)
	}
	if !d.Has("acpi-s3") || d.Has("secure-boot") {
		t.Errorf("features %v", d.Features)
	}
	for _, tc := range []struct {
		arch, machine string
		want          bool
	}{
		{"x86_64", "pc-q35-7.2", true},
		{"x86_64", "pc-i440fx-2.4", true},
		{"x86_64", "q35", false}, // an alias: match the resolved name
		{"x86_64", "microvm", false},
		{"aarch64", "pc-q35-7.2", false},
	} {
		if got := d.MatchMachine(tc.arch, tc.machine); got != tc.want {
			t.Errorf("MatchMachine(%s, %s) = %v, want %v", tc.arch, tc.machine, got, tc.want)
		}
	}
	if d.Mapping.mode() != "split" {
		t.Errorf("mode %q, want split by default", d.Mapping.mode())
	}
}

func TestParseDescriptorRefuses(t *testing.T) {
	for _, tc := range []struct{ name, data string }{
		{"empty", ``},
		{"not json", `{"description": `},
		{"trailing data", validDescriptor + `{}`},
		{"no interface", edit(t, `["uefi"]`, `[]`)},
		{"empty interface", edit(t, `["uefi"]`, `[""]`)},
		{"unknown device", edit(t, `"device": "flash"`, `"device": "tape"`)},
		{"unknown mode", edit(t, `"device": "flash",`, `"device": "flash", "mode": "sideways",`)},
		{"no executable", edit(t, `"executable": {"filename": "/usr/share/OVMF/OVMF_CODE_4M.fd", "format": "raw"},`, ``)},
		{"relative executable", edit(t, `"/usr/share/OVMF/OVMF_CODE_4M.fd"`, `"OVMF_CODE_4M.fd"`)},
		{"unclean path", edit(t, `"/usr/share/OVMF/OVMF_CODE_4M.fd"`, `"/usr/share/OVMF/../OVMF/OVMF_CODE_4M.fd"`)},
		{"control character", edit(t, `"/usr/share/OVMF/OVMF_CODE_4M.fd"`, `"/usr/share/OVMF/OVMF\n_CODE.fd"`)},
		{"bad format", edit(t, `"format": "raw"},`, `"format": "vmdk"},`)},
		{"split without template", edit(t, `,
        "nvram-template": {"filename": "/usr/share/OVMF/OVMF_VARS_4M.fd", "format": "raw"}`, ``)},
		{"no targets", edit(t, `[{"architecture": "x86_64", "machines": ["pc-i440fx-*", "pc-q35-*"]}]`, `[]`)},
		{"no architecture", edit(t, `"architecture": "x86_64"`, `"architecture": ""`)},
		{"no machines", edit(t, `["pc-i440fx-*", "pc-q35-*"]`, `[]`)},
		{"bad glob", edit(t, `"pc-q35-*"`, `"pc-q35-["`)},
		{"memory without file", edit(t, `"device": "flash"`, `"device": "memory"`)},
		{"too big", validDescriptor + strings.Repeat(" ", maxDescriptorSize)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if d, err := ParseDescriptor([]byte(tc.data)); err == nil {
				t.Errorf("ParseDescriptor accepted it: %+v", d)
			}
		})
	}
}

func TestParseDescriptorAccepts(t *testing.T) {
	for _, tc := range []struct{ name, data string }{
		{"stateless", edit(t, `"device": "flash",`, `"device": "flash", "mode": "stateless",`)},
		{"unknown members", edit(t, `"tags": []`, `"tags": [], "future": {"x": 1}`)},
		{"memory", `{"interface-types": ["bios"], "mapping": {"device": "memory", "filename": "/usr/share/seabios/bios-256k.bin"},
			"targets": [{"architecture": "x86_64", "machines": ["pc-*"]}]}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ParseDescriptor([]byte(tc.data)); err != nil {
				t.Error(err)
			}
		})
	}
}

// Every descriptor the host's packages ship parses.
func TestParseShippedDescriptors(t *testing.T) {
	paths, _ := filepath.Glob("/usr/share/qemu/firmware/*.json")
	if len(paths) == 0 {
		t.Fatal("no descriptors under /usr/share/qemu/firmware (apt-get install ovmf qemu-efi-aarch64)")
	}
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseDescriptor(data); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
}

// FuzzParseDescriptor: no input panics; an accepted descriptor survives a
// JSON round trip unchanged and keeps the checked invariants.
func FuzzParseDescriptor(f *testing.F) {
	f.Add([]byte(validDescriptor))
	paths, _ := filepath.Glob("/usr/share/qemu/firmware/*.json")
	for _, p := range paths {
		if data, err := os.ReadFile(p); err == nil {
			f.Add(data)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := ParseDescriptor(data)
		if err != nil {
			return
		}
		if d.Mapping.Device == "flash" && !filepath.IsAbs(d.Mapping.Executable.Filename) {
			t.Fatalf("accepted a relative executable %q", d.Mapping.Executable.Filename)
		}
		again, err := json.Marshal(d)
		if err != nil {
			t.Fatal(err)
		}
		d2, err := ParseDescriptor(again)
		if err != nil {
			t.Fatalf("re-parse of %s: %v", again, err)
		}
		if !reflect.DeepEqual(d, d2) {
			t.Fatalf("round trip changed it:\n%+v\n%+v", d, d2)
		}
		for _, tg := range d.Targets {
			for _, g := range tg.Machines {
				d.MatchMachine(tg.Architecture, g) // must not panic
			}
		}
	})
}
