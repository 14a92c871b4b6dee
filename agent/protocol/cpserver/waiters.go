package cpserver

// NodeWaiters hands out, per node, a channel closed at the next wake of
// that node: the long polls of a node wait on it. The zero value is
// ready; the caller serialises calls under its own lock.
type NodeWaiters struct {
	chs map[string]chan struct{} // made on demand
}

// Wait returns the channel the next Wake of node, or WakeAll, closes.
func (w *NodeWaiters) Wait(node string) <-chan struct{} {
	if w.chs == nil {
		w.chs = map[string]chan struct{}{}
	}
	ch, ok := w.chs[node]
	if !ok {
		ch = make(chan struct{})
		w.chs[node] = ch
	}
	return ch
}

// Wake wakes node's waiters.
func (w *NodeWaiters) Wake(node string) {
	if ch, ok := w.chs[node]; ok {
		close(ch)
		delete(w.chs, node)
	}
}

// WakeAll wakes every node's waiters.
func (w *NodeWaiters) WakeAll() {
	for _, ch := range w.chs {
		close(ch)
	}
	clear(w.chs)
}
