// Package nspawntest boots a Debian rootfs under systemd-nspawn with
// systemd as its PID 1, for tests that need a real service manager: the
// container is reached with nsenter (systemctl, journalctl, any command)
// and through PID 1's D-Bus API, and waits are driven by PID 1's signals.
//
// It needs root and the Debian packages systemd-container, debootstrap and
// util-linux (RequireTools fails the test, naming them, when they are
// missing). The rootfs is built once per recipe and cached under
// ${OTHERIX_TEST_CACHE:-/var/cache/otherix-test}/nspawn-rootfs; each
// container writes to a tmpfs overlay, so the cached tree stays clean.
package nspawntest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// RequireTools fails the test unless it runs as root with the tools the
// container needs.
func RequireTools(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Fatal("the container test needs root (systemd-nspawn, nsenter)")
	}
	for tool, pkg := range map[string]string{
		"systemd-nspawn": "systemd-container",
		"debootstrap":    "debootstrap",
		"nsenter":        "util-linux",
	} {
		if _, err := exec.LookPath(tool); err != nil {
			tb.Fatalf("%s not found: install the Debian package %s (apt-get install -y %s); CI must install it", tool, pkg, pkg)
		}
	}
}

// Rootfs returns the cached rootfs made by recipe ("debootstrap ARGS...
// SUITE", run with the target folder appended), building it first when it
// is missing or was made by another recipe. A lock file serialises
// builders; the tree is built beside its final name and renamed into place,
// so a half-built tree is never used.
func Rootfs(ctx context.Context, tb testing.TB, recipe string) string {
	tb.Helper()
	fields := strings.Fields(recipe)
	if len(fields) < 2 || fields[0] != "debootstrap" {
		tb.Fatalf("rootfs recipe %q: want debootstrap ARGS... SUITE", recipe)
	}
	dir := os.Getenv("OTHERIX_TEST_CACHE")
	if dir == "" {
		dir = "/var/cache/otherix-test"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "nspawn-rootfs.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		tb.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		tb.Fatalf("lock rootfs cache: %v", err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)

	root := filepath.Join(dir, "nspawn-rootfs")
	stampFile := ".otherix-rootfs"
	if stamp, err := os.ReadFile(filepath.Join(root, stampFile)); err == nil && string(stamp) == recipe+"\n" {
		return root
	}
	// Leftovers of an interrupted build, and an outdated tree.
	stale, _ := filepath.Glob(filepath.Join(dir, "nspawn-rootfs.tmp-*"))
	if _, err := os.Lstat(root); err == nil {
		old := filepath.Join(dir, fmt.Sprintf("nspawn-rootfs.tmp-old%d", os.Getpid()))
		if err := os.Rename(root, old); err != nil {
			tb.Fatal(err)
		}
		stale = append(stale, old)
	}
	for _, s := range stale {
		removeTree(tb, s)
	}

	start := time.Now()
	tmp, err := os.MkdirTemp(dir, "nspawn-rootfs.tmp-")
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		tb.Fatal(err)
	}
	args := append(fields[1:], tmp)
	tb.Logf("building the container rootfs once: debootstrap %s", strings.Join(args, " "))
	out, err := exec.CommandContext(ctx, "debootstrap", args...).CombinedOutput()
	if err != nil {
		removeTree(tb, tmp)
		tb.Fatalf("debootstrap: %v\n%s", err, tail(out, 4000))
	}
	if err := os.WriteFile(filepath.Join(tmp, stampFile), []byte(recipe+"\n"), 0o644); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp, root); err != nil {
		tb.Fatal(err)
	}
	tb.Logf("rootfs built in %v: %s", time.Since(start).Round(time.Second), root)
	return root
}

// removeTree unmounts whatever an interrupted debootstrap left mounted
// below path (proc, sys), then deletes it.
func removeTree(tb testing.TB, path string) {
	tb.Helper()
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		var mounts []string
		for line := range strings.SplitSeq(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], path+"/") {
				mounts = append(mounts, f[4])
			}
		}
		slices.Sort(mounts)
		for _, m := range slices.Backward(mounts) {
			_ = unix.Unmount(m, unix.MNT_DETACH)
		}
	}
	if err := os.RemoveAll(path); err != nil {
		tb.Errorf("remove %s: %v", path, err)
	}
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
