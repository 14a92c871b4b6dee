package imagecache

import (
	"context"
	"os"
	"sort"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Evict removes an unpinned entry. A pinned one is a conflict.
func (c *Cache) Evict(ctx context.Context, poolName, digest string) error {
	p, err := c.pool(poolName)
	if err != nil {
		return err
	}
	if err := checkDigest(digest); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return cancelled(ctx)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.entries[digest]
	if !ok {
		return errcode.New(errcode.NotFound, "image %s not found in pool %q", digest, p.name)
	}
	if len(r.PinnedBy) > 0 {
		return errcode.New(errcode.Conflict, "image %s is in use by %d VM disk(s): %v", digest, len(r.PinnedBy), r.PinnedBy)
	}
	if err := p.remove(digest); err != nil {
		return err
	}
	c.log.Info("image evicted", zap.String("op", "image_evict"), zap.String("pool", p.name), zap.String("image_sha256", digest))
	return nil
}

// Prune applies the eviction policy to the pool now and returns the
// digests it evicted, least recently used first.
func (c *Cache) Prune(ctx context.Context, poolName string) ([]string, error) {
	p, err := c.pool(poolName)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, cancelled(ctx)
	}
	log := c.log.With(zap.String("op", "image_prune"), zap.String("pool", p.name))
	return c.evict(p, "", log), nil
}

// evict removes least recently used unpinned entries (never protect)
// while the pool's cache is over MaxCacheBytes or its free space under
// MinFreeBytes.
func (c *Cache) evict(p *pool, protect string, log *zap.Logger) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	over := func() bool {
		if c.opts.MaxCacheBytes > 0 && p.cacheBytes() > c.opts.MaxCacheBytes {
			return true
		}
		if c.opts.MinFreeBytes > 0 {
			if _, free, err := fsSpace(p.dir); err == nil && free < c.opts.MinFreeBytes {
				return true
			}
		}
		return false
	}
	return p.evictWhile(over, protect, log)
}

// makeRoom evicts until want bytes are free, idle partials first.
func (c *Cache) makeRoom(p *pool, want int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	log := c.log.With(zap.String("op", "image_evict"), zap.String("pool", p.name))
	short := func() bool {
		_, free, err := fsSpace(p.dir)
		return err == nil && free < want
	}
	if !short() {
		return
	}
	p.removeIdlePartials(log)
	p.evictWhile(short, "", log)
}

// reclaimableLocked returns the bytes that evicting every unpinned entry
// and every idle partial would free. p.mu held.
func (p *pool) reclaimableLocked() int64 {
	var n int64
	for _, r := range p.entries {
		if len(r.PinnedBy) == 0 {
			n += r.diskBytes
		}
	}
	ents, err := os.ReadDir(p.ingest)
	if err != nil {
		return n
	}
	for _, e := range ents {
		if p.active[partialKey(e.Name())] {
			continue
		}
		if fi, err := e.Info(); err == nil {
			n += allocated(fi)
		}
	}
	return n
}

// evictWhile removes unpinned entries, least recently used first, while
// cond holds. p.mu held.
func (p *pool) evictWhile(cond func() bool, protect string, log *zap.Logger) []string {
	var cands []*record
	for d, r := range p.entries {
		if d != protect && len(r.PinnedBy) == 0 {
			cands = append(cands, r)
		}
	}
	sort.Slice(cands, func(i, j int) bool {
		if !cands[i].LastUsed.Equal(cands[j].LastUsed) {
			return cands[i].LastUsed.Before(cands[j].LastUsed)
		}
		return cands[i].Digest < cands[j].Digest
	})
	var out []string
	for _, r := range cands {
		if !cond() {
			break
		}
		if err := p.remove(r.Digest); err != nil {
			log.Warn("eviction failed", zap.String("image_sha256", r.Digest), zap.Error(err))
			continue
		}
		log.Info("image evicted", zap.String("image_sha256", r.Digest), zap.Int64("bytes", r.diskBytes))
		out = append(out, r.Digest)
	}
	return out
}

// remove deletes an entry: the file first (an index record without its
// file is dropped by Open), then the record. p.mu held.
func (p *pool) remove(digest string) error {
	var bytes int64
	if r := p.entries[digest]; r != nil {
		bytes = r.diskBytes
	}
	if err := os.Remove(p.entryPath(digest)); err != nil && !os.IsNotExist(err) {
		return errcode.Wrap(errcode.Internal, err, "remove image %s", digest)
	}
	p.obs.ObserveImageEviction(p.name, bytes)
	p.unpublish(digest)
	if err := fsyncDir(p.data); err != nil {
		return errcode.Wrap(errcode.Internal, err, "remove image %s", digest)
	}
	if err := os.Remove(p.recordPath(digest)); err != nil && !os.IsNotExist(err) {
		return errcode.Wrap(errcode.Internal, err, "remove index of image %s", digest)
	}
	fsyncDir(p.index)
	return nil
}
