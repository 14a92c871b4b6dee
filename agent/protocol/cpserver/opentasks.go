package cpserver

import (
	"context"
	"slices"
)

// The index of a MemStore's unfinished tasks by node (openBy), which a
// lease reads instead of every task kept: a lease's cost grows with its
// node's open tasks, not with the tasks the store keeps.

// indexOpen brings openBy up to date after the task id changed from was
// (nil: new) to now; mu held.
func (m *MemStore) indexOpen(id string, was, now *Task) {
	if m.openBy == nil {
		m.openBy = map[string][]string{}
		m.seq = map[string]uint64{}
	}
	if was == nil {
		m.nextSeq++
		m.seq[id] = m.nextSeq
	}
	wasOpen, nowOpen := was != nil && !was.Terminal(), !now.Terminal()
	switch {
	case wasOpen && (!nowOpen || was.Node != now.Node):
		m.dropOpen(was.Node, id)
	case !wasOpen && !nowOpen:
		return
	case wasOpen:
		return // open on the same node: its place stays
	}
	if nowOpen {
		// In queue order (a re-queued task keeps its place).
		ids := m.openBy[now.Node]
		i, _ := slices.BinarySearchFunc(ids, m.seq[id], func(e string, s uint64) int {
			return cmpSeq(m.seq[e], s)
		})
		m.openBy[now.Node] = slices.Insert(ids, i, id)
	}
}

func cmpSeq(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// dropOpen removes id from node's open tasks; mu held.
func (m *MemStore) dropOpen(node, id string) {
	ids := slices.DeleteFunc(m.openBy[node], func(e string) bool { return e == id })
	if len(ids) == 0 {
		delete(m.openBy, node)
	} else {
		m.openBy[node] = ids
	}
}

// forgetSeq drops a pruned task's place; mu held.
func (m *MemStore) forgetSeq(id string) { delete(m.seq, id) }

// NodeUnfinished implements Store.
func (m *MemStore) NodeUnfinished(_ context.Context, node string) ([]Task, error) {
	m.lock()
	defer m.mu.Unlock()
	ids := m.openBy[node]
	if node != "" && len(m.openBy[""]) > 0 {
		ids = append(slices.Clone(ids), m.openBy[""]...)
		slices.SortFunc(ids, func(a, b string) int { return cmpSeq(m.seq[a], m.seq[b]) })
	}
	out := make([]Task, 0, len(ids))
	for _, id := range ids {
		out = append(out, *cloneTask(m.tasks[id]))
	}
	return out, nil
}
