package imagecache

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/internal/errcode"
)

const (
	maxAttempts = 10 // per Ensure, resumed ones included
	maxStalls   = 3  // consecutive failed attempts that made no progress
)

// ingest downloads r into p and commits it. It runs in a shared download's
// goroutine; ctx ends when every waiter has left or the cache closes.
func (c *Cache) ingest(ctx context.Context, p *pool, r request, report Progress) (_ Entry, err error) {
	if e, ok, err := c.lookup(p, r); ok || err != nil {
		return e, err
	}
	select {
	case c.sem <- struct{}{}:
	case <-ctx.Done():
		return Entry{}, cancelled(ctx)
	}
	defer func() { <-c.sem }()
	// Someone may have committed it while we waited for a slot.
	if e, ok, err := c.lookup(p, r); ok || err != nil {
		return e, err
	}

	key := ingestKey(r)
	p.mu.Lock()
	p.active[key] = true
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.active, key)
		p.mu.Unlock()
	}()
	log := c.log.With(zap.String("op", "image_ingest"), zap.String("pool", p.name), zap.String("image_url", redact(r.u)))
	st, err := c.openPartial(p, key, r, log)
	if err != nil {
		return Entry{}, err
	}
	start := time.Now()
	resumedAt := st.off
	defer func() { c.opts.Observer.ObserveImageIngest(p.name, st.off-resumedAt, time.Since(start), err) }()
	if err := c.download(ctx, p, st, r, report, log); err != nil {
		if ctx.Err() != nil {
			if errors.Is(context.Cause(ctx), errDiscard) {
				st.discard()
				log.Info("download cancelled; partial discarded", zap.Int64("bytes", st.off))
				return Entry{}, cancelled(ctx)
			}
			if st.suspend(r) {
				log.Info("download interrupted; kept for resume", zap.Int64("bytes", st.off))
			}
			return Entry{}, cancelled(ctx)
		}
		st.discard()
		return Entry{}, err
	}
	digest := hex.EncodeToString(st.h.Sum(nil))
	log = log.With(zap.String("image_sha256", digest))
	if r.sha != "" && digest != r.sha {
		st.discard()
		return Entry{}, errcode.New(errcode.ImageChecksumMismatch, "image %s has sha256 %s, expected %s", redact(r.u), digest, r.sha)
	}
	if err := st.finish(); err != nil {
		st.discard()
		return Entry{}, writeErr(p, err)
	}
	info, err := c.imageInfo(ctx, st.part)
	if err == nil {
		err = checkImage(info, r.format)
	}
	if err != nil {
		st.discard()
		if ctx.Err() != nil {
			return Entry{}, cancelled(ctx)
		}
		return Entry{}, err
	}
	e, err := c.commit(p, st, r, digest, info)
	if err != nil {
		if e.Digest == "" {
			st.discard()
		}
		return Entry{}, err
	}
	if report != nil {
		report(e.Size, e.Size)
	}
	elapsed := time.Since(start)
	log.Info("image ingested", zap.String("format", e.Format), zap.Int64("bytes", e.Size),
		zap.Int64("resumed_at", resumedAt), zap.Duration("elapsed", elapsed))
	c.evict(p, digest, log)
	return e, nil
}

// download fills st with the whole image, retrying dropped streams and
// resuming them when the server allows it.
func (c *Cache) download(ctx context.Context, p *pool, st *partial, r request, report Progress, log *zap.Logger) error {
	backoff := c.opts.retryBackoff
	stalls := 0
	for attempt := 1; ; attempt++ {
		before := st.off
		err := c.attempt(ctx, p, st, r, report)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var final *errcode.Error
		if errors.As(err, &final) {
			return err
		}
		if st.off > before {
			stalls = 0
		} else {
			stalls++
		}
		if attempt >= maxAttempts || stalls > maxStalls {
			return errcode.Wrap(errcode.ImageDownloadFailed, err, "download %s: gave up after %d attempts", redact(r.u), attempt)
		}
		log.Warn("download interrupted; retrying", zap.Int("attempt", attempt), zap.Int64("bytes", st.off), zap.Error(err))
		if errors.Is(err, errRestart) {
			if err := st.reset(); err != nil {
				return writeErr(p, err)
			}
			continue
		}
		if backoff > 0 {
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			}
			backoff *= 2
		}
	}
}

// attempt makes one request and streams its body into st.
func (c *Cache) attempt(ctx context.Context, p *pool, st *partial, r request, report Progress) error {
	actx, abort := context.WithCancelCause(ctx)
	defer abort(nil)
	resp, err := c.open(actx, r, st)
	if err != nil {
		return err
	}
	defer resp.body.Close()
	if resp.start != st.off {
		// A full answer (200) to a range request: start over.
		if err := st.reset(); err != nil {
			return writeErr(p, err)
		}
	}
	if st.off == 0 {
		st.total, st.etag, st.lastMod = resp.total, resp.etag, resp.lastMod
	}
	if st.total > c.opts.MaxImageBytes {
		return errcode.New(errcode.ImageDownloadFailed, "download %s: image is %s, over the %s limit", redact(r.u), fmtBytes(st.total), fmtBytes(c.opts.MaxImageBytes))
	}
	if st.total >= 0 {
		if err := c.reserve(p, st.total, st.total-st.off); err != nil {
			return err
		}
	}
	limit := int64(-1)
	if st.total >= 0 {
		limit = st.total - st.off
	}
	idle := time.AfterFunc(c.opts.idleTimeout, func() { abort(errIdle) })
	defer idle.Stop()
	src := &idleReader{r: resp.body, t: idle, d: c.opts.idleTimeout}
	total := st.total
	err = c.stream(p, r, st, src, limit, abort, func(done int64) {
		if report != nil {
			report(done, total)
		}
	})
	if err != nil {
		if errors.Is(context.Cause(actx), errIdle) && ctx.Err() == nil {
			return fmt.Errorf("%w for %s", errIdle, c.opts.idleTimeout)
		}
		return err
	}
	if st.total >= 0 && st.off != st.total {
		return fmt.Errorf("body ended after %d of %d bytes", st.off, st.total)
	}
	return nil
}

// reserve checks that need more bytes of an image of size total fit above
// the free-space floor. An image larger than the pool could ever hold fails
// at once; otherwise unpinned entries and idle partials are evicted, but
// only when evicting them makes it fit: a download that cannot fit anyway
// fails with disk_full and leaves the cache as it was.
func (c *Cache) reserve(p *pool, total, need int64) error {
	size, free, err := fsSpace(p.dir)
	if err != nil || free-need >= c.opts.MinFreeBytes {
		return nil
	}
	floor := max(c.opts.MinFreeBytes, 0)
	if total > size-floor {
		return errcode.New(errcode.DiskFull, "pool %q: the image is %s, larger than the pool could ever hold (%s, %s of it kept free)",
			p.name, fmtBytes(total), fmtBytes(size), fmtBytes(floor))
	}
	p.mu.Lock()
	reclaim := p.reclaimableLocked()
	p.mu.Unlock()
	if free+reclaim-need < c.opts.MinFreeBytes {
		return errcode.New(errcode.DiskFull, "pool %q: image needs %s, %s free with a %s floor, and evicting every unused image would free only %s",
			p.name, fmtBytes(need), fmtBytes(free), fmtBytes(floor), fmtBytes(reclaim))
	}
	c.makeRoom(p, need+c.opts.MinFreeBytes)
	if _, free, err = fsSpace(p.dir); err == nil && free-need < c.opts.MinFreeBytes {
		return errcode.New(errcode.DiskFull, "pool %q: image needs %s, %s free with a %s floor", p.name, fmtBytes(need), fmtBytes(free), fmtBytes(floor))
	}
	return nil
}

// commit publishes st as the entry digest: index record first, then the
// rename (the commit point), then the directory fsync. If the digest is
// already cached, st is dropped and the existing entry gains r's URL.
func (c *Cache) commit(p *pool, st *partial, r request, digest string, info imageInfo) (Entry, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now().UTC()
	if _, ok := p.entries[digest]; ok {
		st.discard()
		if err := p.update(digest, func(rec *record) {
			rec.URLs = addURL(rec.URLs, r.url)
			rec.LastUsed = now
		}); err != nil {
			return Entry{}, err
		}
		return p.entry(p.entries[digest]), nil
	}
	fi, err := st.f.Stat()
	if err != nil {
		return Entry{}, errcode.Wrap(errcode.Internal, err, "stat ingest file")
	}
	rec := &record{Version: recordVersion, Digest: digest, Format: info.Format, Size: st.off,
		VirtualSize: info.VirtualSize, URLs: []string{r.url}, Created: now, LastUsed: now,
		diskBytes: allocated(fi)}
	if err := p.saveRecord(rec); err != nil {
		os.Remove(p.recordPath(digest))
		return Entry{}, writeErr(p, err)
	}
	st.close()
	if err := os.Rename(st.part, p.entryPath(digest)); err != nil {
		os.Remove(p.recordPath(digest))
		return Entry{}, errcode.Wrap(errcode.Internal, err, "commit image")
	}
	// Renamed: the entry exists, whatever happens next.
	p.publish(rec)
	os.Remove(st.side)
	err = fsyncDir(p.data)
	if err2 := fsyncDir(p.ingest); err == nil {
		err = err2
	}
	if err != nil {
		return p.entry(rec), errcode.Wrap(errcode.Internal, err, "commit image")
	}
	return p.entry(rec), nil
}

func addURL(urls []string, u string) []string {
	for _, x := range urls {
		if x == u {
			return urls
		}
	}
	const maxURLs = 16
	if len(urls) >= maxURLs {
		urls = urls[1:]
	}
	return append(urls, u)
}

func cancelled(ctx context.Context) error {
	return errcode.Wrap(errcode.Cancelled, context.Cause(ctx), "image download cancelled")
}
