package firmware

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/otherix/otherix-agent/agent/testguest"
	"github.com/otherix/otherix-agent/internal/errcode"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// golden compares got with testdata/<name>, or writes it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs (go test -update rewrites it)\ngot:\n%s\nwant:\n%s", path, got, want)
	}
}

func needHostFirmware(t testing.TB) {
	t.Helper()
	if hostHasFirmware() {
		return
	}
	// The platform guest's builder installs the host tools its tests need:
	// both QEMUs, OVMF, AAVMF, swtpm.
	testguest.PlatformDir(t, "amd64", testguest.VariantDefault)
	if !hostHasFirmware() {
		t.Fatal("qemu-system-x86_64, qemu-system-aarch64 and the descriptors of ovmf and qemu-efi-aarch64 are needed")
	}
}

func hostHasFirmware() bool {
	for _, bin := range []string{"qemu-system-x86_64", "qemu-system-aarch64"} {
		if _, err := exec.LookPath(bin); err != nil {
			return false
		}
	}
	for _, f := range []string{"/usr/share/qemu/firmware/60-edk2-x86_64.json", "/usr/share/qemu/firmware/60-edk2-aarch64.json"} {
		if _, err := os.Stat(f); err != nil {
			return false
		}
	}
	return true
}

// hostCatalog is the catalogue of this host's real descriptors, loaded
// once per test binary, with what Load logged.
var hostCatalog struct {
	once sync.Once
	c    *Catalog
	logs *observer.ObservedLogs
	err  error
}

func loadHost(t testing.TB) (*Catalog, *observer.ObservedLogs) {
	t.Helper()
	needHostFirmware(t)
	hostCatalog.once.Do(func() {
		core, logs := observer.New(zapcore.DebugLevel)
		hostCatalog.c, hostCatalog.err = Load(context.Background(), Options{Logger: zap.New(core)})
		hostCatalog.logs = logs
	})
	if hostCatalog.err != nil {
		t.Fatal(hostCatalog.err)
	}
	return hostCatalog.c, hostCatalog.logs
}

func describe(c *Catalog) string {
	var b strings.Builder
	for _, e := range c.Entries() {
		fmt.Fprintf(&b, "%s %s %s\n", e.Name, e.Arch, e.UUID)
		fmt.Fprintf(&b, "  interface=%s machine=%s secureboot=%v smm=%v min-memory=%d\n",
			e.Interface, e.Machine, e.SecureBoot, e.RequiresSMM, e.MinMemoryMB)
		fmt.Fprintf(&b, "  descriptor=%s\n  code=%s (%s)\n", e.Descriptor, e.Code, e.CodeFormat)
		if e.NeedsVars() {
			fmt.Fprintf(&b, "  vars=%s (%s)\n", e.VarsTemplate, e.VarsFormat)
		}
	}
	return b.String()
}

// TestLoadHost builds the catalogue from this host's descriptors (Debian
// 12: ovmf, qemu-efi-aarch64, seabios). The golden file pins names, uuids
// and the descriptor each comes from; the broken aarch64 secure descriptor
// is skipped with a log line.
func TestLoadHost(t *testing.T) {
	c, logs := loadHost(t)
	golden(t, "catalog.txt", describe(c))

	skipped := logs.FilterMessage("skip firmware descriptor").All()
	var names []string
	for _, e := range skipped {
		names = append(names, filepath.Base(e.ContextMap()["descriptor"].(string)))
		if e.Level != zapcore.WarnLevel {
			t.Errorf("skip logged at %v, want warn", e.Level)
		}
	}
	if strings.Join(names, " ") != "50-edk2-aarch64-secure.json" {
		t.Errorf("skipped %v, want [50-edk2-aarch64-secure.json] (its AAVMF_CODE.secboot.fd is not shipped)", names)
	}

	// The same uuids from a second, independent load.
	again, err := Load(context.Background(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if describe(again) != describe(c) {
		t.Errorf("a second load differs:\n%s", describe(again))
	}
	if got, want := EntryUUID(UEFI, "amd64"), "b5696d27-2829-5af4-b908-408e18c3effe"; got != want {
		t.Errorf("EntryUUID(uefi, amd64) = %s, want %s (uuids are part of the API)", got, want)
	}
}

func TestLookup(t *testing.T) {
	c, _ := loadHost(t)
	uefiARM := EntryUUID(UEFI, "arm64")
	for _, tc := range []struct {
		ref, arch string
		memory    int
		want      string // "name/arch", or an error code
	}{
		{"", "amd64", 256, "bios/amd64"},
		{"", "arm64", 256, "uefi/arm64"},
		{"bios", "amd64", 256, "bios/amd64"},
		{"uefi", "amd64", 256, "uefi/amd64"},
		{"uefi", "arm64", 256, "uefi/arm64"},
		{"uefi-secure", "amd64", 512, "uefi-secure/amd64"},
		{"uefi-secure", "amd64", 384, "uefi-secure/amd64"},
		{uefiARM, "arm64", 256, "uefi/arm64"},
		{strings.ToUpper(uefiARM), "arm64", 256, "uefi/arm64"},
		{"uefi-secure", "amd64", 256, string(errcode.ValidationFailed)}, // resets in a loop
		{"bios", "arm64", 256, string(errcode.ValidationFailed)},
		{uefiARM, "amd64", 256, string(errcode.ValidationFailed)},
		{"UEFI", "amd64", 256, string(errcode.ValidationFailed)},
		{"seabios", "amd64", 256, string(errcode.ValidationFailed)},
		{"6f1d1f8e-0000-4000-8000-000000000000", "amd64", 256, string(errcode.ValidationFailed)},
		{"uefi", "riscv64", 256, string(errcode.ValidationFailed)},
	} {
		e, err := c.Resolve(tc.ref, tc.arch, tc.memory)
		got := ""
		if err != nil {
			got = string(errcode.Of(err))
		} else {
			got = e.Name + "/" + e.Arch
		}
		if got != tc.want {
			t.Errorf("Resolve(%q, %s, %d) = %s (%v), want %s", tc.ref, tc.arch, tc.memory, got, err, tc.want)
		}
	}
	// A found entry is the same object by name and by uuid.
	a, _ := c.Lookup(UEFISecure, "amd64")
	b, _ := c.Lookup(a.UUID, "amd64")
	if a != b || !a.SecureBoot || !a.RequiresSMM {
		t.Errorf("uefi-secure: %+v / %+v", a, b)
	}
}

// writeDescriptor writes a descriptor for the given files and features.
func writeDescriptor(t *testing.T, dir, name, arch, machines, code, vars string, features ...string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	feats := `[]`
	if len(features) > 0 {
		feats = `["` + strings.Join(features, `","`) + `"]`
	}
	data := fmt.Sprintf(`{"description": %q, "interface-types": ["uefi"],
		"mapping": {"device": "flash", "executable": {"filename": %q, "format": "raw"},
		"nvram-template": {"filename": %q, "format": "raw"}},
		"targets": [{"architecture": %q, "machines": [%s]}], "features": %s}`,
		name, code, vars, arch, machines, feats)
	if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestLoadRules: file name priority, a folder hiding another's file of the
// same name, an empty file masking one, machine globs matched against the
// resolved machine, unparsable and broken descriptors skipped with a log.
func TestLoadRules(t *testing.T) {
	needHostFirmware(t)
	tmp := t.TempDir()
	etc, share := filepath.Join(tmp, "etc"), filepath.Join(tmp, "share")
	file := func(name string) string {
		p := filepath.Join(tmp, name)
		if err := os.WriteFile(p, []byte("fw"), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	code, vars, code2, msVars := file("CODE.fd"), file("VARS.fd"), file("CODE2.fd"), file("VARS.ms.fd")
	missing := filepath.Join(tmp, "MISSING.fd")

	// amd64 uefi: 10- only for i440fx (no match on q35), 20- hidden by an
	// etc file of the same name that points to code2, 30- the plain one
	// that would come next.
	writeDescriptor(t, share, "10-i440fx.json", "x86_64", `"pc-i440fx-*"`, code, vars)
	writeDescriptor(t, share, "20-plain.json", "x86_64", `"pc-q35-*"`, code, vars)
	writeDescriptor(t, etc, "20-plain.json", "x86_64", `"pc-q35-*"`, code2, vars)
	writeDescriptor(t, share, "30-plain.json", "x86_64", `"pc-q35-*"`, code, vars)
	// amd64 uefi-secure: 05- masked by an empty file in etc, 06- broken,
	// 07- unparsable, 08- the one.
	writeDescriptor(t, share, "05-secure.json", "x86_64", `"pc-q35-*"`, code, msVars, "secure-boot", "enrolled-keys", "requires-smm")
	if err := os.WriteFile(filepath.Join(etc, "05-secure.json"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	writeDescriptor(t, share, "06-secure.json", "x86_64", `"pc-q35-*"`, missing, msVars, "secure-boot", "enrolled-keys")
	if err := os.WriteFile(filepath.Join(share, "07-secure.json"), []byte(`{"interface-types": [`), 0o644); err != nil {
		t.Fatal(err)
	}
	writeDescriptor(t, share, "08-secure.json", "x86_64", `"pc-q35-*"`, code2, msVars, "secure-boot", "enrolled-keys", "requires-smm")
	// secure-boot without enrolled keys is neither uefi nor uefi-secure.
	writeDescriptor(t, share, "09-sb-empty.json", "x86_64", `"pc-q35-*"`, code, vars, "secure-boot")
	// arm64: only a machine the virt alias does not resolve to.
	writeDescriptor(t, share, "40-arm.json", "aarch64", `"sbsa-ref"`, code, vars)

	core, logs := observer.New(zapcore.InfoLevel)
	c, err := Load(context.Background(), Options{Dirs: []string{etc, share}, Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range c.Entries() {
		got = append(got, fmt.Sprintf("%s/%s=%s:%s", e.Name, e.Arch, filepath.Base(e.Descriptor), filepath.Base(e.Code)))
	}
	want := []string{"bios/amd64=.:bios-256k.bin", "uefi/amd64=20-plain.json:CODE2.fd", "uefi-secure/amd64=08-secure.json:CODE2.fd"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("entries\n got %v\nwant %v", got, want)
	}
	var skipped []string
	for _, e := range logs.FilterMessage("skip firmware descriptor").All() {
		skipped = append(skipped, filepath.Base(e.ContextMap()["descriptor"].(string)))
	}
	if strings.Join(skipped, " ") != "06-secure.json 07-secure.json" {
		t.Errorf("skipped %v, want [06-secure.json 07-secure.json]", skipped)
	}
	if _, err := c.Lookup(UEFI, "arm64"); errcode.Of(err) != errcode.ValidationFailed {
		t.Errorf("Lookup(uefi, arm64) = %v, want validation_failed", err)
	}
}

func TestLoadWithoutQEMU(t *testing.T) {
	needHostFirmware(t)
	core, logs := observer.New(zapcore.InfoLevel)
	c, err := Load(context.Background(), Options{
		Binaries: map[string]string{"arm64": "/nonexistent/qemu-system-aarch64"},
		Logger:   zap.New(core),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range c.Entries() {
		if e.Arch == "arm64" {
			t.Errorf("an arm64 entry without its qemu: %v", e)
		}
	}
	if logs.FilterMessage("no firmware for this arch: cannot ask its qemu").Len() != 1 {
		t.Errorf("logs: %v", logs.All())
	}
}

func TestParseMachineHelp(t *testing.T) {
	out := `Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
none                 empty machine
`
	m := parseMachineHelp(out)
	for name, want := range map[string]string{
		"q35": "pc-q35-7.2", "pc": "pc-i440fx-7.2", "pc-q35-7.2": "pc-q35-7.2",
		"pc-i440fx-7.2": "pc-i440fx-7.2", "microvm": "microvm", "none": "none",
	} {
		if m[name] != want {
			t.Errorf("%s → %q, want %q", name, m[name], want)
		}
	}
	if len(m) != 6 {
		t.Errorf("%d machines: %v", len(m), m)
	}
}
