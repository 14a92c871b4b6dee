package systemd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// MemoryCgroup is the memory cgroup of a process: the directory whose
// counters say how often the kernel's OOM killer struck in it (cgroup v2
// memory.events, v1 memory.oom_control, field oom_kill).
type MemoryCgroup struct {
	Dir string // e.g. /sys/fs/cgroup/otherix.slice/otherix-vm-<id>.scope
	V2  bool
}

// MemoryCgroupOf finds the memory cgroup of pid from /proc/<pid>/cgroup:
// the v2 one when its memory controller is there, else v1's. root is
// the cgroup file system's mount point (/sys/fs/cgroup).
func MemoryCgroupOf(procRoot, root string, pid int) (MemoryCgroup, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return MemoryCgroup{}, err
	}
	var v1, v2 string
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			v2 = parts[2]
		case containsField(parts[1], "memory"):
			v1 = parts[2]
		}
	}
	if v2 != "" {
		// Pure v2 mounts at root; hybrid systems mount it at root/unified,
		// where the memory controller is never enabled.
		dir := filepath.Join(root, filepath.Clean("/"+v2))
		if _, err := os.Stat(filepath.Join(dir, "memory.events")); err == nil {
			return MemoryCgroup{Dir: dir, V2: true}, nil
		}
	}
	if v1 != "" {
		dir := filepath.Join(root, "memory", filepath.Clean("/"+v1))
		if _, err := os.Stat(filepath.Join(dir, "memory.oom_control")); err == nil {
			return MemoryCgroup{Dir: dir}, nil
		}
	}
	return MemoryCgroup{}, fmt.Errorf("pid %d: no memory cgroup with OOM counters", pid)
}

func containsField(list, want string) bool {
	for _, f := range strings.Split(list, ",") {
		if f == want {
			return true
		}
	}
	return false
}

// OOMKills reads how many processes the OOM killer killed in the cgroup.
func (c MemoryCgroup) OOMKills() (uint64, error) {
	name := "memory.oom_control"
	if c.V2 {
		name = "memory.events"
	}
	b, err := os.ReadFile(filepath.Join(c.Dir, name))
	if err != nil {
		return 0, err
	}
	return parseOOMKill(b)
}

// parseOOMKill returns the oom_kill field of memory.events (v2) or
// memory.oom_control (v1): lines of "key value".
func parseOOMKill(b []byte) (uint64, error) {
	s := bufio.NewScanner(bytes.NewReader(b))
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), " ")
		if ok && k == "oom_kill" {
			return strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, errors.New("no oom_kill field")
}

// OOMWatch follows a memory cgroup's OOM kills while it exists, so that
// a kill is known even once the cgroup is gone (systemd removes an empty
// scope's cgroup as soon as its last process exited, maybe before the
// agent asks). On cgroup v2 the kernel signals every change of
// memory.events to inotify; v1 has no such signal and is only read when
// asked.
type OOMWatch struct {
	cg MemoryCgroup

	mu    sync.Mutex
	kills uint64 // the highest count seen
	ifd   int    // inotify descriptor while following, else -1
	wd    int
	done  chan struct{}
	// seen gets a token whenever the count grew (tests wait on it).
	seen chan struct{}
}

// WatchOOM starts following cg's OOM kills.
func WatchOOM(cg MemoryCgroup) *OOMWatch {
	w := &OOMWatch{cg: cg, ifd: -1, done: make(chan struct{}), seen: make(chan struct{}, 1)}
	w.refresh()
	if cg.V2 {
		fd, err := unix.InotifyInit1(unix.IN_CLOEXEC)
		if err == nil {
			wd, err := unix.InotifyAddWatch(fd, filepath.Join(cg.Dir, "memory.events"), unix.IN_MODIFY)
			if err == nil {
				w.ifd, w.wd = fd, wd
				w.refresh() // a kill between the first read and the watch
				go w.follow(fd)
				return w
			}
			unix.Close(fd)
		}
	}
	close(w.done)
	return w
}

func (w *OOMWatch) refresh() {
	n, err := w.cg.OOMKills()
	if err != nil {
		return
	}
	w.mu.Lock()
	grew := n > w.kills
	w.kills = max(w.kills, n)
	w.mu.Unlock()
	if grew {
		select {
		case w.seen <- struct{}{}:
		default:
		}
	}
}

// follow reads memory.events at each change until the watch ends: its
// file is removed with the cgroup, or Close removes the watch (both
// deliver IN_IGNORED).
func (w *OOMWatch) follow(fd int) {
	defer func() {
		w.mu.Lock()
		w.ifd = -1
		unix.Close(fd)
		w.mu.Unlock()
		close(w.done)
	}()
	buf := make([]byte, 4096)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || n <= 0 {
			return
		}
		w.refresh()
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			mask := binary.NativeEndian.Uint32(buf[off+4:])
			if mask&unix.IN_IGNORED != 0 {
				return
			}
			off += unix.SizeofInotifyEvent + int(binary.NativeEndian.Uint32(buf[off+12:]))
		}
	}
}

// Kills returns the OOM kills in the cgroup: read now when it still
// exists, else the last count seen.
func (w *OOMWatch) Kills() uint64 {
	w.refresh()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.kills
}

// Close stops following.
func (w *OOMWatch) Close() {
	w.mu.Lock()
	if w.ifd >= 0 {
		unix.InotifyRmWatch(w.ifd, uint32(w.wd)) // wakes follow with IN_IGNORED
	}
	w.mu.Unlock()
	<-w.done
}
