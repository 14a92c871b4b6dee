package agent

import (
	"context"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/imagecache"
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
