package imagecache

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"sort"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Entry describes a committed image.
type Entry struct {
	Pool, Digest, Path, Format string // Path = read-only cached file
	Size, VirtualSize          int64  // Size = length of the file in bytes
	URLs                       []string
	LastUsed                   time.Time
	PinnedBy                   []string
	// DiskBytes is the space the file takes (raw images are kept sparse).
	DiskBytes int64
}

const recordVersion = 1

// record is an entry's index file, <pool>/images/index/<hex>.json.
type record struct {
	Version     int       `json:"version"`
	Digest      string    `json:"digest"`
	Format      string    `json:"format"`
	Size        int64     `json:"size"`
	VirtualSize int64     `json:"virtual_size"`
	URLs        []string  `json:"urls,omitempty"`
	Created     time.Time `json:"created"`
	LastUsed    time.Time `json:"last_used"`
	PinnedBy    []string  `json:"pinned_by,omitempty"`

	diskBytes int64
}

func (r *record) clone() *record {
	n := *r
	n.URLs = append([]string(nil), r.URLs...)
	n.PinnedBy = append([]string(nil), r.PinnedBy...)
	return &n
}

func (p *pool) entry(r *record) Entry {
	return Entry{
		Pool:        p.name,
		Digest:      r.Digest,
		Path:        p.entryPath(r.Digest),
		Format:      r.Format,
		Size:        r.Size,
		VirtualSize: r.VirtualSize,
		URLs:        append([]string(nil), r.URLs...),
		LastUsed:    r.LastUsed,
		PinnedBy:    append([]string(nil), r.PinnedBy...),
		DiskBytes:   r.diskBytes,
	}
}

// saveRecord writes r durably. p.mu held (or p not yet shared).
func (p *pool) saveRecord(r *record) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return writeFileSync(p.recordPath(r.Digest), b, 0o600)
}

// update applies change to a copy of digest's record, saves it and only
// then publishes it. p.mu held.
func (p *pool) update(digest string, change func(r *record)) error {
	old, ok := p.entries[digest]
	if !ok {
		return errcode.New(errcode.NotFound, "image %s not found in pool %q", digest, p.name)
	}
	n := old.clone()
	change(n)
	n.PinnedBy = sortedStrings(n.PinnedBy)
	if err := p.saveRecord(n); err != nil {
		return errcode.Wrap(errcode.Internal, err, "save index of image %s", digest)
	}
	p.publish(n)
	return nil
}

// publish makes r the entry of its digest. p.mu held.
func (p *pool) publish(r *record) {
	if old, ok := p.entries[r.Digest]; ok {
		for _, u := range old.URLs {
			if p.byURL[u] == r.Digest {
				delete(p.byURL, u)
			}
		}
	}
	p.entries[r.Digest] = r
	for _, u := range r.URLs {
		p.byURL[u] = r.Digest
	}
}

// unpublish forgets digest. p.mu held.
func (p *pool) unpublish(digest string) {
	if old, ok := p.entries[digest]; ok {
		for _, u := range old.URLs {
			if p.byURL[u] == digest {
				delete(p.byURL, u)
			}
		}
	}
	delete(p.entries, digest)
}

// loadIndex reads the index and reconciles it with the committed files:
// a record whose file is missing is an ingest that crashed before its
// commit point and is dropped; a file without a usable record (lost by
// hand) is described again from qemu-img, because a VM disk may still
// back onto it.
func (c *Cache) loadIndex(p *pool, log *zap.Logger) error {
	recs := make(map[string]*record)
	ents, err := os.ReadDir(p.index)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "pool %q: read index", p.name)
	}
	for _, e := range ents {
		name := e.Name()
		path := p.index + "/" + name
		digest, isJSON := strings.CutSuffix(name, ".json")
		if !isJSON || checkDigest(digest) != nil || !e.Type().IsRegular() {
			log.Info("removing stray index file", zap.String("file", name))
			os.RemoveAll(path)
			continue
		}
		r, err := readRecord(path)
		if err != nil || r.Digest != digest {
			log.Warn("removing unreadable index record", zap.String("image_sha256", digest), zap.Error(err))
			os.Remove(path)
			continue
		}
		recs[digest] = r
	}
	ents, err = os.ReadDir(p.data)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "pool %q: read images", p.name)
	}
	seen := make(map[string]bool)
	for _, e := range ents {
		name := e.Name()
		path := p.data + "/" + name
		if checkDigest(name) != nil || !e.Type().IsRegular() {
			log.Info("removing stray file from image store", zap.String("file", name))
			os.RemoveAll(path)
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		r := recs[name]
		if r == nil || r.Size != fi.Size() {
			r, err = c.describe(p, name, r)
			if err != nil {
				log.Warn("removing unusable image", zap.String("image_sha256", name), zap.Error(err))
				os.Remove(path)
				continue
			}
			if err := p.saveRecord(r); err != nil {
				return errcode.Wrap(errcode.Internal, err, "pool %q: save index", p.name)
			}
			log.Warn("rebuilt index record", zap.String("image_sha256", name))
		}
		r.diskBytes = allocated(fi)
		p.publish(r)
		seen[name] = true
	}
	for digest, r := range recs {
		if seen[digest] {
			continue
		}
		if len(r.PinnedBy) > 0 {
			log.Error("pinned image is missing; dropping its record", zap.String("image_sha256", digest), zap.Strings("pinned_by", r.PinnedBy))
		} else {
			log.Info("dropping index record of an uncommitted image", zap.String("image_sha256", digest))
		}
		os.Remove(p.recordPath(digest))
	}
	if err := fsyncDir(p.index); err != nil {
		return errcode.Wrap(errcode.Internal, err, "pool %q: sync index", p.name)
	}
	return fsyncDir(p.data)
}

func readRecord(path string) (*record, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, err
	}
	if r.Version != recordVersion {
		return nil, errors.New("unknown record version")
	}
	if r.Format != "raw" && r.Format != "qcow2" {
		return nil, errors.New("unsupported format in record")
	}
	r.PinnedBy = sortedStrings(r.PinnedBy)
	return &r, nil
}

// describe builds a record for a committed file from qemu-img, keeping
// the URLs and pins of old when there is one.
func (c *Cache) describe(p *pool, digest string, old *record) (*record, error) {
	path := p.entryPath(digest)
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(c.ctx, qemuImgInfoTimeout)
	defer cancel()
	info, err := c.imageInfo(ctx, path)
	if err != nil {
		return nil, err
	}
	if err := checkImage(info, ""); err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	r := &record{Version: recordVersion, Digest: digest, Format: info.Format, Size: fi.Size(),
		VirtualSize: info.VirtualSize, Created: now, LastUsed: now}
	if old != nil {
		r.URLs, r.PinnedBy, r.Created, r.LastUsed = old.URLs, old.PinnedBy, old.Created, old.LastUsed
	}
	return r, nil
}

// List returns the pool's entries, most recently used first.
func (c *Cache) List(poolName string) ([]Entry, error) {
	p, err := c.pool(poolName)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	out := make([]Entry, 0, len(p.entries))
	for _, r := range p.entries {
		out = append(out, p.entry(r))
	}
	p.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if !out[i].LastUsed.Equal(out[j].LastUsed) {
			return out[i].LastUsed.After(out[j].LastUsed)
		}
		return out[i].Digest < out[j].Digest
	})
	return out, nil
}
