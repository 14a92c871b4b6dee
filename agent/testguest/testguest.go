// Package testguest gives tests the real bootable test guest and a way to
// follow its serial console.
//
// The guest is built by testdata/guest/build.sh (Debian's cloud kernel and a
// busybox initramfs on a small MBR/FAT disk that boots with SeaBIOS or OVMF)
// and cached under $OTHERIX_TEST_CACHE (default /var/cache/otherix-test).
// Its /init prints marker lines on ttyS0, each starting with [Prefix]:
//
//	OTHERIX-GUEST booted arch=amd64 kernel=<uname -r> boot=<disk|cdrom>
//	OTHERIX-GUEST disks <name>:<size-bytes>:<ro 0|1> ...
//	OTHERIX-GUEST cidata label=cidata dev=<name>       (or: cidata none)
//	OTHERIX-GUEST cidata files=<sorted,comma,separated>
//	OTHERIX-GUEST cidata instance-id=<id>
//	OTHERIX-GUEST cidata local-hostname=<name>
//	OTHERIX-GUEST cidata user-data-sha256=<hex>        (if user-data exists)
//	OTHERIX-GUEST cidata network-config-sha256=<hex>   (if network-config exists)
//	OTHERIX-GUEST ip <ethN> <ipv4|none>                (per NIC; none without NIC)
//	OTHERIX-GUEST ready
//	OTHERIX-GUEST run-exit <n> <code>                  (per "#otherix-run: cmd" line of user-data)
//	OTHERIX-GUEST tick <n>                             (every second, forever)
//
// On the ACPI power button (QMP system_powerdown) it prints
// "OTHERIX-GUEST powering off" and powers off, or, if user-data has a line
// "#otherix-guest: ignore-acpi", prints "OTHERIX-GUEST ignoring power button"
// and goes on. After system_reset it boots again.
//
// Attach the seed ISO as virtio-scsi scsi-cd (the cloud kernel has no AHCI)
// at SCSI target 0-7; disks may be virtio-blk, virtio-scsi or NVMe.
package testguest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// buildTimeout bounds one run of build.sh: a first run downloads about
// 28 MB of packages and may install host tools.
const buildTimeout = 10 * time.Minute

type buildResult struct {
	once sync.Once
	dir  string
	err  error
}

var (
	buildsMu sync.Mutex
	builds   = map[string]*buildResult{}
)

// Dir returns the folder holding the amd64 guest's guest.raw, guest.qcow2
// and build-info.txt, building it on first use in this process. It fails
// the test if the build fails or QEMU is missing; it never skips.
func Dir(tb testing.TB) string {
	tb.Helper()
	return dirFor(tb, "amd64")
}

// Image returns the path of the amd64 guest's raw disk (read-only: boot
// an overlay, see [Overlay]).
func Image(tb testing.TB) string {
	tb.Helper()
	return filepath.Join(Dir(tb), "guest.raw")
}

// QCOW2 returns the path of the amd64 guest's disk as qcow2 (read-only).
func QCOW2(tb testing.TB) string {
	tb.Helper()
	return filepath.Join(Dir(tb), "guest.qcow2")
}

// Overlay creates a qcow2 overlay backed by [QCOW2] in dir (tb.TempDir()
// if dir is empty) and returns its path: a disk the test may write.
func Overlay(tb testing.TB, dir string) string {
	tb.Helper()
	base := QCOW2(tb)
	if dir == "" {
		dir = tb.TempDir()
	}
	path := filepath.Join(dir, "overlay.qcow2")
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2",
		"-F", "qcow2", "-b", base, path).CombinedOutput()
	if err != nil {
		tb.Fatalf("testguest: qemu-img create overlay: %v: %s", err, out)
	}
	return path
}

func dirFor(tb testing.TB, arch string) string {
	tb.Helper()
	buildsMu.Lock()
	b := builds[arch]
	if b == nil {
		b = &buildResult{}
		builds[arch] = b
	}
	buildsMu.Unlock()
	b.once.Do(func() { b.dir, b.err = build(arch) })
	if b.err != nil {
		tb.Fatalf("testguest: %v", b.err)
	}
	return b.dir
}

var qemuBinary = map[string]string{
	"amd64": "qemu-system-x86_64",
	"arm64": "qemu-system-aarch64",
}

func build(arch string) (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	script := filepath.Join(root, "testdata", "guest", "build.sh")
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", script, "--arch", arch)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s --arch %s: %w\n%s", script, arch, err, tail(stderr.String(), 40))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	dir := strings.TrimSpace(lines[len(lines)-1])
	if _, err := os.Stat(filepath.Join(dir, "guest.raw")); err != nil {
		return "", fmt.Errorf("%s printed %q, not an image folder: %w\n%s", script, dir, err, tail(stderr.String(), 40))
	}
	if bin := qemuBinary[arch]; bin != "" {
		if _, err := exec.LookPath(bin); err != nil {
			return "", fmt.Errorf("the guest is built but cannot boot: %w", err)
		}
	}
	return dir, nil
}

// repoRoot walks up from the working directory (a package folder under go
// test), then from this source file, to the folder holding go.mod and
// testdata/guest/build.sh.
func repoRoot() (string, error) {
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		starts = append(starts, filepath.Dir(file))
	}
	for _, dir := range starts {
		for {
			if isRoot(dir) {
				return dir, nil
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	return "", errors.New("cannot find the repository root (go.mod with testdata/guest/build.sh) above the working directory")
}

func isRoot(dir string) bool {
	for _, p := range []string{"go.mod", "testdata/guest/build.sh"} {
		if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
			return false
		}
	}
	return true
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
