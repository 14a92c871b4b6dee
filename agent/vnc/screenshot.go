package vnc

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Owner is the user and group QEMU runs as.
type Owner struct {
	UID, GID int
}

// MaxScreenshot bounds the PNG Screenshot reads back.
const MaxScreenshot = 64 << 20

var pngMagic = []byte("\x89PNG\r\n\x1a\n")

// Screenshot returns a PNG of the VM's display: QMP screendump, format png
// (QEMU ≥ 7.1).
//
// QEMU writes the file itself, by path, as its unprivileged user, so the
// file is made for it: Screenshot creates dir/screendump-<random>.png
// (O_EXCL, no symlink followed), gives it to qemu (nil: QEMU runs as the
// agent's user), has QEMU write it, reads it back through the descriptor
// it created (so nothing QEMU's user does to the path afterwards matters)
// and removes it. dir must be a directory the QEMU user can traverse and
// that only root can write to (e.g. a 0711 root-owned directory under the
// runtime dir); the random name keeps other QEMUs, which share the user,
// from finding the file in the moment it exists.
//
// Why not a descriptor: screendump opens its filename with
// O_WRONLY|O_CREAT|O_TRUNC. Through an fd set (/dev/fdset/N) QEMU 7.2
// dups the set's descriptor, resets its status flags (O_APPEND goes) and
// truncates, but the shared offset stays where the last screendump left
// it, so every shot after the first lands behind a hole of zeros; a pipe
// cannot be truncated at all.
func Screenshot(ctx context.Context, exec ExecFunc, dir string, qemu *Owner) ([]byte, error) {
	if !filepath.IsAbs(dir) {
		return nil, errcode.New(errcode.ValidationFailed, "screenshot dir %q is not absolute", dir)
	}
	var rnd [12]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "screendump-"+hex.EncodeToString(rnd[:])+".png")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("vnc: screenshot file: %w", err)
	}
	defer f.Close()
	defer os.Remove(path)
	if qemu != nil {
		if err := f.Chown(qemu.UID, qemu.GID); err != nil {
			return nil, fmt.Errorf("vnc: screenshot file: %w", err)
		}
	}
	if err := exec(ctx, "screendump", map[string]string{"filename": path, "format": "png"}); err != nil {
		return nil, fmt.Errorf("vnc: screendump: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Size() > MaxScreenshot {
		return nil, fmt.Errorf("vnc: screendump wrote %d bytes, more than %d", fi.Size(), MaxScreenshot)
	}
	b := make([]byte, fi.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return nil, fmt.Errorf("vnc: read screendump: %w", err)
	}
	if !bytes.HasPrefix(b, pngMagic) {
		return nil, fmt.Errorf("vnc: screendump wrote %d bytes that are not a PNG", len(b))
	}
	return b, nil
}
