package agent

import (
	"fmt"
	"path/filepath"
	"sync"

	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/systemd"
)

// OOMTracker follows the OOM kills in each placed VM's memory cgroup
// (its scope's) from placement on, so that a QEMU the kernel killed at
// the VM's memory cap is reported as such: the crash reason says out of
// memory. It follows the counters while the cgroup exists (systemd may
// remove an empty scope's cgroup before the agent asks).
type OOMTracker struct {
	// ProcRoot and CgroupRoot default to /proc and /sys/fs/cgroup.
	ProcRoot, CgroupRoot string

	mu sync.Mutex
	vm map[string]*oomEntry // by uuid
}

type oomEntry struct {
	pid      int
	watch    *systemd.OOMWatch
	base     uint64 // kills already counted when it was placed
	capBytes uint64
}

// Track starts following the memory cgroup v.PID is in now, whose cap is
// capBytes (0: unknown), when it is the VM's own: named own (the scope's
// name). A QEMU left in a shared memory cgroup (cgroup v1 without a
// writable memory controller: systemd could not make the scope's) is not
// followed, or an OOM kill of anything there would be blamed on it.
func (t *OOMTracker) Track(v vm.View, own string, capBytes uint64) error {
	proc, root := t.ProcRoot, t.CgroupRoot
	if proc == "" {
		proc = "/proc"
	}
	if root == "" {
		root = "/sys/fs/cgroup"
	}
	cg, err := systemd.MemoryCgroupOf(proc, root, v.PID)
	if err != nil {
		return err
	}
	if filepath.Base(cg.Dir) != own {
		return fmt.Errorf("vm %s: qemu is in the memory cgroup %s, not its own %s", v.Spec.Name, cg.Dir, own)
	}
	w := systemd.WatchOOM(cg)
	e := &oomEntry{pid: v.PID, watch: w, base: w.Kills(), capBytes: capBytes}
	t.mu.Lock()
	if t.vm == nil {
		t.vm = map[string]*oomEntry{}
	}
	old := t.vm[v.Spec.UUID]
	t.vm[v.Spec.UUID] = e
	t.mu.Unlock()
	if old != nil {
		old.watch.Close()
	}
	return nil
}

// Cause explains the exit of v's QEMU (v.PID) when the OOM killer struck
// in its cgroup since it was placed; else "".
func (t *OOMTracker) Cause(v vm.View) string {
	t.mu.Lock()
	e := t.vm[v.Spec.UUID]
	t.mu.Unlock()
	if e == nil || e.pid != v.PID || e.watch.Kills() <= e.base {
		return ""
	}
	if e.capBytes == 0 {
		return "out of memory: the kernel's OOM killer ended it in its cgroup"
	}
	return fmt.Sprintf("out of memory: the kernel's OOM killer ended it at its memory cap (%d MiB)", e.capBytes>>20)
}

// Forget stops following v's cgroup.
func (t *OOMTracker) Forget(v vm.View) {
	t.mu.Lock()
	e := t.vm[v.Spec.UUID]
	delete(t.vm, v.Spec.UUID)
	t.mu.Unlock()
	if e != nil {
		e.watch.Close()
	}
}
