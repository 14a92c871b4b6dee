package hostdev

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Owner is the user and group QEMU runs as.
type Owner struct {
	UID, GID int
}

// Acquire makes the plan's devices ready for QEMU, which runs as qemu
// (nil: as the agent's user, and no node changes owner):
//
//  1. creates the mdevs the plan makes (writes the UUID to the type's
//     create file);
//  2. binds unbound functions to vfio-pci (driver_override, then
//     drivers_probe);
//  3. gives each VFIO group node /dev/vfio/<group> to qemu, mode 0600,
//     recording the owner and mode it had in p.Grants.
//
// The devices are the VM's already: its caller recorded the plan as the
// VM's, checked against every other VM's (Holders), before Acquire.
// Acquire records what it did in p (Made, Bound, Grants): persist p
// before starting QEMU. On error it undoes what it did.
func (h *Host) Acquire(ctx context.Context, p *Plan, qemu *Owner) (err error) {
	defer func() {
		if err != nil {
			h.Release(p)
		}
	}()
	for i := range p.VFIO {
		if err := ctx.Err(); err != nil {
			return err
		}
		d := &p.VFIO[i]
		switch {
		case d.Mdev != nil && d.Mdev.Create:
			if err := h.createMdev(d.Mdev); err != nil {
				return err
			}
			p.Made = append(p.Made, *d.Mdev)
			_, group, err := h.readMdev(d.Mdev.UUID)
			if err != nil || group < 0 {
				return errcode.New(errcode.IOMMUUnavailable, "mdev %s has no IOMMU group", d.Mdev.UUID)
			}
			d.Group = group
		case d.Mdev == nil && d.Driver == "":
			if err := h.bindVFIO(d.Address); err != nil {
				return err
			}
			p.Bound = append(p.Bound, d.Address)
			d.Driver = "vfio-pci"
		}
	}
	if qemu == nil {
		return nil
	}
	seen := map[int]bool{}
	for _, d := range p.VFIO {
		if seen[d.Group] {
			continue
		}
		seen[d.Group] = true
		g, err := GrantNode(h.dev("vfio", strconv.Itoa(d.Group)), *qemu)
		if err != nil {
			return err
		}
		p.Grants = append(p.Grants, g)
	}
	return nil
}

// Release undoes Acquire from what p records: group nodes get their owner
// and mode back, functions Acquire bound are unbound from vfio-pci (and
// their driver_override cleared) and mdevs it created are removed. Call
// it once QEMU has exited; the devices are free once the caller forgets
// the plan. It carries on past errors and returns them joined; running it
// twice is harmless.
func (h *Host) Release(p *Plan) error {
	var errs []error
	for i := len(p.Grants) - 1; i >= 0; i-- {
		if err := RestoreNode(p.Grants[i]); err != nil {
			errs = append(errs, err)
		}
	}
	p.Grants = nil
	for i := len(p.Bound) - 1; i >= 0; i-- {
		if err := h.unbindVFIO(p.Bound[i]); err != nil {
			errs = append(errs, err)
		}
	}
	p.Bound = nil
	for i := len(p.Made) - 1; i >= 0; i-- {
		if err := h.removeMdev(p.Made[i].UUID); err != nil {
			errs = append(errs, err)
		}
	}
	p.Made = nil
	return errors.Join(errs...)
}

func (h *Host) createMdev(m *MdevDev) error {
	create := h.sys("bus/pci/devices", m.Parent, "mdev_supported_types", m.Type, "create")
	err := h.write(create, m.UUID)
	switch {
	case err == nil:
	case errors.Is(err, syscall.EEXIST):
		// Left by an earlier start of this VM (see resolveMdev).
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EBUSY):
		return errcode.Wrap(errcode.DeviceBusy, err, "create mdev of type %s on %s", m.Type, m.Parent)
	default:
		return errcode.Wrap(errcode.Internal, err, "create mdev of type %s on %s", m.Type, m.Parent)
	}
	if _, err := os.Stat(h.sys("bus/mdev/devices", m.UUID)); err != nil {
		return errcode.Wrap(errcode.Internal, err, "mdev %s missing after create", m.UUID)
	}
	return nil
}

func (h *Host) removeMdev(id string) error {
	rm := h.sys("bus/mdev/devices", id, "remove")
	if _, err := os.Stat(rm); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := h.write(rm, "1"); err != nil && !errors.Is(err, syscall.ENODEV) {
		return fmt.Errorf("remove mdev %s: %w", id, err)
	}
	return nil
}

// bindVFIO binds an unbound function to vfio-pci the way the kernel
// documents: driver_override names the driver, drivers_probe binds.
func (h *Host) bindVFIO(addr string) error {
	dir := h.sys("bus/pci/devices", addr)
	if drv := linkBase(filepath.Join(dir, "driver")); drv != "" {
		if drv == "vfio-pci" {
			return nil
		}
		return errcode.New(errcode.DeviceBusy, "pci device %s was bound to %s meanwhile", addr, drv)
	}
	if err := h.write(filepath.Join(dir, "driver_override"), "vfio-pci"); err != nil {
		return errcode.Wrap(errcode.Internal, err, "pci device %s: set driver_override", addr)
	}
	if err := h.write(h.sys("bus/pci/drivers_probe"), addr); err != nil {
		return errcode.Wrap(errcode.Internal, err, "pci device %s: probe", addr)
	}
	if drv := linkBase(filepath.Join(dir, "driver")); drv != "vfio-pci" {
		return errcode.New(errcode.IOMMUUnavailable, "pci device %s did not bind to vfio-pci (driver %q)", addr, drv)
	}
	return nil
}

// unbindVFIO undoes bindVFIO: the function goes back to no driver.
func (h *Host) unbindVFIO(addr string) error {
	dir := h.sys("bus/pci/devices", addr)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	var errs []error
	if linkBase(filepath.Join(dir, "driver")) == "vfio-pci" {
		if err := h.write(h.sys("bus/pci/drivers/vfio-pci/unbind"), addr); err != nil {
			errs = append(errs, fmt.Errorf("pci device %s: unbind: %w", addr, err))
		}
	}
	if err := h.write(filepath.Join(dir, "driver_override"), "\n"); err != nil {
		errs = append(errs, fmt.Errorf("pci device %s: clear driver_override: %w", addr, err))
	}
	return errors.Join(errs...)
}

// GrantNode gives a device node to the QEMU user (mode 0600) and returns
// its former owner and mode for RestoreNode. A node that already belongs
// to that user (a grant never restored: the agent died) is recorded as
// root's, mode 0600, the kernel's default for VFIO group nodes.
func GrantNode(path string, qemu Owner) (Grant, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Grant{}, errcode.Wrap(errcode.IOMMUUnavailable, err, "vfio group node %s", path)
		}
		return Grant{}, errcode.Wrap(errcode.Internal, err, "vfio group node %s", path)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return Grant{}, errcode.New(errcode.Internal, "stat %s: no owner", path)
	}
	g := Grant{Path: path, UID: int(st.Uid), GID: int(st.Gid), Mode: uint32(fi.Mode().Perm())}
	if g.UID == qemu.UID {
		g.UID, g.GID, g.Mode = 0, 0, 0o600
	}
	if err := os.Lchown(path, qemu.UID, qemu.GID); err != nil {
		return Grant{}, errcode.Wrap(errcode.Internal, err, "give %s to the qemu user", path)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		os.Lchown(path, g.UID, g.GID)
		return Grant{}, errcode.Wrap(errcode.Internal, err, "chmod %s", path)
	}
	return g, nil
}

// RestoreNode puts back the owner and mode GrantNode recorded. A node that
// is gone (its group went away with its device) needs nothing.
func RestoreNode(g Grant) error {
	if err := os.Lchown(g.Path, g.UID, g.GID); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("restore owner of %s: %w", g.Path, err)
	}
	if err := os.Chmod(g.Path, fs.FileMode(g.Mode)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("restore mode of %s: %w", g.Path, err)
	}
	return nil
}

// MemlockBytes is the RLIMIT_MEMLOCK a QEMU with VFIO devices needs: VFIO
// pins all guest RAM for DMA, plus room for QEMU's own pinned pages (1
// GiB, the margin libvirt uses). An unprivileged QEMU cannot raise its
// limit, so the engine sets it before QEMU starts.
func MemlockBytes(memoryMB int) uint64 {
	return uint64(memoryMB)<<20 + 1<<30
}
