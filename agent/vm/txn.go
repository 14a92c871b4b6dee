package vm

import (
	"context"
)

// Txn is a caller's exclusive hold on one VM (Engine.Do): its record and
// the engine ops run in it are one unit no other op on the VM interleaves
// with. A Txn is valid only inside its Do.
type Txn struct {
	m *machine
}

// Do runs fn as the VM's single owner, like any op: a VM already busy
// answers conflict. Use it when a change of the VM's record must be
// atomic with an engine op and with what the caller does around it (a
// CD-ROM image pinned before a medium change, recorded after). fn must
// not call the Engine's own per-VM methods for this VM (they would find
// it busy): it uses the Txn's.
func (e *Engine) Do(ctx context.Context, name, op string, fn func(t *Txn) error) (View, error) {
	return e.op(ctx, name, op, func(m *machine) error { return fn(&Txn{m: m}) })
}

// View is the VM's current view.
func (t *Txn) View() View { return t.m.view() }

// Record is a copy of the VM's record.
func (t *Txn) Record() Record {
	t.m.mu.Lock()
	defer t.m.mu.Unlock()
	return t.m.st.Record.clone()
}

// UpdateRecord changes the VM's record with fn and persists it.
func (t *Txn) UpdateRecord(fn func(*Record)) error { return t.m.updateRecord(fn) }

// UpdateAlloc is Engine.UpdateAlloc within the Txn.
func (t *Txn) UpdateAlloc(fn func(*Spec, *Alloc) error) error { return t.m.update(fn) }

// AttachDisk is Engine.AttachDisk within the Txn.
func (t *Txn) AttachDisk(ctx context.Context, d Disk) error { return t.m.attachDisk(ctx, d) }

// DetachDisk is Engine.DetachDisk within the Txn.
func (t *Txn) DetachDisk(ctx context.Context, path string) error { return t.m.detachDisk(ctx, path) }

// ChangeMedium is Engine.ChangeMedium within the Txn.
func (t *Txn) ChangeMedium(ctx context.Context, index int, path string) error {
	return t.m.changeMedium(ctx, index, path)
}

// Delete is Engine.Delete within the Txn: once it succeeds the VM is
// gone from the engine.
func (t *Txn) Delete(ctx context.Context) error {
	if err := t.m.delete(ctx); err != nil {
		return err
	}
	t.m.e.forget(t.m)
	return nil
}
