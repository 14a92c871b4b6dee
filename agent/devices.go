package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/otherix/otherix-agent/agent/crashpoint"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/imagecache"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// diskDevice resolves a seed-000 DISK device to an engine disk: source
// names a volume of storage_pool (default pool when empty), or an absolute
// path under devices.allowed_paths.
func (h *Host) diskDevice(ctx context.Context, i int, d api.Device) (vm.Disk, error) {
	if d.Source == "" {
		return vm.Disk{}, errcode.New(errcode.ValidationFailed, "devices[%d]: a DISK needs source (a volume name or an allowed path)", i)
	}
	var path, format string
	if strings.HasPrefix(d.Source, "/") {
		p, err := h.allowedPath(i, d.Source)
		if err != nil {
			return vm.Disk{}, err
		}
		if format, err = fileFormat(ctx, p); err != nil {
			return vm.Disk{}, err
		}
		path = p
	} else {
		p, err := h.volumePath(d.StoragePool, d.Source)
		if err != nil {
			return vm.Disk{}, errcode.Prefix(err, "devices[%d]", i)
		}
		if _, err := os.Stat(p); err != nil {
			return vm.Disk{}, errcode.New(errcode.NotFound, "devices[%d]: volume %q not found", i, d.Source)
		}
		path, format = p, "qcow2"
	}
	bus := vm.BusVirtioBlk
	if d.IOBus != "" {
		b, ok := rootBuses[d.IOBus]
		if !ok {
			return vm.Disk{}, errcode.New(errcode.ValidationFailed, "devices[%d].io_bus %q: use NVME, VIRTIO-BLK or VIRTIO-SCSI", i, d.IOBus)
		}
		bus = b
	}
	disk := vm.Disk{Path: path, Format: format, Bus: bus, ReadOnly: d.Readonly}
	bi, err := bootPriority(i, d)
	if err != nil {
		return vm.Disk{}, err
	}
	disk.BootIndex = bi
	return disk, nil
}

// cdromDevice resolves a seed-000 CDROM device: source is an image URL
// (through the pool's image cache, sha256-verified like root images) or an
// ISO under devices.allowed_paths. For an image URL it also returns the
// cached image, which is not pinned yet: see pinCDROM.
func (h *Host) cdromDevice(ctx context.Context, i int, d api.Device, pool string) (vm.CDROM, *cdromImage, error) {
	if d.Source == "" {
		return vm.CDROM{}, nil, errcode.New(errcode.ValidationFailed, "devices[%d]: a CDROM needs source (an image URL or an allowed path)", i)
	}
	var path string
	var img *cdromImage
	if strings.HasPrefix(d.Source, "/") {
		p, err := h.allowedPath(i, d.Source)
		if err != nil {
			return vm.CDROM{}, nil, err
		}
		path = p
	} else {
		if d.StoragePool != "" {
			pool = d.StoragePool
		}
		req := imagecache.Request{URL: d.Source, SHA256: d.SHA256, Format: "raw"}
		e, err := h.cache.Ensure(ctx, pool, req, nil)
		if err != nil {
			return vm.CDROM{}, nil, errcode.Prefix(err, "devices[%d]", i)
		}
		path = e.Path
		img = &cdromImage{pool: pool, req: req, entry: e}
	}
	bi, err := bootPriority(i, d)
	if err != nil {
		return vm.CDROM{}, nil, err
	}
	return vm.CDROM{Path: path, BootIndex: bi}, img, nil
}

// cdromImage is a CD-ROM medium from a pool's image cache.
type cdromImage struct {
	pool  string
	req   imagecache.Request
	entry imagecache.Entry
}

// cdromOwner is the owner of a VM's CD-ROM image pins: not its uuid, the
// owner of its root image's pin, so that neither drops the other's (the
// same image may be both).
func cdromOwner(id string) string { return id + ":cdrom" }

// pinAttempts bounds the Pin, Ensure again rounds of pinCDROM.
const pinAttempts = 3

// pinCDROM pins img for owner as the medium of CD-ROM index. Eviction may
// take the entry between Ensure and Pin (not_found): it is then ensured
// again (downloaded again), at most pinAttempts times in all; img.entry is
// the entry pinned.
func (h *Host) pinCDROM(ctx context.Context, img *cdromImage, owner string, index int) (vm.CDROMPin, error) {
	for attempt := 1; ; attempt++ {
		err := h.cache.Pin(img.pool, img.entry.Digest, owner)
		if err == nil {
			return vm.CDROMPin{Index: index, Pool: img.pool, Digest: img.entry.Digest}, nil
		}
		if errcode.Of(err) != errcode.NotFound || attempt == pinAttempts {
			return vm.CDROMPin{}, err
		}
		h.log.Info("CD-ROM image evicted before it was pinned; ensuring it again", zap.String("pool", img.pool),
			zap.String("image_sha256", img.entry.Digest), zap.Int("attempt", attempt))
		e, err := h.cache.Ensure(ctx, img.pool, img.req, nil)
		if err != nil {
			return vm.CDROMPin{}, err
		}
		img.entry = e
	}
}

// pinUsed reports whether a CD-ROM other than index holds (pool, digest).
func pinUsed(pins []vm.CDROMPin, pool, digest string, index int) bool {
	for _, p := range pins {
		if p.Index != index && p.Pool == pool && p.Digest == digest {
			return true
		}
	}
	return false
}

func bootPriority(i int, d api.Device) (int, error) {
	if d.BootPriority == nil {
		return 0, nil
	}
	if *d.BootPriority < 0 {
		return 0, errcode.New(errcode.ValidationFailed, "devices[%d].boot_priority must be >= 0", i)
	}
	return bootIndex(*d.BootPriority), nil
}

// bootIndex maps seed 000's boot_priority (lower boots first) to QEMU's
// bootindex. The root disk is priority 1 (bootindex 3): a device of
// priority 0 boots before it, any other after it.
func bootIndex(priority int) int { return 2 * (priority + 1) }

// allowedPath resolves a DISK or CDROM source path and checks it is a
// regular file or block device under one of devices.allowed_paths, after
// every symlink is resolved: "..", absolute paths elsewhere and symlinks
// escaping an allowed directory are validation_failed.
func (h *Host) allowedPath(i int, src string) (string, error) {
	if !filepath.IsAbs(src) || filepath.Clean(src) != src {
		return "", errcode.New(errcode.ValidationFailed, "devices[%d].source %q must be a clean absolute path", i, src)
	}
	real, err := filepath.EvalSymlinks(src)
	if err != nil {
		return "", errcode.New(errcode.ValidationFailed, "devices[%d].source %q: %v", i, src, err)
	}
	for _, dir := range h.cfg.Devices.AllowedPaths {
		rd, err := filepath.EvalSymlinks(dir)
		if err != nil {
			continue
		}
		if rel, err := filepath.Rel(rd, real); err == nil && filepath.IsLocal(rel) {
			fi, err := os.Stat(real)
			if err != nil || !(fi.Mode().IsRegular() || fi.Mode()&os.ModeDevice != 0) {
				return "", errcode.New(errcode.ValidationFailed, "devices[%d].source %q is not a file or block device", i, src)
			}
			return real, nil
		}
	}
	return "", errcode.New(errcode.ValidationFailed, "devices[%d].source %q is not under an allowed directory (devices.allowed_paths)", i, src)
}

// fileFormat is the real format of a DISK source file (qemu-img info):
// raw or qcow2 without a backing file.
func fileFormat(ctx context.Context, path string) (string, error) {
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "-U", "--output=json", path).Output()
	if err != nil {
		return "", errcode.New(errcode.ValidationFailed, "qemu-img info %s failed", path)
	}
	var info struct {
		Format  string `json:"format"`
		Backing string `json:"backing-filename"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return "", errcode.Wrap(errcode.Internal, err, "qemu-img info")
	}
	switch {
	case info.Backing != "":
		return "", errcode.New(errcode.ImageFormatUnsupported, "%s has a backing file", path)
	case info.Format == "raw" || info.Format == "qcow2":
		return info.Format, nil
	}
	return "", errcode.New(errcode.ImageFormatUnsupported, "%s is %s: use raw or qcow2", path, info.Format)
}

// sourcePath resolves a DISK source (a volume of pool, or an allowed path)
// to its file.
func (h *Host) sourcePath(d api.Device) (string, error) {
	if strings.HasPrefix(d.Source, "/") {
		return h.allowedPath(0, d.Source)
	}
	return h.volumePath(d.StoragePool, d.Source)
}

// AttachDisk adds a DISK device to a VM, at once if it runs (hot-plug),
// and to the VM's devices.
func (h *Host) AttachDisk(ctx context.Context, name string, d api.Device) (api.VM, error) {
	disk, err := h.diskDevice(ctx, 0, d)
	if err != nil {
		return api.VM{}, err
	}
	d.DevType = api.DevDisk
	if _, err := h.engine.Do(ctx, name, "disk_attach", func(t *vm.Txn) error {
		// An attach the agent was killed in the middle of (the disk in
		// the VM, not yet in its devices) is finished, not done twice.
		if !slices.ContainsFunc(t.View().Spec.Disks, func(x vm.Disk) bool { return x.Path == disk.Path }) {
			if err := t.AttachDisk(ctx, disk); err != nil {
				return err
			}
		}
		crashpoint.Hit("attach.plugged")
		h.recordIn(t, func(m *vm.Record) {
			if !slices.ContainsFunc(m.Devices, func(x api.Device) bool { return x.DevType == api.DevDisk && x.Source == d.Source }) {
				m.Devices = append(m.Devices, d)
			}
		})
		return nil
	}); err != nil {
		return api.VM{}, err
	}
	h.eventByName(name, api.EventDiskAttached, d.Source, "")
	return h.VM(name)
}

// DetachDisk removes a DISK device from a VM (unplugged at once when it
// was attached while the VM ran, else at the next start), and from the
// VM's devices.
func (h *Host) DetachDisk(ctx context.Context, name string, d api.Device) (api.VM, error) {
	path, err := h.sourcePath(d)
	if err != nil {
		return api.VM{}, err
	}
	if _, err := h.engine.Do(ctx, name, "disk_detach", func(t *vm.Txn) error {
		if err := t.DetachDisk(ctx, path); err != nil {
			return err
		}
		h.recordIn(t, func(m *vm.Record) {
			m.Devices = slices.DeleteFunc(m.Devices, func(x api.Device) bool {
				if x.DevType != api.DevDisk {
					return false
				}
				p, err := h.sourcePath(x)
				if err != nil { // an allowed path gone or no longer allowed
					return x.Source == d.Source
				}
				return p == path
			})
		})
		return nil
	}); err != nil {
		return api.VM{}, err
	}
	h.eventByName(name, api.EventDiskDetached, d.Source, "")
	return h.VM(name)
}

// ChangeMedium inserts a CDROM source (an allowed ISO or an image URL)
// into a VM's CD-ROM index (the engine's: the seed ISO is 0 when the VM
// has cloud-init), or ejects it when source is empty.
//
// An image URL's cache entry is pinned for the VM's cdromOwner before the
// medium goes in; the image the CD-ROM held before is unpinned unless
// another of the VM's CD-ROMs holds it too; the CDROM device at that index
// gets the new source. An eject changes neither pins nor devices: the
// engine keeps the medium's file for the VM's next start. The pin, the
// change and the record are one unit under the VM's lock (vm.Txn).
func (h *Host) ChangeMedium(ctx context.Context, name string, index int, d api.Device) (api.VM, error) {
	v, err := h.engine.Get(name)
	if err != nil {
		return api.VM{}, err
	}
	path := ""
	var img *cdromImage
	if d.Source != "" {
		// The download, if any, runs before the VM's lock is taken.
		cd, i, err := h.cdromDevice(ctx, 0, d, v.Record.Pool)
		if err != nil {
			return api.VM{}, err
		}
		path, img = cd.Path, i
	}
	if _, err := h.engine.Do(ctx, name, "cdrom_change", func(t *vm.Txn) error {
		return h.changeMedium(ctx, t, index, d, path, img)
	}); err != nil {
		return api.VM{}, err
	}
	msg := fmt.Sprintf("cd-rom %d: %s", index, d.Source)
	if d.Source == "" {
		msg = fmt.Sprintf("cd-rom %d: ejected", index)
	}
	h.eventByName(name, api.EventMediumChanged, msg, "")
	return h.VM(name)
}

func (h *Host) changeMedium(ctx context.Context, t *vm.Txn, index int, d api.Device, path string, img *cdromImage) error {
	v := t.View()
	name := v.Spec.Name
	owner := cdromOwner(v.Spec.UUID)
	var pin *vm.CDROMPin
	if img != nil {
		p, err := h.pinCDROM(ctx, img, owner, index)
		if err != nil {
			return err
		}
		pin, path = &p, img.entry.Path
	}
	if err := t.ChangeMedium(ctx, index, path); err != nil {
		if pin != nil && !pinUsed(v.Record.CDROMPins, pin.Pool, pin.Digest, -1) {
			h.unpinCDROM(name, owner, *pin)
		}
		return err
	}
	if d.Source == "" {
		return nil
	}
	var drop []vm.CDROMPin
	h.recordIn(t, func(m *vm.Record) {
		drop = nil
		pins := slices.DeleteFunc(slices.Clone(m.CDROMPins), func(p vm.CDROMPin) bool { return p.Index == index })
		if pin != nil {
			pins = append(pins, *pin)
		}
		for _, old := range m.CDROMPins {
			if old.Index == index && !pinUsed(pins, old.Pool, old.Digest, -1) {
				drop = append(drop, old)
			}
		}
		m.CDROMPins = pins
		// The CDROM device of this index: the seed ISO comes first.
		k := index
		if m.CloudInit {
			k--
		}
		for i := range m.Devices {
			if m.Devices[i].DevType != api.DevCDROM {
				continue
			}
			if k == 0 {
				m.Devices[i].Source, m.Devices[i].SHA256, m.Devices[i].StoragePool = d.Source, d.SHA256, d.StoragePool
				break
			}
			k--
		}
	})
	for _, p := range drop {
		h.unpinCDROM(name, owner, p)
	}
	return nil
}

// unpinCDROM drops a VM's CD-ROM pin, logging a failure (the pin then
// stays: the image is kept, never lost).
func (h *Host) unpinCDROM(name, owner string, p vm.CDROMPin) {
	if err := h.cache.Unpin(p.Pool, p.Digest, owner); err != nil {
		h.log.Warn("unpin CD-ROM image", zap.String("vm", name), zap.String("pool", p.Pool),
			zap.String("image_sha256", p.Digest), zap.Error(err))
	}
}
