package vm

import (
	"hash/fnv"
	"syscall"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// UIDRange is a block of user and group ids with no user behind them, one
// of which each VM's QEMU (and swtpm) runs as. With one shared user, one
// VM's QEMU could open another's disks through /proc/<pid>/fd, signal it
// or read its memory: a process may do that to any process of its own
// uid. A uid of its own, which owns no file, shuts all of that.
type UIDRange struct {
	First uint32
	Count uint32
}

// Contains reports whether uid is in the range.
func (r UIDRange) Contains(uid uint32) bool {
	return uid >= r.First && uid-r.First < r.Count
}

// assignUIDLocked gives m a uid of e.cfg.UIDs no other VM has: the one
// its uuid hashes to, or the next free one. Call with e.mu held; the
// caller persists m's state.
func (e *Engine) assignUIDLocked(m *machine) error {
	r := e.cfg.UIDs
	if r == nil || r.Count == 0 {
		return nil
	}
	if r.Contains(m.st.UID) {
		return nil
	}
	used := map[uint32]bool{}
	for _, o := range e.vms {
		if o != m {
			used[o.st.UID] = true
		}
	}
	h := fnv.New32a()
	h.Write([]byte(m.st.Spec.UUID))
	start := h.Sum32() % r.Count
	for i := uint32(0); i < r.Count; i++ {
		uid := r.First + (start+i)%r.Count
		if !used[uid] {
			m.st.UID = uid
			return nil
		}
	}
	return errcode.New(errcode.Conflict, "all %d qemu uids of qemu.uid_range are taken", r.Count)
}

// cred is the credential m's QEMU and swtpm run as: the VM's own uid and
// gid with the supplementary groups of Config.Credential (kvm), or
// Config.Credential itself without a uid range.
func (m *machine) cred() *syscall.Credential {
	m.mu.Lock()
	uid := m.st.UID
	m.mu.Unlock()
	r := m.e.cfg.UIDs
	if r == nil || r.Count == 0 || !r.Contains(uid) {
		return m.e.cfg.Credential
	}
	c := &syscall.Credential{Uid: uid, Gid: uid}
	if base := m.e.cfg.Credential; base != nil {
		c.Groups = append([]uint32(nil), base.Groups...)
	}
	return c
}

// Credential returns the credential the named VM's QEMU runs as (nil: the
// agent's own), for files QEMU must write by path (screendump).
func (e *Engine) Credential(name string) (*syscall.Credential, error) {
	m, err := e.lookup(name)
	if err != nil {
		return nil, err
	}
	return m.cred(), nil
}

// ensureUID gives a VM defined before Config.UIDs was set (or outside the
// range since) a uid of the range, at its next start.
func (m *machine) ensureUID() error {
	r := m.e.cfg.UIDs
	if r == nil || r.Count == 0 {
		return nil
	}
	m.e.mu.Lock()
	defer m.e.mu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if r.Contains(m.st.UID) {
		return nil
	}
	if err := m.e.assignUIDLocked(m); err != nil {
		return err
	}
	if err := m.persistLocked(); err != nil {
		return errcode.Wrap(errcode.Internal, err, "persist uid")
	}
	return nil
}
