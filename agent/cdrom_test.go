package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// TestCDROMImagePins: one VM (cloud-init on, so its seed ISO is CD-ROM 0)
// with two CD-ROMs from the same image URL and a volume. Its CD-ROM image
// is pinned for "<uuid>:cdrom" (the root image for the uuid) and survives
// eviction (cache_max_bytes of 1 byte); a medium change to another URL
// pins the new image, keeps the old one pinned while the other CD-ROM
// still holds it and unpins it once none does, and the guest sees the new
// medium in the drive of that index; a failed change leaves no pin; a pin
// whose entry was evicted after Ensure ensures it again; the view's
// devices follow medium changes, attach and detach; delete unpins all.
func TestCDROMImagePins(t *testing.T) {
	t.Parallel()
	hh := newHost(t)
	hh.cfg.Limits.CacheMaxBytes = 1 // every unpinned image goes at the next ingest or prune
	hh.h.Close()
	h, err := NewHost(context.Background(), hh.cfg, Options{Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	hh.h = h
	t.Cleanup(func() {
		for _, v := range h.Engine().List() {
			if v.PID > 0 {
				syscall.Kill(v.PID, syscall.SIGKILL)
			}
		}
		h.Close()
	})
	isos := t.TempDir()
	mkiso := func(name string, kb int) (url, digest string, size int) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "pad"), make([]byte, kb<<10), 0o644)
		p := filepath.Join(isos, name)
		if out, err := exec.Command("genisoimage", "-quiet", "-V", name, "-o", p, dir).CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		s := sha256.Sum256(b)
		return "/" + name, hex.EncodeToString(s[:]), len(b)
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(isos)))
	defer srv.Close()
	uA, a, _ := mkiso("a.iso", 64)
	uB, b, sizeB := mkiso("b.iso", 2048)
	uC, cc, _ := mkiso("c.iso", 128)
	uA, uB, uC = srv.URL+uA, srv.URL+uB, srv.URL+uC
	ctx := context.Background()
	for _, n := range []string{"vol1", "vol2"} {
		if _, err := h.CreateVolume(ctx, "", n, 1); err != nil {
			t.Fatal(err)
		}
	}

	id := uuid.NewString()
	owner := id + ":cdrom"
	if _, err := h.Create(ctx, id, api.CreateVM{Name: "cd", ImageURL: hh.image, Arch: "amd64", VCPUs: 1, MemoryMB: 256,
		Devices: []api.Device{
			{DevType: api.DevCDROM, Source: uA},
			{DevType: api.DevDisk, Source: "vol1"},
			{DevType: api.DevCDROM, Source: uA, SHA256: a},
		}}, nil, nil); err != nil {
		t.Fatal(err)
	}
	pins := func() map[string][]string { // digest → pinned_by, from the image list
		t.Helper()
		imgs, err := h.Images("default")
		if err != nil {
			t.Fatal(err)
		}
		out := map[string][]string{}
		for _, i := range imgs {
			out[i.Digest] = i.PinnedBy
		}
		return out
	}
	wantPins := func(step, digest string, want ...string) {
		t.Helper()
		got, ok := pins()[digest]
		if !ok {
			t.Fatalf("%s: image %s is not in the cache", step, digest[:12])
		}
		if !slices.Equal(got, want) {
			t.Fatalf("%s: image %s pinned by %q, want %q", step, digest[:12], got, want)
		}
	}
	wantGone := func(step, digest string) {
		t.Helper()
		if p, ok := pins()[digest]; ok {
			t.Fatalf("%s: image %s still cached, pinned by %q", step, digest[:12], p)
		}
	}
	prune := func() {
		t.Helper()
		if _, err := h.Cache().Prune(ctx, "default"); err != nil {
			t.Fatal(err)
		}
	}
	pin := func(index int, pool, digest string) vm.CDROMPin {
		return vm.CDROMPin{Index: index, Pool: pool, Digest: digest}
	}
	wantMeta := func(step string, want ...vm.CDROMPin) {
		t.Helper()
		got := mustView(t, h, "cd").Record.CDROMPins
		slices.SortFunc(got, func(x, y vm.CDROMPin) int { return x.Index - y.Index })
		if !slices.Equal(got, want) {
			t.Fatalf("%s: meta cdrom_pins %+v, want %+v", step, got, want)
		}
	}
	wantDevices := func(step string, want ...string) { // "TYPE source"
		t.Helper()
		v, err := h.VM("cd")
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, d := range v.Devices {
			got = append(got, d.DevType+" "+d.Source)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("%s: devices %q, want %q", step, got, want)
		}
	}

	// Created: the CD-ROM image is pinned once for both CD-ROMs (1 and 2:
	// the seed is 0), the root image for the uuid; eviction keeps both.
	prune()
	wantPins("create", a, owner)
	root := mustView(t, h, "cd").Record.ImageSHA256
	wantPins("create", root, id)
	wantMeta("create", pin(1, "default", a), pin(2, "default", a))
	wantDevices("create", "CDROM "+uA, "DISK vol1", "CDROM "+uA)

	c := hh.console("cd")
	wait(t, c, "OTHERIX-GUEST ready")

	// CD-ROM 1 gets B: B pinned, A still (CD-ROM 2 holds it); the guest
	// sees B in its second drive (sr1).
	if _, err := h.ChangeMedium(ctx, "cd", 1, api.Device{Source: uB}); err != nil {
		t.Fatal(err)
	}
	prune()
	wantPins("change 1", a, owner)
	wantPins("change 1", b, owner)
	wantMeta("change 1", pin(1, "default", b), pin(2, "default", a))
	wantDevices("change 1", "CDROM "+uB, "DISK vol1", "CDROM "+uA)
	line := wait(t, c, "OTHERIX-GUEST disks ")
	for !strings.Contains(line, "sr1:"+strconv.Itoa(sizeB)) {
		line = wait(t, c, "OTHERIX-GUEST disks ")
	}
	if v, _ := h.VM("cd"); v.Devices[2].SHA256 != a || v.Devices[0].SHA256 != "" {
		t.Fatalf("change 1: sha256 of the devices: %+v", v.Devices)
	}

	// CD-ROM 2 gets B too: nothing holds A any more, it is unpinned and
	// the next prune evicts it.
	if _, err := h.ChangeMedium(ctx, "cd", 2, api.Device{Source: uB, SHA256: b}); err != nil {
		t.Fatal(err)
	}
	wantPins("change 2", b, owner)
	wantMeta("change 2", pin(1, "default", b), pin(2, "default", b))
	wantDevices("change 2", "CDROM "+uB, "DISK vol1", "CDROM "+uB)
	if v, _ := h.VM("cd"); v.Devices[2].SHA256 != b {
		t.Fatalf("change 2: sha256 of the device: %+v", v.Devices[2])
	}
	prune()
	wantGone("change 2", a)
	wantPins("change 2", b, owner)

	// A change that fails (no CD-ROM 7) leaves no pin on its image and
	// nothing changed.
	if _, err := h.ChangeMedium(ctx, "cd", 7, api.Device{Source: uC}); errcode.Of(err) != errcode.NotFound {
		t.Fatalf("change of CD-ROM 7: %v", err)
	}
	wantPins("failed change", cc)
	wantMeta("failed change", pin(1, "default", b), pin(2, "default", b))
	prune()
	wantGone("failed change", cc)

	// An entry evicted between Ensure and Pin is ensured again.
	_, img, err := h.cdromDevice(ctx, 0, api.Device{DevType: api.DevCDROM, Source: uC}, "default")
	if err != nil || img == nil {
		t.Fatalf("cdromDevice: %v %v", img, err)
	}
	if err := h.Cache().Evict(ctx, "default", cc); err != nil {
		t.Fatal(err)
	}
	if p, err := h.pinCDROM(ctx, img, "probe:cdrom", 1); err != nil || p.Digest != cc {
		t.Fatalf("pin of an evicted entry: %+v %v", p, err)
	}
	wantPins("re-ensured", cc, "probe:cdrom")
	if err := h.Cache().Unpin("default", cc, "probe:cdrom"); err != nil {
		t.Fatal(err)
	}

	// Attach and detach keep the devices current.
	if _, err := h.AttachDisk(ctx, "cd", api.Device{DevType: api.DevDisk, Source: "vol2"}); err != nil {
		t.Fatal(err)
	}
	wantDevices("attach", "CDROM "+uB, "DISK vol1", "CDROM "+uB, "DISK vol2")
	wait(t, c, "vdc:1073741824:0")
	if _, err := h.DetachDisk(ctx, "cd", api.Device{Source: "vol1"}); err != nil {
		t.Fatal(err)
	}
	wantDevices("detach vol1", "CDROM "+uB, "CDROM "+uB, "DISK vol2")
	if _, err := h.DetachDisk(ctx, "cd", api.Device{Source: "vol2"}); err != nil {
		t.Fatal(err)
	}
	wantDevices("detach vol2", "CDROM "+uB, "CDROM "+uB)

	// Delete unpins everything: the next prune empties the cache.
	if err := h.Delete(ctx, "cd"); err != nil {
		t.Fatal(err)
	}
	wantPins("delete", b)
	wantPins("delete", root)
	prune()
	if p := pins(); len(p) != 0 {
		t.Fatalf("cache after delete and prune: %v", p)
	}
}
