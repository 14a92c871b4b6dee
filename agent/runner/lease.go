package runner

import (
	"context"
)

// leaseLoop long-polls for tasks while fewer than MaxInFlight are in
// flight, until ctx ends.
func (r *Runner) leaseLoop(ctx context.Context) {
	b := r.newBackoff()
	for ctx.Err() == nil {
		r.mu.Lock()
		free := r.cfg.MaxInFlight - len(r.tasks)
		freed := r.freed
		r.mu.Unlock()
		if free <= 0 {
			select {
			case <-freed:
				continue
			case <-ctx.Done():
				return
			}
		}
		began := r.clock.Now()
		resp, err := r.client.Lease(ctx, r.cfg.LeaseWait, min(free, r.cfg.LeaseMax))
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			r.requestFailed("lease", err)
			if sleep(ctx, r.clock, b.next(err)) != nil {
				return
			}
			continue
		}
		r.setConnected(true)
		for _, id := range resp.Cancel {
			r.cancelByID(id)
		}
		if len(resp.Tasks) == 0 && len(resp.Cancel) == 0 && r.clock.Now().Sub(began) < r.cfg.LeaseWait/2 {
			// An empty answer long before the wait: a control plane (or
			// proxy) that does not hold long polls. Do not spin.
			if sleep(ctx, r.clock, b.next(nil)) != nil {
				return
			}
			continue
		}
		b.reset()
		for _, t := range resp.Tasks {
			r.accept(t)
		}
	}
}
