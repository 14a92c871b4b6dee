package errcode

import (
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"testing"
)

// A write of the agent's own state that fails on a full file system is
// disk_full with the path in the message, however it was wrapped.
func TestFileSystemFull(t *testing.T) {
	full := &fs.PathError{Op: "write", Path: "/var/lib/otherix/journal/task-1.json.tmp-1", Err: syscall.ENOSPC}
	quota := &os.LinkError{Op: "rename", Old: "/a", New: "/b", Err: syscall.EDQUOT}
	for _, tc := range []struct {
		name string
		err  error
		want Code
	}{
		{"bare", full, DiskFull},
		{"quota", quota, DiskFull},
		{"wrapped", fmt.Errorf("journal: write task-1: %w", full), DiskFull},
		{"coded internal", Wrap(Internal, full, "persist vm"), DiskFull},
		{"internal twice", Wrap(Internal, Wrap(Internal, full, "persist"), "queue task"), DiskFull},
		{"raw errno (inotify's watch limit)", fmt.Errorf("inotify: %w", syscall.ENOSPC), Internal},
		{"other file error", &fs.PathError{Op: "write", Path: "/x", Err: syscall.EIO}, Internal},
		{"coded otherwise", Wrap(Conflict, full, "x"), Conflict},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Of(tc.err); got != tc.want {
				t.Fatalf("Of(%v) = %s, want %s", tc.err, got, tc.want)
			}
		})
	}
	e := Wrap(Internal, Wrap(Internal, full, "persist"), "queue task")
	if want := "queue task: persist: write /var/lib/otherix/journal/task-1.json.tmp-1: no space left on device"; e.Message != want {
		t.Errorf("message %q, want %q", e.Message, want)
	}
}
