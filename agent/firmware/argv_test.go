package firmware

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// TestArgv pins every host entry's argv fragments (golden): what the
// engine splices into its command line.
func TestArgv(t *testing.T) {
	c, _ := loadHost(t)
	var b strings.Builder
	for _, e := range c.Entries() {
		vars := "/var/lib/otherix/vms/0f8fad5b-d9cb-469f-a165-70867728950e/vars.fd"
		fmt.Fprintf(&b, "# %s %s\nmachine-opts %q\n", e.Name, e.Arch, e.MachineOpts())
		for _, a := range e.Globals() {
			fmt.Fprintf(&b, "global %s\n", a)
		}
		for _, a := range e.Args(vars) {
			fmt.Fprintf(&b, "arg %s\n", a)
		}
		b.WriteString("\n")
	}
	// A vars path with a comma is escaped, not an extra option.
	e, err := c.Lookup(UEFI, "amd64")
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&b, "# uefi amd64, vars path with a comma\n")
	for _, a := range e.Args("/srv/a,b/vars.fd") {
		fmt.Fprintf(&b, "arg %s\n", a)
	}
	golden(t, "argv.txt", b.String())
}

// blocks returns the 512-byte blocks allocated to a file.
func blocks(t testing.TB, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}

func sameContent(t *testing.T, a, b string) {
	t.Helper()
	da, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	db, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(da, db) {
		t.Fatalf("%s (%d bytes) and %s (%d bytes) differ", a, len(da), b, len(db))
	}
}

func TestPrepareVars(t *testing.T) {
	c, _ := loadHost(t)
	for _, tc := range []struct {
		name, arch string
		maxBlocks  int64 // allocated 512-byte blocks of the copy, at most
	}{
		{UEFI, "arm64", 0},          // AAVMF: 64 MiB of zeros
		{UEFISecure, "amd64", 1100}, // OVMF with Microsoft's keys: about 540 KB of data
	} {
		t.Run(tc.name+"-"+tc.arch, func(t *testing.T) {
			e, err := c.Lookup(tc.name, tc.arch)
			if err != nil {
				t.Fatal(err)
			}
			dst := filepath.Join(t.TempDir(), "vars.fd")
			if err := PrepareVars(e, dst); err != nil {
				t.Fatal(err)
			}
			sameContent(t, e.VarsTemplate, dst)
			if got := blocks(t, dst); got > tc.maxBlocks {
				t.Errorf("the copy has %d blocks allocated, want at most %d", got, tc.maxBlocks)
			}
			fi, err := os.Stat(dst)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("mode %v, want 0600", fi.Mode())
			}
			// An existing store is the VM's: kept as it is.
			f, err := os.OpenFile(dst, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt([]byte("guest-written"), 0)
			f.Close()
			if err := PrepareVars(e, dst); err != nil {
				t.Fatal(err)
			}
			if b, _ := os.ReadFile(dst); !bytes.HasPrefix(b, []byte("guest-written")) {
				t.Error("PrepareVars replaced an existing store")
			}
			// ResetVars starts over; no temporary file is left.
			if err := ResetVars(e, dst); err != nil {
				t.Fatal(err)
			}
			sameContent(t, e.VarsTemplate, dst)
			if ents, _ := os.ReadDir(filepath.Dir(dst)); len(ents) != 1 {
				t.Errorf("folder holds %d files, want only vars.fd", len(ents))
			}
			// A store of another size is refused, not silently used.
			if err := os.Truncate(dst, 4096); err != nil {
				t.Fatal(err)
			}
			if err := PrepareVars(e, dst); errcode.Of(err) != errcode.Conflict {
				t.Errorf("PrepareVars on a 4 KiB store = %v, want conflict", err)
			}
		})
	}
	bios, err := c.Lookup(BIOS, "amd64")
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "vars.fd")
	if err := PrepareVars(bios, dst); err != nil || bios.NeedsVars() {
		t.Errorf("bios: PrepareVars = %v, NeedsVars = %v", err, bios.NeedsVars())
	}
	if _, err := os.Stat(dst); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bios got a vars file: %v", err)
	}
}

// The copy of a file with holes and data keeps both, byte for byte.
func TestCopySparseMixed(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(bytes.Repeat([]byte{0xaa}, 5000), 100)       // data in the first block
	f.WriteAt(make([]byte, 3*copyBlock), 200000)           // written zeros
	f.WriteAt([]byte("end"), 10<<20)                       // after a hole
	f.WriteAt(bytes.Repeat([]byte{1}, copyBlock+7), 4<<20) // across a block edge
	f.Close()
	dst := filepath.Join(dir, "dst")
	if err := copySparse(src, dst, 0o600); err != nil {
		t.Fatal(err)
	}
	sameContent(t, src, dst)
	if b := blocks(t, dst); b > blocks(t, src) {
		t.Errorf("copy has %d blocks, the source %d", b, blocks(t, src))
	}
}

// BenchmarkPrepareVars copies AAVMF's 64 MiB template: the sparse copy
// beside a plain io.Copy baseline.
func BenchmarkPrepareVars(b *testing.B) {
	c, _ := loadHost(b)
	e, err := c.Lookup(UEFI, "arm64")
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	b.Run("sparse", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			dst := filepath.Join(dir, "sparse.fd")
			os.Remove(dst)
			if err := PrepareVars(e, dst); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(blocks(b, filepath.Join(dir, "sparse.fd"))*512), "disk-bytes")
	})
	b.Run("io.Copy-baseline", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			dst := filepath.Join(dir, "plain.fd")
			in, _ := os.Open(e.VarsTemplate)
			out, _ := os.Create(dst)
			io.Copy(out, in)
			out.Sync()
			out.Close()
			in.Close()
		}
		b.ReportMetric(float64(blocks(b, filepath.Join(dir, "plain.fd"))*512), "disk-bytes")
	})
}
