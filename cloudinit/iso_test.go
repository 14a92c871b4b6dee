package cloudinit

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/kdomanski/iso9660"
	"gopkg.in/yaml.v3"

	"github.com/otherix/otherix-agent/internal/errcode"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

const testUUID = "0d4c7a2e-4e2b-4a8f-9d57-2a1f7f0c9b11"

// goldenSeeds are the seeds whose images are pinned in testdata/golden.
func goldenSeeds(t testing.TB) map[string]Seed {
	return map[string]Seed{
		"meta-only": {InstanceID: testUUID, Hostname: "web-1"},
		"full": {
			InstanceID:    testUUID,
			Hostname:      "web-1",
			UserData:      []byte("#cloud-config\nusers:\n  - name: ops\n    ssh_authorized_keys: [ssh-ed25519 AAAAC3Nza ops@example]\npackages: [htop]\n"),
			NetworkConfig: GenerateNetworkConfig([]NIC{{Name: "eth0", MAC: "52:54:00:12:34:56"}, {Name: "eth1", MAC: "52:54:00:12:34:57"}}),
			VendorData:    []byte("#!/bin/sh\necho vendor\n"),
		},
		"gzip-user-data": {
			InstanceID: "i-42",
			Hostname:   "yes", // YAML 1.1 would read a bare yes as a boolean
			// gzip of "#cloud-config\nhostname: yes\n", spelled out so that
			// a change in compress/flate's output cannot move the golden.
			UserData: []byte("\x1f\x8b\b\x00\x00\x00\x00\x00\x00\xffRN\xce\xc9/M\xd1M\xce\xcfK\xcbL\xe7\xca\xc8/.\xc9K\xccM" +
				"\xb5R\xa8L-\xe6\x02\x04\x00\x00\xff\xff\xe0^\xfd_\x1c\x00\x00\x00"),
		},
		// A user-data larger than one sector, to span several.
		"big-user-data": {
			InstanceID: testUUID,
			Hostname:   "big",
			UserData:   []byte("#!/bin/sh\n" + strings.Repeat("echo 0123456789abcdef0123456789abcdef0123456789abcdef\n", 200)),
		},
	}
}

func build(t testing.TB, s Seed) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := Build(&b, s); err != nil {
		t.Fatalf("Build: %v", err)
	}
	return b.Bytes()
}

// describe renders an image as text: the PVD fields that matter, the path
// table, and every directory record with its raw identifier, extent, size
// and date, followed by the file's text (or its sha256 when binary).
func describe(t testing.TB, img []byte) string {
	t.Helper()
	var b strings.Builder
	sum := sha256.Sum256(img)
	fmt.Fprintf(&b, "image: %d bytes (%d sectors), sha256 %x\n", len(img), len(img)/sectorSize, sum)
	pvd := img[pvdSector*sectorSize:]
	str := func(off, n int) string { return strings.TrimRight(string(pvd[off:off+n]), " ") }
	fmt.Fprintf(&b, "system id: %q\nvolume id: %q\napplication id: %q\n", str(8, 32), str(40, 32), str(574, 128))
	fmt.Fprintf(&b, "volume size: %d sectors\n", binary.LittleEndian.Uint32(pvd[pvdVolumeSize:]))
	fmt.Fprintf(&b, "dates: created %q, modified %q, expires %q, effective %q\n",
		pvd[pvdCreated:pvdCreated+17], pvd[pvdModified:pvdModified+17], pvd[pvdExpires:pvdExpires+17], pvd[pvdEffective:pvdEffective+17])
	ptSize := binary.LittleEndian.Uint32(pvd[pvdPathTabSize:])
	lLoc := binary.LittleEndian.Uint32(pvd[pvdPathTabL:])
	mLoc := binary.BigEndian.Uint32(pvd[pvdPathTabM:])
	fmt.Fprintf(&b, "path table: %d bytes, type L at sector %d, type M at sector %d\n", ptSize, lLoc, mLoc)
	lt := img[int(lLoc)*sectorSize:][:ptSize]
	mt := img[int(mLoc)*sectorSize:][:ptSize]
	for off, n := 0, 1; off < len(lt); n++ {
		idLen := int(lt[off])
		fmt.Fprintf(&b, "  %d: extent %d, parent %d, identifier %q (M: extent %d, parent %d)\n", n,
			binary.LittleEndian.Uint32(lt[off+2:]), binary.LittleEndian.Uint16(lt[off+6:]), lt[off+8:off+8+idLen],
			binary.BigEndian.Uint32(mt[off+2:]), binary.BigEndian.Uint16(mt[off+6:]))
		off += 8 + idLen + idLen%2
	}
	root := pvd[pvdRootRecord:]
	fmt.Fprintf(&b, "root record: extent %d, %d bytes, date %v\n",
		binary.LittleEndian.Uint32(root[2:]), binary.LittleEndian.Uint32(root[10:]), root[recordDateOff:recordDateOff+7])
	recs, err := readDir(img, binary.LittleEndian.Uint32(root[2:]), binary.LittleEndian.Uint32(root[10:]))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		kind := "file"
		if r.isDir() {
			kind = "dir"
		}
		fmt.Fprintf(&b, "%-20q %-4s extent %3d  %5d bytes  date %v\n", r.ident, kind, r.extent, r.size,
			img[r.off+recordDateOff:r.off+recordDateOff+7])
		if r.isDir() {
			continue
		}
		data := img[int(r.extent)*sectorSize:][:r.size]
		if utf8.Valid(data) && !bytes.ContainsAny(data, "\x00\x1b") && len(data) < 1024 {
			for _, line := range strings.SplitAfter(string(data), "\n") {
				if line != "" {
					fmt.Fprintf(&b, "    | %s", line)
				}
			}
			if !strings.HasSuffix(string(data), "\n") {
				b.WriteString("\n")
			}
		} else {
			fmt.Fprintf(&b, "    sha256 %x\n", sha256.Sum256(data))
		}
	}
	return b.String()
}

func TestGolden(t *testing.T) {
	for name, s := range goldenSeeds(t) {
		t.Run(name, func(t *testing.T) {
			if err := s.Validate(Limits{}); err != nil {
				t.Fatal(err)
			}
			got := describe(t, build(t, s))
			path := filepath.Join("testdata", "golden", name+".txt")
			if *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("image differs from %s (go test -update rewrites it)\ngot:\n%s\nwant:\n%s", path, got, want)
			}
		})
	}
}

func TestBuildDeterministic(t *testing.T) {
	s := goldenSeeds(t)["full"]
	a, b := build(t, s), build(t, s)
	if !bytes.Equal(a, b) {
		t.Fatal("two builds of the same seed differ")
	}
	// No trace of the build time: every date is the epoch or unset.
	pvd := a[pvdSector*sectorSize:]
	for _, off := range []int{pvdCreated, pvdModified} {
		if got := string(pvd[off : off+16]); got != "1980010100000000" {
			t.Errorf("PVD date at %d: %q", off, got)
		}
	}
	for _, off := range []int{pvdExpires, pvdEffective} {
		if got := string(pvd[off : off+16]); got != "0000000000000000" {
			t.Errorf("PVD date at %d: %q", off, got)
		}
	}
	// Another seed gives another image.
	s.Hostname = "web-2"
	if bytes.Equal(a, build(t, s)) {
		t.Error("different seeds give the same image")
	}
}

// TestReadBack reads each image with kdomanski/iso9660's reader, as a
// different consumer from the code that wrote it.
func TestReadBack(t *testing.T) {
	for name, s := range goldenSeeds(t) {
		t.Run(name, func(t *testing.T) {
			got := readSeed(t, build(t, s))
			want := map[string][]byte{"meta-data": s.MetaData()}
			if s.UserData != nil {
				want["user-data"] = s.UserData
			}
			if s.NetworkConfig != nil {
				want["network-config"] = s.NetworkConfig
			}
			if s.VendorData != nil {
				want["vendor-data"] = s.VendorData
			}
			if len(got) != len(want) {
				t.Errorf("files %v, want %v", keys(got), keys(want))
			}
			for n, w := range want {
				if !bytes.Equal(got[n], w) {
					t.Errorf("%s: got %q, want %q", n, got[n], w)
				}
			}
			var md map[string]string
			if err := yaml.Unmarshal(got["meta-data"], &md); err != nil {
				t.Fatal(err)
			}
			if md["instance-id"] != s.InstanceID || md["local-hostname"] != s.Hostname || len(md) != 2 {
				t.Errorf("meta-data: %v", md)
			}
		})
	}
}

// readSeed returns the files of a seed image by name, checking the label.
func readSeed(t testing.TB, img []byte) map[string][]byte {
	t.Helper()
	im, err := iso9660.OpenImage(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	label, err := im.Label()
	if err != nil || label != VolumeLabel {
		t.Fatalf("label %q, %v", label, err)
	}
	root, err := im.RootDir()
	if err != nil {
		t.Fatal(err)
	}
	children, err := root.GetChildren()
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	for _, c := range children {
		if c.IsDir() {
			t.Errorf("unexpected directory %s", c.Name())
			continue
		}
		data, err := io.ReadAll(c.Reader())
		if err != nil {
			t.Fatal(err)
		}
		files[c.Name()] = data
	}
	return files
}

func keys(m map[string][]byte) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

// tool finds a host tool. CI must have it (.ci/run installs it); a
// developer's machine without it skips.
func tool(t *testing.T, name, pkg string) string {
	t.Helper()
	for _, p := range []string{name, "/usr/sbin/" + name, "/sbin/" + name} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s not found: install the Debian package %s", name, pkg)
	}
	t.Skipf("%s not found (Debian package %s)", name, pkg)
	return ""
}

func writeTemp(t *testing.T, s Seed) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "seed.iso")
	if err := WriteISO(path, s); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestBlkid: cloud-init finds the seed with blkid, by label and type.
func TestBlkid(t *testing.T) {
	blkid := tool(t, "blkid", "util-linux")
	path := writeTemp(t, goldenSeeds(t)["full"])
	out, err := exec.Command(blkid, "-c", "/dev/null", path).CombinedOutput()
	if err != nil {
		t.Fatalf("blkid: %v\n%s", err, out)
	}
	for _, want := range []string{`LABEL="cidata"`, `TYPE="iso9660"`, `LABEL="cidata" TYPE="iso9660"`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("blkid output lacks %s:\n%s", want, out)
		}
	}
	// The same query cloud-init makes (util.find_devs_with LABEL=cidata).
	out, err = exec.Command(blkid, "-c", "/dev/null", "-t", "LABEL=cidata", "-o", "device", path).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != path {
		t.Errorf("blkid -t LABEL=cidata: %v: %q", err, out)
	}
}

// TestIsoinfo checks the image with genisoimage's isoinfo: a second,
// independent ISO9660 reader.
func TestIsoinfo(t *testing.T) {
	isoinfo := tool(t, "isoinfo", "genisoimage")
	path := writeTemp(t, goldenSeeds(t)["full"])
	run := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(isoinfo, append(args, "-i", path)...).CombinedOutput()
		if err != nil {
			t.Fatalf("isoinfo %v: %v\n%s", args, err, out)
		}
		return string(out)
	}

	d := run("-d")
	for _, re := range []string{
		`(?m)^Volume id: cidata$`,
		`(?m)^System id: LINUX$`,
		`(?m)^Logical block size is: 2048$`,
		`(?m)^Volume size is: 25$`,
		`(?m)^NO Joliet present$`,
		`(?m)^NO Rock Ridge present$`,
	} {
		if !regexp.MustCompile(re).MatchString(d) {
			t.Errorf("isoinfo -d does not match %s:\n%s", re, d)
		}
	}

	// The identifiers as recorded: lower case, '-' kept, version ";1".
	if got, want := run("-f"), "/meta-data;1\n/network-config;1\n/user-data;1\n/vendor-data;1\n"; got != want {
		t.Errorf("isoinfo -f:\n%s\nwant:\n%s", got, want)
	}
	// isoinfo reads the path table.
	if p := run("-p"); !strings.Contains(p, "Path table starts at block 23, size 10") {
		t.Errorf("isoinfo -p:\n%s", p)
	}
	// And it extracts the files by their recorded names.
	s := goldenSeeds(t)["full"]
	if got := run("-x", "/user-data;1"); got != string(s.UserData) {
		t.Errorf("isoinfo -x user-data: %q", got)
	}
	if l := run("-l"); strings.Count(l, "Jan  1 1980") != 6 {
		t.Errorf("isoinfo -l: want all 6 records dated Jan 1 1980:\n%s", l)
	}
}

func TestWriteISO(t *testing.T) {
	s := goldenSeeds(t)["full"]
	path := writeTemp(t, s)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode())
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, build(t, s)) {
		t.Error("file differs from Build's image")
	}

	// Overwriting replaces the file whole, still 0600, even over a 0644 one.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	s2 := goldenSeeds(t)["meta-only"]
	if err := WriteISO(path, s2); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode() != 0o600 {
		t.Errorf("mode after overwrite %v", fi.Mode())
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, build(t, s2)) {
		t.Error("overwritten file differs")
	}
	assertOnly(t, filepath.Dir(path), "seed.iso")
}

// assertOnly checks that dir holds exactly the named entries: no temp file
// left behind.
func assertOnly(t *testing.T, dir string, names ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if strings.Join(got, ",") != strings.Join(names, ",") {
		t.Errorf("%s holds %v, want %v", dir, got, names)
	}
}

func TestWriteISOFailureLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	good := goldenSeeds(t)["meta-only"]

	// Rename fails: the target is a non-empty directory.
	target := filepath.Join(dir, "seed.iso")
	if err := os.MkdirAll(filepath.Join(target, "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	err := WriteISO(target, good)
	if err == nil || errcode.Of(err) != errcode.Internal {
		t.Errorf("got %v, want an internal error", err)
	}
	assertOnly(t, dir, "seed.iso")

	// Build fails: the existing file is untouched.
	path := filepath.Join(dir, "other.iso")
	if err := WriteISO(path, good); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	bad := good
	bad.Hostname = "two\nlines"
	if err := WriteISO(path, bad); !errcode.Is(err, errcode.ValidationFailed) {
		t.Errorf("got %v, want validation_failed", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("failed write changed the existing file")
	}
	assertOnly(t, dir, "other.iso", "seed.iso")

	// The directory does not exist.
	if err := WriteISO(filepath.Join(dir, "missing", "seed.iso"), good); err == nil {
		t.Error("write into a missing directory succeeded")
	}
}

func TestValidateIdentity(t *testing.T) {
	tests := []struct {
		id, host string
		want     string
	}{
		{testUUID, "web-1", ""},
		{"i-abc", "Web_1.example.com", ""},
		{"i-abc", "ünïcode", ""},
		{"", "h", "instance-id is empty"},
		{"i", "", "hostname is empty"},
		{"a b", "h", "instance-id has a forbidden character ' '"},
		{"i", "h\nx: y", "hostname has a forbidden character '\\n'"},
		{"../x", "h", "instance-id has a forbidden character '/'"},
		{"..", "h", `instance-id ".." is not allowed`},
		{"i", "h\x00", "forbidden character"},
		{"i", "h\u200b\u2028", "forbidden character"},
		{"i", "caf\xe9", "hostname is not valid UTF-8"},
		{"i", strings.Repeat("a", 254), "hostname is 254 bytes, over the limit of 253"},
	}
	for _, tt := range tests {
		s := Seed{InstanceID: tt.id, Hostname: tt.host}
		err := s.Validate(Limits{})
		if tt.want == "" {
			if err != nil {
				t.Errorf("%q/%q: %v", tt.id, tt.host, err)
			}
			continue
		}
		if !errcode.Is(err, errcode.ValidationFailed) || !strings.Contains(errcode.MessageOf(err), tt.want) {
			t.Errorf("%q/%q: got %v, want %q", tt.id, tt.host, err, tt.want)
		}
		// Build refuses what would corrupt meta-data too.
		if err := Build(io.Discard, s); !errcode.Is(err, errcode.ValidationFailed) {
			t.Errorf("%q/%q: Build: %v", tt.id, tt.host, err)
		}
	}
}

func TestMetaData(t *testing.T) {
	s := Seed{InstanceID: testUUID, Hostname: "web-1"}
	want := "instance-id: \"" + testUUID + "\"\nlocal-hostname: \"web-1\"\n"
	if got := string(s.MetaData()); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	// Values YAML 1.1 would read as something else stay quoted strings.
	for _, h := range []string{"yes", "off", "0123", "1e3", "12:30:00", "~", "null", "2001-12-14", "'q'", `"dq"`, `back\slash`, "#x", "a: b"} {
		md := string(Seed{InstanceID: "i", Hostname: h}.MetaData())
		if !strings.Contains(md, "local-hostname: \"") {
			t.Errorf("%q not double-quoted: %s", h, md)
		}
		var m map[string]any
		if err := yaml.Unmarshal([]byte(md), &m); err != nil || m["local-hostname"] != h {
			t.Errorf("%q: round trip gave %#v, %v", h, m["local-hostname"], err)
		}
	}
}

func TestEmpty(t *testing.T) {
	s := Seed{InstanceID: "i", Hostname: "h"}
	if !s.Empty() {
		t.Error("meta-data only seed not Empty")
	}
	for _, f := range []func(*Seed){
		func(s *Seed) { s.UserData = []byte("#!/bin/sh\n") },
		func(s *Seed) { s.NetworkConfig = []byte("version: 2\n") },
		func(s *Seed) { s.VendorData = []byte{} },
	} {
		c := s
		f(&c)
		if c.Empty() {
			t.Errorf("%+v reported Empty", c)
		}
	}
}

func TestNormalizeRejectsUnexpectedLayout(t *testing.T) {
	img := build(t, goldenSeeds(t)["meta-only"])
	// Undo our path table so the input looks like the library's output.
	fresh := func() []byte {
		b := append([]byte(nil), img...)
		pvd := b[pvdSector*sectorSize:]
		n := binary.LittleEndian.Uint32(pvd[pvdVolumeSize:]) - 2
		putBothEndian32(pvd[pvdVolumeSize:], n)
		putBothEndian32(pvd[pvdPathTabSize:], 0)
		return b[:n*sectorSize]
	}
	if _, err := normalize(fresh()); err != nil {
		t.Fatalf("library-shaped image: %v", err)
	}
	if out, _ := normalize(fresh()); !bytes.Equal(out, img) {
		t.Error("normalize is not idempotent over its own input")
	}
	for name, corrupt := range map[string]func([]byte) []byte{
		"truncated":     func(b []byte) []byte { return b[:len(b)-sectorSize] },
		"odd size":      func(b []byte) []byte { return b[:len(b)-1] },
		"no PVD":        func(b []byte) []byte { b[pvdSector*sectorSize] = 2; return b },
		"no terminator": func(b []byte) []byte { b[(pvdSector+1)*sectorSize] = 1; return b },
		"path table":    func(b []byte) []byte { putBothEndian32(b[pvdSector*sectorSize+pvdPathTabSize:], 10); return b },
		"root out of range": func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[pvdSector*sectorSize+pvdRootRecord+2:], 1000)
			return b
		},
		"bad record length": func(b []byte) []byte { b[18*sectorSize] = 20; return b },
		"identifier past record": func(b []byte) []byte {
			b[18*sectorSize+68+32] = 200 // the third record's identifier length
			return b
		},
	} {
		if _, err := normalize(corrupt(fresh())); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestBsdtar extracts the seed with libarchive's bsdtar, which is what
// cloudbase-init runs on Windows to read a seed from a raw disk: it must
// see the plain names.
//
// Optional: scripts/deps.sh does not install libarchive-tools (yet), so a
// machine without bsdtar skips, in CI too.
func TestBsdtar(t *testing.T) {
	bsdtar, err := exec.LookPath("bsdtar")
	if err != nil {
		t.Skip("bsdtar not found (Debian package libarchive-tools)")
	}
	s := goldenSeeds(t)["full"]
	path := writeTemp(t, s)
	dir := t.TempDir()
	if out, err := exec.Command(bsdtar, "-xf", path, "-C", dir).CombinedOutput(); err != nil {
		t.Fatalf("bsdtar: %v\n%s", err, out)
	}
	assertOnly(t, dir, "meta-data", "network-config", "user-data", "vendor-data")
	for name, want := range map[string][]byte{
		"meta-data":      s.MetaData(),
		"network-config": s.NetworkConfig,
		"user-data":      s.UserData,
		"vendor-data":    s.VendorData,
	} {
		if got, err := os.ReadFile(filepath.Join(dir, name)); err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: %q, %v", name, got, err)
		}
	}
}
