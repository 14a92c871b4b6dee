package runner

import (
	"context"
	"errors"
	"sync"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/protocol"
)

// outbox holds the outcomes not yet acknowledged, in finishing order. The
// journal holds them too; the outbox is the sender's work list.
type outbox struct {
	mu      sync.Mutex
	order   []string
	items   map[string]*protocol.CompleteRequest
	changed chan struct{} // closed and replaced on every change
}

func newOutbox() *outbox {
	return &outbox{items: map[string]*protocol.CompleteRequest{}, changed: make(chan struct{})}
}

// add queues (or refreshes, keeping its place) a task's completion,
// addressed to the given lease.
func (o *outbox) add(e journal.Entry, leaseID string, attempt int) {
	req := &protocol.CompleteRequest{
		LeaseID:    leaseID,
		Attempt:    attempt,
		Status:     e.Outcome.Status,
		VM:         e.Outcome.VM,
		Output:     e.Outcome.Output,
		Error:      e.Outcome.Error,
		StartedAt:  e.StartedAt,
		FinishedAt: e.FinishedAt,
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, ok := o.items[e.TaskID]; !ok {
		o.order = append(o.order, e.TaskID)
	}
	o.items[e.TaskID] = req
	o.notify()
}

// first returns the oldest completion and a channel closed on the next
// change.
func (o *outbox) first() (string, *protocol.CompleteRequest, <-chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.order) == 0 {
		return "", nil, o.changed
	}
	id := o.order[0]
	return id, o.items[id], o.changed
}

// remove drops a completion if it is still the one sent (a redelivery may
// have refreshed it meanwhile: then it is sent again, to the new lease).
func (o *outbox) remove(id string, sent *protocol.CompleteRequest) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.items[id] != sent {
		return
	}
	delete(o.items, id)
	for i, x := range o.order {
		if x == id {
			o.order = append(o.order[:i], o.order[i+1:]...)
			break
		}
	}
	o.notify()
}

func (o *outbox) len() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.order)
}

func (o *outbox) notify() {
	close(o.changed)
	o.changed = make(chan struct{})
}

// waitEmpty waits until every completion is acknowledged or ctx ends.
func (o *outbox) waitEmpty(ctx context.Context) error {
	for {
		id, _, ch := o.first()
		if id == "" {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// sendLoop delivers completions one at a time, oldest first, retrying
// with backoff until each is acknowledged; the journal then records the
// acknowledgement.
func (r *Runner) sendLoop(ctx context.Context) {
	b := r.newBackoff()
	for {
		id, req, ch := r.outbox.first()
		if id == "" {
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return
			}
		}
		err := r.client.Complete(ctx, id, *req)
		if ctx.Err() != nil {
			return
		}
		var herr *protocol.HTTPError
		switch {
		case err == nil:
			b.reset()
			r.setConnected(true)
			if err := r.j.Ack(id, r.clock.Now()); err != nil && !errors.Is(err, journal.ErrNotFound) {
				r.log.Warn("journal failed to record an acknowledgement", zap.String("task", id), zap.Error(err))
			}
			r.outbox.remove(id, req)
		case !protocol.IsRetryable(err) && errors.As(err, &herr) && !herr.Auth():
			// Refused for good (unknown task, malformed): keep no
			// poison at the head of the queue.
			r.log.Error("control plane refused a completion; dropped", zap.String("task", id), zap.String("status", req.Status), zap.Error(err))
			if err := r.j.Ack(id, r.clock.Now()); err != nil && !errors.Is(err, journal.ErrNotFound) {
				r.log.Warn("journal failed to record a refused completion", zap.String("task", id), zap.Error(err))
			}
			r.outbox.remove(id, req)
		default:
			r.requestFailed("complete", err)
			if sleep(ctx, r.clock, b.next(err)) != nil {
				return
			}
		}
	}
}
