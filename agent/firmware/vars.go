package firmware

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// PrepareVars gives a VM booting e its own UEFI variable store at dst (in
// the VM's folder: it is deleted with the VM): a sparse copy of e's
// template, made only if dst does not exist, so that the variables (boot
// entries, enrolled keys) persist across stop/start. An existing store of
// another size than the template (another firmware build) is refused:
// ResetVars replaces it. For bios it does nothing.
//
// The copy skips the template's holes (SEEK_DATA/SEEK_HOLE) and its
// all-zero blocks: AAVMF's 64 MiB template is all zeros and costs no disk.
func PrepareVars(e *Entry, dst string) error {
	if !e.NeedsVars() {
		return nil
	}
	fi, err := os.Stat(dst)
	if err == nil {
		tfi, err := os.Stat(e.VarsTemplate)
		if err != nil {
			return errcode.Wrap(errcode.Internal, err, "firmware %s: vars template", e)
		}
		if fi.Size() != tfi.Size() {
			return errcode.New(errcode.Conflict, "firmware %s: the vm's variable store %s is %d bytes, the template %d: reset it",
				e, dst, fi.Size(), tfi.Size())
		}
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return errcode.Wrap(errcode.Internal, err, "firmware %s: variable store", e)
	}
	return ResetVars(e, dst)
}

// ResetVars replaces the VM's variable store at dst with a fresh copy of
// e's template (atomically: a crash leaves the old store or the new one).
func ResetVars(e *Entry, dst string) error {
	if !e.NeedsVars() {
		return nil
	}
	if err := copySparse(e.VarsTemplate, dst, 0o600); err != nil {
		return errcode.Wrap(errcode.Internal, err, "firmware %s: copy the vars template", e)
	}
	return nil
}

// copyBlock is the unit in which zero blocks are skipped. Filesystems
// allocate in 4 KiB blocks.
const copyBlock = 64 << 10

// copySparse copies src to dst, writing only data that is not zero, via a
// temporary file renamed into place.
func copySparse(src, dst string, perm os.FileMode) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", src)
	}
	size := fi.Size()
	dir := filepath.Dir(dst)
	out, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			out.Close()
			os.Remove(out.Name())
		}
	}()
	if err := copyData(in, out, size); err != nil {
		return err
	}
	if err := out.Truncate(size); err != nil {
		return err
	}
	if err := out.Chmod(perm); err != nil {
		return err
	}
	if err := out.Sync(); err != nil {
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	if err := os.Rename(out.Name(), dst); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// copyData copies the data regions of in (all of it where the filesystem
// cannot tell holes) to the same offsets of out, skipping zero blocks.
func copyData(in, out *os.File, size int64) error {
	fd := int(in.Fd())
	buf := make([]byte, copyBlock)
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO):
			return nil // a hole up to the end
		case err != nil:
			data = off // no SEEK_DATA here: read everything
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil || hole > size {
			hole = size
		}
		for p := data; p < hole; {
			n, err := in.ReadAt(buf[:min(int64(len(buf)), hole-p)], p)
			if err != nil && (!errors.Is(err, io.EOF) || n == 0) {
				return fmt.Errorf("read at %d: %w", p, err)
			}
			if !allZero(buf[:n]) {
				if _, err := out.WriteAt(buf[:n], p); err != nil {
					return err
				}
			}
			p += int64(n)
		}
		off = hole
	}
	return nil
}

var zeroBlock [copyBlock]byte

func allZero(b []byte) bool { return bytes.Equal(b, zeroBlock[:len(b)]) }
