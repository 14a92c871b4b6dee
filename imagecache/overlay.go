package imagecache

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"time"
	"unicode"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/internal/errcode"
)

const maxDiskGiB = 64 << 10 // 64 TiB

// CreateOverlay makes dst a qcow2 overlay on the entry, sized diskGiB
// (0 = image size), and pins the entry for owner (a VM uuid). dst must be
// inside the pool's dir (else validation_failed) and must not exist
// (else conflict); missing parent directories are created. Undo-safe: on
// error nothing is left and no pin.
func (c *Cache) CreateOverlay(ctx context.Context, poolName, digest, dst string, diskGiB int, owner string) (err error) {
	p, err := c.pool(poolName)
	if err != nil {
		return err
	}
	if err := checkDigest(digest); err != nil {
		return err
	}
	if err := checkOwner(owner); err != nil {
		return err
	}
	if diskGiB < 0 || diskGiB > maxDiskGiB {
		return errcode.New(errcode.ValidationFailed, "disk size %d GiB out of range (0..%d)", diskGiB, maxDiskGiB)
	}
	path, missingDirs, err := p.resolveDst(dst)
	if err != nil {
		return err
	}
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()

	// Pin first: from here on, eviction leaves the entry alone.
	var rec record
	pinned := false
	p.mu.Lock()
	r, ok := p.entries[digest]
	if ok {
		rec = *r
	}
	switch size := int64(diskGiB) << 30; {
	case !ok:
		err = errcode.New(errcode.NotFound, "image %s not found in pool %q", digest, p.name)
	case diskGiB > 0 && size < r.VirtualSize:
		err = errcode.New(errcode.ValidationFailed, "disk size %d GiB is smaller than the image's virtual size (%s)", diskGiB, fmtBytes(r.VirtualSize))
	default:
		pinned = !slices.Contains(r.PinnedBy, owner)
		err = p.pin(digest, owner)
	}
	p.mu.Unlock()
	if err != nil {
		return err
	}
	if pinned {
		undo = append(undo, func() { c.unpin(p, digest, owner) })
	}

	for _, d := range missingDirs {
		switch mkErr := os.Mkdir(d, 0o755); {
		case mkErr == nil:
			undo = append(undo, func() { os.Remove(d) })
		case !errors.Is(mkErr, os.ErrExist):
			return errcode.Wrap(errcode.Internal, mkErr, "create directory for VM disk")
		}
	}
	// Claim dst atomically; qemu-img create then writes over the claim.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return errcode.New(errcode.Conflict, "VM disk %s already exists", path)
		}
		return errcode.Wrap(errcode.Internal, err, "create VM disk")
	}
	f.Close()
	undo = append(undo, func() { os.Remove(path) })

	var size int64
	if diskGiB > 0 {
		size = int64(diskGiB) << 30
	}
	if err = c.createOverlay(ctx, p.entryPath(digest), rec.Format, path, size); err != nil {
		return err
	}
	if err = fsyncDir(filepath.Dir(path)); err != nil {
		return errcode.Wrap(errcode.Internal, err, "create VM disk")
	}
	c.log.Info("overlay created", zap.String("op", "image_overlay"), zap.String("pool", p.name),
		zap.String("image_sha256", digest), zap.String("vm_uuid", owner), zap.Int("disk_gib", diskGiB))
	return nil
}

// Pin pins an existing entry for owner (a VM uuid, or any other owner
// string), as CreateOverlay does: the pin is kept in the entry's index
// record, so it survives restarts, and a pinned entry is never evicted.
// Pinning again for the same owner is not an error (one pin per owner).
// An entry that is gone (for instance evicted after Ensure returned it)
// is not_found: Ensure it again, then Pin.
func (c *Cache) Pin(poolName, digest, owner string) error {
	p, err := c.pool(poolName)
	if err != nil {
		return err
	}
	if err := checkDigest(digest); err != nil {
		return err
	}
	if err := checkOwner(owner); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.pin(digest, owner); err != nil {
		return err
	}
	c.log.Info("image pinned", zap.String("op", "image_pin"), zap.String("pool", p.name),
		zap.String("image_sha256", digest), zap.String("owner", owner))
	return nil
}

// Unpin drops owner's pin on the entry. Unpinning what is not pinned (or
// an entry already gone) is not an error.
func (c *Cache) Unpin(poolName, digest, owner string) error {
	p, err := c.pool(poolName)
	if err != nil {
		return err
	}
	if err := checkDigest(digest); err != nil {
		return err
	}
	return c.unpin(p, digest, owner)
}

// pin adds owner to the entry's pins (once) and marks it used: not_found
// when the entry is gone. p.mu held.
func (p *pool) pin(digest, owner string) error {
	return p.update(digest, func(r *record) {
		r.PinnedBy = append(r.PinnedBy, owner)
		r.LastUsed = time.Now().UTC()
	})
}

func (c *Cache) unpin(p *pool, digest, owner string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.entries[digest]
	if !ok || !slices.Contains(r.PinnedBy, owner) {
		return nil
	}
	return p.update(digest, func(r *record) {
		r.PinnedBy = slices.DeleteFunc(r.PinnedBy, func(s string) bool { return s == owner })
	})
}

func checkOwner(owner string) error {
	if owner == "" || len(owner) > 128 {
		return errcode.New(errcode.ValidationFailed, "invalid pin owner %q", truncate(owner, 40))
	}
	for _, r := range owner {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return errcode.New(errcode.ValidationFailed, "invalid pin owner %q", truncate(owner, 40))
		}
	}
	return nil
}

// resolveDst returns dst's real path (symlinks in its existing ancestors
// resolved) and the directories to create, outermost first. The result
// must lie inside the pool directory and outside images/.
func (p *pool) resolveDst(dst string) (string, []string, error) {
	if !filepath.IsAbs(dst) {
		return "", nil, errcode.New(errcode.ValidationFailed, "VM disk path %q is not absolute", dst)
	}
	clean := filepath.Clean(dst)
	base := filepath.Base(clean)
	var missing []string
	dir := filepath.Dir(clean)
	for {
		fi, err := os.Lstat(dir)
		if err == nil {
			if fi.Mode()&os.ModeSymlink == 0 && !fi.IsDir() {
				return "", nil, errcode.New(errcode.ValidationFailed, "VM disk path %q: %s is not a directory", dst, dir)
			}
			break
		}
		if !errors.Is(err, os.ErrNotExist) || dir == "/" {
			return "", nil, errcode.Wrap(errcode.ValidationFailed, err, "VM disk path %q", dst)
		}
		missing = append([]string{filepath.Base(dir)}, missing...)
		dir = filepath.Dir(dir)
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return "", nil, errcode.Wrap(errcode.ValidationFailed, err, "VM disk path %q", dst)
	}
	parent := real
	var dirs []string
	for _, m := range missing {
		parent = filepath.Join(parent, m)
		dirs = append(dirs, parent)
	}
	path := filepath.Join(parent, base)
	if path == p.dir || !within(path, p.dir) || within(path, p.images) {
		return "", nil, errcode.New(errcode.ValidationFailed, "VM disk path %q is outside pool %q's directory %s", dst, p.name, p.dir)
	}
	return path, dirs, nil
}
