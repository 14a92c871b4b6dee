package imagecache

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/otherix/otherix-agent/internal/errcode"
)

func TestEnsureFormats(t *testing.T) {
	raw := randomBytes(2<<20, 30)
	qcow := qcow2Of(t, raw)
	dir := t.TempDir()
	vmdkPath := filepath.Join(dir, "x.vmdk")
	rawPath := filepath.Join(dir, "x.raw")
	os.WriteFile(rawPath, raw, 0o600)
	qemuImg(t, "convert", "-f", "raw", "-O", "vmdk", rawPath, vmdkPath)
	vmdk, _ := os.ReadFile(vmdkPath)
	backed := filepath.Join(dir, "backed.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", backed, "1M")
	backedBytes, _ := os.ReadFile(backed)
	dataFile := filepath.Join(dir, "df.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "df.raw"), dataFile, "1M")
	dataFileBytes, _ := os.ReadFile(dataFile)

	tests := []struct {
		name       string
		data       []byte
		format     string
		wantFormat string
		code       errcode.Code
	}{
		{"raw", raw, "", "raw", ""},
		{"qcow2 named as such", qcow, "qcow2", "qcow2", ""},
		{"qcow2 claimed raw", qcow, "raw", "", errcode.ValidationFailed},
		{"raw claimed qcow2", raw, "QCOW2", "", errcode.ValidationFailed},
		{"vmdk", vmdk, "", "", errcode.ImageFormatUnsupported},
		{"qcow2 with backing file", backedBytes, "", "", errcode.ImageFormatUnsupported},
		{"qcow2 with external data file", dataFileBytes, "", "", errcode.ImageFormatUnsupported},
		{"empty", []byte{}, "", "", errcode.ImageFormatUnsupported},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, dir := newCache(t, testOptions(t))
			s := newImageServer(t)
			// The name lies: the format comes from the content.
			url := s.add("/image.qcow2", &served{data: tt.data})
			e, err := c.Ensure(context.Background(), "p", Request{URL: url, Format: tt.format}, nil)
			if tt.code != "" {
				wantCode(t, err, tt.code)
				wantEmptyCache(t, c, dir)
				return
			}
			if err != nil || e.Format != tt.wantFormat || e.VirtualSize != int64(len(raw)) {
				t.Fatalf("Ensure = %+v, %v", e, err)
			}
			// A hit with the wrong format is refused too.
			other := map[string]string{"raw": "qcow2", "qcow2": "raw"}[e.Format]
			_, err = c.Ensure(context.Background(), "p", Request{URL: url, Format: other}, nil)
			wantCode(t, err, errcode.ValidationFailed)
		})
	}
}

// backingChain returns `qemu-img info --backing-chain` of path.
func backingChain(t *testing.T, path string) []map[string]any {
	t.Helper()
	var chain []map[string]any
	if err := json.Unmarshal(qemuImg(t, "info", "--backing-chain", "--output=json", path), &chain); err != nil {
		t.Fatal(err)
	}
	return chain
}

func TestCreateOverlay(t *testing.T) {
	c, dir := newCache(t, testOptions(t))
	s := newImageServer(t)
	raw := randomBytes(4<<20, 31)
	small := mustEnsure(t, c, Request{URL: s.add("/small.raw", &served{data: raw})})
	q := mustEnsure(t, c, Request{URL: s.add("/small.qcow2", &served{data: qcow2Of(t, raw)})})

	// A 10 GiB sparse raw image, committed through the real commit path
	// with its known digest (downloading it would take too long here).
	bigFile := filepath.Join(dir, "images", "ingest", "big.part")
	f, err := os.Create(bigFile)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(10 << 30)
	f.Close()
	const tenGiBZeros = "732377e7f4a2abdc13ddfa1eb4c9c497fd2a2b294674d056cf51581b47dd586d"
	big := plant(t, c, bigFile, tenGiBZeros, "http://127.0.0.1:1/big.raw")
	if big.Format != "raw" || big.VirtualSize != 10<<30 {
		t.Fatalf("big entry %+v", big)
	}

	tests := []struct {
		name    string
		e       Entry
		diskGiB int
		want    int64
	}{
		{"small raw, image size", small, 0, 4 << 20},
		{"small raw, 1 GiB", small, 1, 1 << 30},
		{"small qcow2, 2 GiB", q, 2, 2 << 30},
		{"10 GiB raw, image size", big, 0, 10 << 30},
		{"10 GiB raw, 20 GiB", big, 20, 20 << 30},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst := filepath.Join(dir, "vms", "vm"+string(rune('a'+i)), "root.qcow2")
			owner := "vm-" + string(rune('a'+i))
			if err := c.CreateOverlay(context.Background(), "p", tt.e.Digest, dst, tt.diskGiB, owner); err != nil {
				t.Fatal(err)
			}
			chain := backingChain(t, dst)
			if len(chain) != 2 {
				t.Fatalf("chain = %v", chain)
			}
			top, base := chain[0], chain[1]
			if top["format"] != "qcow2" || top["backing-filename"] != tt.e.Path || top["backing-filename-format"] != tt.e.Format ||
				int64(top["virtual-size"].(float64)) != tt.want {
				t.Fatalf("overlay = %v", top)
			}
			if base["filename"] != tt.e.Path || base["format"] != tt.e.Format {
				t.Fatalf("backing = %v", base)
			}
			// The overlay is small whatever the image's size.
			if fi, _ := os.Stat(dst); fi.Size() > 1<<20 {
				t.Errorf("overlay is %d bytes", fi.Size())
			}
			es, _ := c.List("p")
			for _, e := range es {
				if e.Digest == tt.e.Digest && !contains(e.PinnedBy, owner) {
					t.Fatalf("entry not pinned by %s: %v", owner, e.PinnedBy)
				}
			}
		})
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestCreateOverlayRefusals(t *testing.T) {
	c, dir := newCache(t, testOptions(t))
	s := newImageServer(t)
	e := mustEnsure(t, c, Request{URL: s.add("/img", &served{data: randomBytes(2<<20, 32)})})
	outside := t.TempDir()
	if err := os.Symlink(outside, filepath.Join(dir, "vms", "escape")); err != nil {
		t.Fatal(err)
	}
	existing := filepath.Join(dir, "vms", "existing.qcow2")
	os.WriteFile(existing, []byte("keep me"), 0o600)

	tests := []struct {
		name    string
		digest  string
		dst     string
		diskGiB int
		owner   string
		code    errcode.Code
	}{
		{"outside the pool", e.Digest, filepath.Join(outside, "x.qcow2"), 0, "vm1", errcode.ValidationFailed},
		{"dot-dot out of the pool", e.Digest, filepath.Join(dir, "vms", "..", "..", "x.qcow2"), 0, "vm1", errcode.ValidationFailed},
		{"through a symlink out of the pool", e.Digest, filepath.Join(dir, "vms", "escape", "new", "x.qcow2"), 0, "vm1", errcode.ValidationFailed},
		{"inside the image store", e.Digest, filepath.Join(dir, "images", "sha256", "x"), 0, "vm1", errcode.ValidationFailed},
		{"relative", e.Digest, "vms/x.qcow2", 0, "vm1", errcode.ValidationFailed},
		{"the pool dir itself", e.Digest, dir, 0, "vm1", errcode.ValidationFailed},
		{"existing file", e.Digest, existing, 0, "vm1", errcode.Conflict},
		{"unknown image", sha([]byte("x")), filepath.Join(dir, "vms", "y.qcow2"), 0, "vm1", errcode.NotFound},
		{"bad digest", "../../etc/passwd", filepath.Join(dir, "vms", "y.qcow2"), 0, "vm1", errcode.ValidationFailed},
		{"bad owner", e.Digest, filepath.Join(dir, "vms", "y.qcow2"), 0, "", errcode.ValidationFailed},
		{"negative size", e.Digest, filepath.Join(dir, "vms", "y.qcow2"), -1, "vm1", errcode.ValidationFailed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := c.CreateOverlay(context.Background(), "p", tt.digest, tt.dst, tt.diskGiB, tt.owner)
			wantCode(t, err, tt.code)
		})
	}
	if b, _ := os.ReadFile(existing); string(b) != "keep me" {
		t.Fatalf("existing file changed: %q", b)
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Fatalf("wrote outside the pool: %v", ents)
	}
	es, _ := c.List("p")
	if len(es) != 1 || len(es[0].PinnedBy) != 0 {
		t.Fatalf("a refused overlay left a pin: %+v", es)
	}
	_, err := os.Stat(filepath.Join(dir, "vms", "y.qcow2"))
	if !os.IsNotExist(err) {
		t.Fatalf("refused overlay left a file: %v", err)
	}
}

func TestCreateOverlayUndo(t *testing.T) {
	// A disk smaller than the image is refused before anything is made; a
	// failing qemu-img after the pin must undo the pin, the file and the
	// directories it created.
	opts := testOptions(t)
	c, dir := newCache(t, opts)
	s := newImageServer(t)
	// Virtual size 2 GiB, so a 1 GiB disk is too small.
	bigQ := filepath.Join(t.TempDir(), "q.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", bigQ, "2G")
	qb, _ := os.ReadFile(bigQ)
	e := mustEnsure(t, c, Request{URL: s.add("/q", &served{data: qb})})
	dst := filepath.Join(dir, "vms", "new1", "new2", "root.qcow2")
	err := c.CreateOverlay(context.Background(), "p", e.Digest, dst, 1, "vm1")
	wantCode(t, err, errcode.ValidationFailed)
	if _, err := os.Stat(filepath.Join(dir, "vms", "new1")); !os.IsNotExist(err) {
		t.Fatalf("directories left: %v", err)
	}

	// qemu-img that fails on create.
	script := filepath.Join(t.TempDir(), "qemu-img")
	os.WriteFile(script, []byte("#!/bin/sh\n[ \"$1\" = create ] && { echo boom >&2; exit 1; }\nexec qemu-img \"$@\"\n"), 0o755)
	c.opts.QemuImg = script
	err = c.CreateOverlay(context.Background(), "p", e.Digest, dst, 0, "vm1")
	if errcode.Of(err) != errcode.Internal {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "vms", "new1")); !os.IsNotExist(err) {
		t.Fatalf("directories left: %v", err)
	}
	es, _ := c.List("p")
	if len(es[0].PinnedBy) != 0 {
		t.Fatalf("pin left: %v", es[0].PinnedBy)
	}
	// A pin that existed before a failed call stays.
	c.opts.QemuImg = "qemu-img"
	if err := c.CreateOverlay(context.Background(), "p", e.Digest, filepath.Join(dir, "vms", "ok.qcow2"), 0, "vm1"); err != nil {
		t.Fatal(err)
	}
	c.opts.QemuImg = script
	c.CreateOverlay(context.Background(), "p", e.Digest, dst, 0, "vm1")
	es, _ = c.List("p")
	if !contains(es[0].PinnedBy, "vm1") {
		t.Fatalf("earlier pin lost: %v", es[0].PinnedBy)
	}
}
