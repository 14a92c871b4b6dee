package vm

import (
	"context"
	"fmt"
	"os"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/qmp"
)

// HotDisk is a disk attached while the VM ran: on one of the spare PCIe
// root ports, with its nodes and descriptor set. At the next start it is
// an ordinary disk of the spec.
type HotDisk struct {
	Path  string `json:"path"`
	Port  int    `json:"port"`
	FDSet int    `json:"fdset"`
}

func hotNode(port int) string { return fmt.Sprintf("hp%d-disk", port) }

// fdMonitor is a monitor that can pass descriptors (QMP add-fd).
type fdMonitor interface {
	ExecuteWithFiles(ctx context.Context, cmd string, args any, files []*os.File, out any) error
}

// addFDSet hands files to QEMU as descriptor set id.
func addFDSet(ctx context.Context, mon Monitor, id int, files []*os.File) error {
	fm, ok := mon.(fdMonitor)
	if !ok {
		return errcode.New(errcode.Internal, "qmp connection cannot pass descriptors")
	}
	for _, f := range files {
		if err := fm.ExecuteWithFiles(ctx, "add-fd", map[string]any{"fdset-id": id}, []*os.File{f}, nil); err != nil {
			return errcode.Wrap(errcode.Internal, err, "add-fd")
		}
	}
	return nil
}

func openDisk(path string, readOnly bool) ([]*os.File, error) {
	kinds := []FileKind{FileWrite, FileRead}
	if readOnly {
		kinds = []FileKind{FileRead}
	}
	var files []*os.File
	for _, k := range kinds {
		f, err := os.OpenFile(path, k.OpenFlags()|syscall.O_CLOEXEC|syscall.O_NOFOLLOW, 0)
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, errcode.Wrap(errcode.ValidationFailed, err, "open disk")
		}
		files = append(files, f)
	}
	return files, nil
}

// AttachDisk adds a disk to a VM. A running VM gets it at once on a spare
// PCIe root port (blockdev-add + device_add, the file passed as a
// descriptor); a stopped one at its next start.
func (e *Engine) AttachDisk(ctx context.Context, name string, d Disk) (View, error) {
	return e.op(ctx, name, "disk_attach", func(m *machine) error { return m.attachDisk(ctx, d) })
}

func (m *machine) attachDisk(ctx context.Context, d Disk) error {
	m.mu.Lock()
	spec := m.st.Spec
	p := m.proc
	hot := append([]HotDisk(nil), m.st.Hot...)
	m.mu.Unlock()
	for _, x := range spec.Disks {
		if x.Path == d.Path {
			return errcode.New(errcode.Conflict, "vm %q already has disk %s", m.name, d.Path)
		}
	}
	d.BootIndex = 0
	next := spec
	next.Disks = append(append([]Disk(nil), spec.Disks...), d)
	if err := next.Validate(); err != nil {
		return err
	}
	if p == nil {
		m.mu.Lock()
		defer m.mu.Unlock()
		m.st.Spec = next
		return m.persistLocked()
	}
	used := map[int]bool{}
	for _, h := range hot {
		used[h.Port] = true
	}
	port := -1
	for i := 0; i < HotplugPorts; i++ {
		if !used[i] {
			port = i
			break
		}
	}
	if port < 0 {
		return errcode.New(errcode.Conflict, "vm %q has no free hot-plug port (%d in use)", m.name, HotplugPorts)
	}
	files, err := openDisk(d.Path, d.ReadOnly)
	if err != nil {
		return err
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	set := 100 + port
	node := hotNode(port)
	if err := addFDSet(ctx, p.mon, set, files); err != nil {
		return err
	}
	undo := func() {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		p.mon.Execute(c, "blockdev-del", map[string]any{"node-name": node}, nil)
		p.mon.Execute(c, "blockdev-del", map[string]any{"node-name": node + "-file"}, nil)
		p.mon.Execute(c, "remove-fd", map[string]any{"fdset-id": set}, nil)
	}
	steps := []struct {
		cmd  string
		args map[string]any
	}{
		{"blockdev-add", map[string]any{"driver": "file", "node-name": node + "-file", "filename": fmt.Sprintf("/dev/fdset/%d", set), "read-only": d.ReadOnly}},
		{"blockdev-add", map[string]any{"driver": d.Format, "node-name": node, "file": node + "-file", "read-only": d.ReadOnly}},
		{"device_add", map[string]any{"driver": "virtio-blk-pci", "id": node + "-dev", "drive": node, "bus": fmt.Sprintf("hp%d", port),
			"werror": "enospc", "rerror": "report"}},
	}
	for _, s := range steps {
		if err := p.mon.Execute(ctx, s.cmd, s.args, nil); err != nil {
			undo()
			return errcode.Wrap(errcode.Internal, err, "%s", s.cmd)
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.st.Spec.Disks = next.Disks
	if m.st.Next != nil {
		m.st.Next.Disks = append(m.st.Next.Disks, d)
	}
	m.st.Hot = append(m.st.Hot, HotDisk{Path: d.Path, Port: port, FDSet: set})
	return m.persistLocked()
}

// DetachDisk removes a disk from a VM. A disk attached while the VM runs
// is unplugged at once (device_del, then DEVICE_DELETED once the guest let
// go of it); a disk the VM booted with leaves at the next start.
func (e *Engine) DetachDisk(ctx context.Context, name, path string) (View, error) {
	return e.op(ctx, name, "disk_detach", func(m *machine) error { return m.detachDisk(ctx, path) })
}

func (m *machine) detachDisk(ctx context.Context, path string) error {
	m.mu.Lock()
	spec := m.st.Spec
	p := m.proc
	var hot *HotDisk
	for i := range m.st.Hot {
		if m.st.Hot[i].Path == path {
			h := m.st.Hot[i]
			hot = &h
		}
	}
	m.mu.Unlock()
	idx := -1
	for i, d := range spec.Disks {
		if d.Path == path {
			idx = i
		}
	}
	if idx <= 0 {
		return errcode.New(errcode.NotFound, "vm %q has no detachable disk %s", m.name, path)
	}
	without := func(ds []Disk) []Disk {
		var out []Disk
		for _, d := range ds {
			if d.Path != path {
				out = append(out, d)
			}
		}
		return out
	}
	if p != nil {
		if hot == nil {
			m.mu.Lock()
			defer m.mu.Unlock()
			next := spec
			if m.st.Next != nil {
				next = *m.st.Next
			}
			next.Disks = without(next.Disks)
			m.st.Next = &next
			return m.persistLocked()
		}
		node := hotNode(hot.Port)
		evs, cancel := p.mon.Subscribe(16)
		defer cancel()
		if err := p.mon.Execute(ctx, "device_del", map[string]any{"id": node + "-dev"}, nil); err != nil {
			return errcode.Wrap(errcode.Internal, err, "device_del")
		}
		wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
		defer wcancel()
		for {
			ev, err := qmp.WaitEvent(wctx, evs, "DEVICE_DELETED")
			if err != nil {
				return errcode.Wrap(errcode.Conflict, err, "the guest did not release disk %s", path)
			}
			if dev, _ := ev.Data["device"].(string); dev == node+"-dev" {
				break
			}
		}
		for _, c := range []struct {
			cmd  string
			args map[string]any
		}{
			{"blockdev-del", map[string]any{"node-name": node}},
			{"blockdev-del", map[string]any{"node-name": node + "-file"}},
			{"remove-fd", map[string]any{"fdset-id": hot.FDSet}},
		} {
			if err := p.mon.Execute(ctx, c.cmd, c.args, nil); err != nil {
				m.log.Warn("hot-unplug cleanup", zap.String("cmd", c.cmd), zap.Error(err))
			}
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.st.Spec.Disks = without(m.st.Spec.Disks)
	if m.st.Next != nil {
		m.st.Next.Disks = without(m.st.Next.Disks)
	}
	var keep []HotDisk
	for _, h := range m.st.Hot {
		if h.Path != path {
			keep = append(keep, h)
		}
	}
	m.st.Hot = keep
	return m.persistLocked()
}

// ChangeMedium inserts path into CD-ROM index of a running VM (an empty
// path ejects), and records it in the spec.
func (e *Engine) ChangeMedium(ctx context.Context, name string, index int, path string) (View, error) {
	return e.op(ctx, name, "cdrom_change", func(m *machine) error { return m.changeMedium(ctx, index, path) })
}

func (m *machine) changeMedium(ctx context.Context, index int, path string) error {
	m.mu.Lock()
	spec := m.st.Spec
	p := m.proc
	serial := m.st.MediumSeq + 1
	m.mu.Unlock()
	if index < 0 || index >= len(spec.CDROMs) {
		return errcode.New(errcode.NotFound, "vm %q has no CD-ROM %d", m.name, index)
	}
	if path != "" {
		if err := checkPath(path); err != nil {
			return errcode.Wrap(errcode.ValidationFailed, err, "medium")
		}
	}
	dev := fmt.Sprintf("cd%d-dev", index)
	if p != nil {
		if path == "" {
			if err := p.mon.Execute(ctx, "eject", map[string]any{"id": dev, "force": true}, nil); err != nil {
				return errcode.Wrap(errcode.Internal, err, "eject")
			}
		} else {
			files, err := openDisk(path, true)
			if err != nil {
				return err
			}
			defer files[0].Close()
			set := 200 + serial
			if err := addFDSet(ctx, p.mon, set, files); err != nil {
				return err
			}
			if err := p.mon.Execute(ctx, "blockdev-change-medium", map[string]any{"id": dev, "filename": fmt.Sprintf("/dev/fdset/%d", set),
				"format": "raw", "read-only-mode": "read-only"}, nil); err != nil {
				return errcode.Wrap(errcode.Internal, err, "blockdev-change-medium")
			}
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.st.MediumSeq = serial
	if path != "" {
		m.st.Spec.CDROMs[index].Path = path
	}
	return m.persistLocked()
}
