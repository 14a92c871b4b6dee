package imagecache

import (
	"errors"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/internal/atomicfile"
)

// fsSpace returns the size of dir's file system and the bytes available.
func fsSpace(dir string) (total, free int64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, 0, err
	}
	return int64(st.Blocks) * int64(st.Bsize), int64(st.Bavail) * int64(st.Bsize), nil
}

// allocated returns the bytes a file occupies on disk.
func allocated(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// fsyncDir makes a directory's entries (creations, renames, removals)
// durable.
func fsyncDir(dir string) error { return atomicfile.SyncDir(dir) }

// writeFileSync writes data to path atomically and durably (a stray
// temporary file left by a crash is swept by loadIndex).
func writeFileSync(path string, data []byte, mode os.FileMode) error {
	return atomicfile.Write(path, data, mode)
}

// isNoSpace reports whether err means the file system is full.
func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}
