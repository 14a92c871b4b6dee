package imagecache

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Ensure returns the pool's entry for req, downloading and committing the
// image on a miss. A request with SHA256 hits any entry of that digest; one
// without hits the entry last committed from the same URL. Concurrent
// calls for the same request share one download; when ctx ends the call
// returns at once, and the download goes on for the other callers (it is
// cancelled, keeping a resumable partial, when none is left). When ctx's
// cause asks for it (DiscardDownload, e.g. a task cancelled by its
// control plane rather than an agent shutting down), the last caller to
// leave has the partial download thrown away instead: nothing is left.
func (c *Cache) Ensure(ctx context.Context, poolName string, req Request, p Progress) (Entry, error) {
	pl, err := c.pool(poolName)
	if err != nil {
		return Entry{}, err
	}
	r, err := c.parseRequest(req)
	if err != nil {
		return Entry{}, err
	}
	e, ok, err := c.lookup(pl, r)
	if err == nil {
		c.opts.Observer.ObserveImageLookup(pl.name, ok)
	}
	if ok || err != nil {
		return e, err
	}
	key := flightKey{pool: pl.name, url: r.url, sha: r.sha, format: r.format}
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return Entry{}, errcode.New(errcode.Cancelled, "image cache is closed")
		}
		f := c.flights[key]
		if f != nil && f.abandoned {
			// Cancelled and still winding down: wait, then start anew
			// (resuming what it kept).
			c.mu.Unlock()
			select {
			case <-f.done:
				continue
			case <-ctx.Done():
				return Entry{}, cancelled(ctx)
			}
		}
		if f == nil {
			f = c.startFlight(key, pl, r)
		}
		f.waiters++
		id := f.subscribe(p)
		c.mu.Unlock()
		if c.opts.joined != nil {
			c.opts.joined()
		}
		select {
		case <-f.done:
			f.unsubscribe(id)
			if f.err != nil {
				return Entry{}, f.err
			}
			e := f.entry
			e.URLs = append([]string(nil), e.URLs...)
			e.PinnedBy = append([]string(nil), e.PinnedBy...)
			return e, nil
		case <-ctx.Done():
			f.unsubscribe(id)
			if discard := discardWanted(ctx); c.leave(f, discard) && discard {
				// The last waiter, leaving for good: the partial is gone
				// before the caller reports that nothing is left.
				<-f.done
			}
			return Entry{}, cancelled(ctx)
		}
	}
}

// Discarder is implemented by a context cancellation cause whose
// DiscardDownload says whether a download abandoned for it is thrown
// away rather than kept for a resume.
type Discarder interface{ DiscardDownload() bool }

// errDiscard is the cause a flight is cancelled with when its partial
// download must not be kept.
var errDiscard = errors.New("download abandoned for good")

func discardWanted(ctx context.Context) bool {
	var d Discarder
	return errors.As(context.Cause(ctx), &d) && d.DiscardDownload()
}

// lookup finds r in p's cache, recording the use.
func (c *Cache) lookup(p *pool, r request) (Entry, bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	digest := r.sha
	if digest == "" {
		digest = p.byURL[r.url]
	}
	rec, ok := p.entries[digest]
	if !ok {
		return Entry{}, false, nil
	}
	if r.format != "" && r.format != rec.Format {
		return Entry{}, false, errcode.New(errcode.ValidationFailed, "image format is %s, request says %s", rec.Format, r.format)
	}
	if err := p.update(digest, func(rec *record) {
		rec.URLs = addURL(rec.URLs, r.url)
		rec.LastUsed = time.Now().UTC()
	}); err != nil {
		return Entry{}, false, err
	}
	return p.entry(p.entries[digest]), true, nil
}

type flightKey struct{ pool, url, sha, format string }

// flight is one shared download. waiters and abandoned are guarded by
// Cache.mu; entry and err are written before done is closed.
type flight struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	done   chan struct{}

	waiters   int
	abandoned bool

	entry Entry
	err   error

	pmu                 sync.Mutex
	subs                map[int]Progress
	nextID              int
	lastDone, lastTotal int64
	reported            bool
}

// startFlight starts the download of r; c.mu held.
func (c *Cache) startFlight(key flightKey, p *pool, r request) *flight {
	f := &flight{done: make(chan struct{}), subs: make(map[int]Progress)}
	f.ctx, f.cancel = context.WithCancelCause(c.ctx)
	c.flights[key] = f
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		e, err := c.ingest(f.ctx, p, r, f.report)
		f.cancel(nil)
		c.mu.Lock()
		if c.flights[key] == f {
			delete(c.flights, key)
		}
		f.entry, f.err = e, err
		c.mu.Unlock()
		close(f.done)
	}()
	return f
}

// leave drops a waiter; the last one cancels the download, keeping its
// partial for a resume unless discard, and leave reports true. c.mu not
// held.
func (c *Cache) leave(f *flight, discard bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	f.waiters--
	if f.waiters != 0 {
		return false
	}
	f.abandoned = true
	var cause error
	if discard {
		cause = errDiscard
	}
	f.cancel(cause)
	return true
}

func (f *flight) subscribe(p Progress) int {
	f.pmu.Lock()
	defer f.pmu.Unlock()
	f.nextID++
	if p != nil {
		f.subs[f.nextID] = p
		if f.reported {
			p(f.lastDone, f.lastTotal)
		}
	}
	return f.nextID
}

func (f *flight) unsubscribe(id int) {
	f.pmu.Lock()
	delete(f.subs, id)
	f.pmu.Unlock()
}

// report fans progress out to the waiters. Holding pmu while calling them
// keeps each subscriber's sequence ordered.
func (f *flight) report(done, total int64) {
	f.pmu.Lock()
	defer f.pmu.Unlock()
	f.lastDone, f.lastTotal, f.reported = done, total, true
	for _, p := range f.subs {
		p(done, total)
	}
}
