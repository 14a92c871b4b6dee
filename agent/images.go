package agent

import (
	"context"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/imagecache"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// imageOf is the API view of a cache entry.
func imageOf(e imagecache.Entry) api.Image {
	return api.Image{Pool: e.Pool, Digest: e.Digest, Format: e.Format, Size: e.Size, VirtualSize: e.VirtualSize,
		URLs: e.URLs, LastUsed: e.LastUsed, PinnedBy: e.PinnedBy}
}

// DeleteImage evicts a cached image no VM uses (the default pool when pool
// is empty): a pinned one is a conflict, an unknown one not_found.
func (h *Host) DeleteImage(ctx context.Context, pool, digest string) error {
	pool, err := h.Pool(pool)
	if err != nil {
		return err
	}
	return h.cache.Evict(ctx, pool, strings.ToLower(strings.TrimPrefix(digest, "sha256:")))
}

// Pool resolves a pool name of a request: the default pool when empty; an
// unknown one is pool_not_found.
func (h *Host) Pool(name string) (string, error) {
	if name == "" {
		def, err := h.cache.DefaultPool()
		if err != nil {
			return "", err
		}
		name = def
	}
	if _, err := h.cache.PoolDir(name); err != nil {
		return "", err
	}
	return name, nil
}

// PullImage fills a pool's cache with an image ahead of creates.
func (h *Host) PullImage(ctx context.Context, p api.PullImage, progress func(api.Progress)) (imagecache.Entry, error) {
	if p.URL == "" {
		return imagecache.Entry{}, errcode.New(errcode.ValidationFailed, "url is required")
	}
	if p.Pool == "" {
		def, err := h.cache.DefaultPool()
		if err != nil {
			return imagecache.Entry{}, err
		}
		p.Pool = def
	}
	return h.cache.Ensure(ctx, p.Pool, imagecache.Request{URL: p.URL, SHA256: strings.ToLower(p.SHA256)}, func(done, total int64) {
		if progress != nil {
			progress(api.Progress{Phase: "download", Done: done, Total: total})
		}
	})
}

// Images lists the cached images of one pool, or of every pool.
func (h *Host) Images(pool string) ([]api.Image, error) {
	var pools []string
	if pool != "" {
		pools = []string{pool}
	} else {
		for _, s := range h.cache.Stats() {
			pools = append(pools, s.Name)
		}
	}
	out := []api.Image{}
	for _, p := range pools {
		es, err := h.cache.List(p)
		if err != nil {
			return nil, err
		}
		for _, e := range es {
			out = append(out, imageOf(e))
		}
	}
	return out, nil
}
