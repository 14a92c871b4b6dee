package imagecache

import (
	"crypto/sha256"
	"encoding"
	"encoding/hex"
	"encoding/json"
	"errors"
	"hash"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// partial is an ingest file being written: <key>.part and, once a
// checkpoint was taken, its resume sidecar <key>.json.
type partial struct {
	part, side string
	f          *os.File
	df         *os.File  // the same file opened with O_DIRECT, or nil
	h          hash.Hash // sha256 of bytes [0, off)

	off           int64 // bytes received, hashed and written
	total         int64 // expected size, -1 unknown
	etag, lastMod string

	fileSize int64 // length of f (may be < off: trailing zeros skipped)
	flushed  int64 // writeback started up to here
	waited   int64 // writeback finished up to here
	dirty    bool  // buffered writes since the last writeback

	bufs [][]byte // pipeline buffers, kept across attempts
}

const sidecarVersion = 1

// sidecar lets a later process resume an interrupted download. It is
// written only after the data it covers was fdatasync'ed.
type sidecar struct {
	Version      int       `json:"version"`
	URL          string    `json:"url"`
	SHA256       string    `json:"sha256,omitempty"`
	Format       string    `json:"format,omitempty"`
	ETag         string    `json:"etag,omitempty"`
	LastModified string    `json:"last_modified,omitempty"`
	Total        int64     `json:"total"`
	Bytes        int64     `json:"bytes"`
	HashState    []byte    `json:"hash_state"` // sha256 state after Bytes bytes
	Updated      time.Time `json:"updated"`
}

// ingestKey names the ingest files of a request: a hash, never request
// text.
func ingestKey(r request) string {
	s := sha256.Sum256([]byte(r.url + "\x00" + r.sha + "\x00" + r.format))
	return hex.EncodeToString(s[:16])
}

// openPartial adopts a resumable partial for r, or starts a new one.
func (c *Cache) openPartial(p *pool, key string, r request, log *zap.Logger) (*partial, error) {
	st := &partial{
		part:  filepath.Join(p.ingest, key+".part"),
		side:  filepath.Join(p.ingest, key+".json"),
		h:     sha256.New(),
		total: -1,
	}
	if sc, err := readSidecar(st.side); err == nil && sc.URL == r.url && sc.SHA256 == r.sha && sc.Format == r.format && sc.Bytes > 0 && sc.Bytes <= c.opts.MaxImageBytes {
		f, err := os.OpenFile(st.part, os.O_RDWR, 0)
		if err == nil {
			fi, err := f.Stat()
			if err == nil && fi.Size() >= sc.Bytes && st.h.(encoding.BinaryUnmarshaler).UnmarshalBinary(sc.HashState) == nil && f.Truncate(sc.Bytes) == nil {
				st.f, st.off, st.fileSize = f, sc.Bytes, sc.Bytes
				st.total, st.etag, st.lastMod = sc.Total, sc.ETag, sc.LastModified
				st.flushed, st.waited = sc.Bytes, sc.Bytes
				st.openDirect(c.opts.noDirectIO)
				log.Info("resuming interrupted download", zap.Int64("bytes", sc.Bytes))
				return st, nil
			}
			f.Close()
		}
		st.h.Reset()
	}
	os.Remove(st.side)
	f, err := os.OpenFile(st.part, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		if isNoSpace(err) {
			return nil, errcode.Wrap(errcode.DiskFull, err, "pool %q", p.name)
		}
		return nil, errcode.Wrap(errcode.Internal, err, "create ingest file")
	}
	st.f = f
	st.openDirect(c.opts.noDirectIO)
	return st, nil
}

// openDirect opens st's file a second time with O_DIRECT: aligned blocks
// then go from the download buffers straight to the disk, without the
// page-cache copy and its writeback (the largest CPU cost of a buffered
// write here), overlapping the download. File systems without O_DIRECT
// keep the buffered path.
func (st *partial) openDirect(disabled bool) {
	if disabled {
		return
	}
	if df, err := os.OpenFile(st.part, os.O_WRONLY|unix.O_DIRECT, 0); err == nil {
		st.df = df
	}
}

// close closes st's descriptors.
func (st *partial) close() {
	if st.df != nil {
		st.df.Close()
		st.df = nil
	}
	st.f.Close()
}

func readSidecar(path string) (*sidecar, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var sc sidecar
	if err := json.Unmarshal(b, &sc); err != nil {
		return nil, err
	}
	if sc.Version != sidecarVersion {
		return nil, errors.New("unknown sidecar version")
	}
	return &sc, nil
}

// canResume reports whether a later request may continue st's bytes: the
// server's validator (or the expected digest) guards against stitching two
// different files together.
func (st *partial) canResume(r request) bool {
	if r.u.Scheme != "http" && r.u.Scheme != "https" {
		return false
	}
	return strongETag(st.etag) || st.lastMod != "" || r.sha != ""
}

// reset empties st for a download from the start.
func (st *partial) reset() error {
	os.Remove(st.side)
	st.h.Reset()
	st.off, st.total, st.etag, st.lastMod = 0, -1, "", ""
	st.fileSize, st.flushed, st.waited, st.dirty = 0, 0, 0, false
	return st.f.Truncate(0)
}

// checkpoint makes [0, at) durable and records how to resume from there.
func (st *partial) checkpoint(r request, at int64, state []byte) error {
	if st.fileSize < at {
		if err := st.f.Truncate(at); err != nil {
			return err
		}
		st.fileSize = at
	}
	if err := unix.Fdatasync(int(st.f.Fd())); err != nil {
		return err
	}
	st.flushed, st.waited = max(st.flushed, at), max(st.waited, at)
	b, err := json.Marshal(sidecar{Version: sidecarVersion, URL: r.url, SHA256: r.sha, Format: r.format,
		ETag: st.etag, LastModified: st.lastMod, Total: st.total, Bytes: at, HashState: state, Updated: time.Now().UTC()})
	if err != nil {
		return err
	}
	tmp := st.side + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, st.side)
}

// suspend keeps st for a later resume when it can be resumed, else
// discards it.
func (st *partial) suspend(r request) bool {
	if st.off > 0 && st.canResume(r) {
		if state, err := st.h.(encoding.BinaryMarshaler).MarshalBinary(); err == nil {
			if st.checkpoint(r, st.off, state) == nil {
				st.close()
				return true
			}
		}
	}
	st.discard()
	return false
}

// discard removes st's files.
func (st *partial) discard() {
	st.close()
	os.Remove(st.part)
	os.Remove(st.side)
	os.Remove(st.side + ".tmp")
}

// finish makes the complete file durable and read-only.
func (st *partial) finish() error {
	if st.fileSize < st.off {
		if err := st.f.Truncate(st.off); err != nil {
			return err
		}
		st.fileSize = st.off
	}
	if err := st.f.Chmod(0o444); err != nil {
		return err
	}
	return st.f.Sync()
}

// sweepIngest removes what interrupted work left in ingest/, except
// resumable partials younger than PartialMaxAge.
func (c *Cache) sweepIngest(p *pool, log *zap.Logger) error {
	ents, err := os.ReadDir(p.ingest)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "pool %q: read ingest directory", p.name)
	}
	keep := make(map[string]bool)
	for _, e := range ents {
		key, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || !e.Type().IsRegular() {
			continue
		}
		sc, err := readSidecar(filepath.Join(p.ingest, e.Name()))
		if err != nil || time.Since(sc.Updated) > c.opts.PartialMaxAge || sc.Bytes <= 0 {
			continue
		}
		fi, err := os.Lstat(filepath.Join(p.ingest, key+".part"))
		if err != nil || !fi.Mode().IsRegular() || fi.Size() < sc.Bytes {
			continue
		}
		keep[key+".json"], keep[key+".part"] = true, true
	}
	for _, e := range ents {
		if keep[e.Name()] {
			continue
		}
		log.Info("removing ingest leftover", zap.String("file", e.Name()))
		if err := os.RemoveAll(filepath.Join(p.ingest, e.Name())); err != nil {
			return errcode.Wrap(errcode.Internal, err, "pool %q: sweep ingest directory", p.name)
		}
	}
	return fsyncDir(p.ingest)
}

// partialKey is the request key an ingest/ file belongs to.
func partialKey(name string) string {
	return strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, ".tmp"), ".json"), ".part")
}

// removeIdlePartials drops interrupted downloads nobody is resuming, to
// free space. p.mu held.
func (p *pool) removeIdlePartials(log *zap.Logger) {
	ents, err := os.ReadDir(p.ingest)
	if err != nil {
		return
	}
	for _, e := range ents {
		name := e.Name()
		if p.active[partialKey(name)] {
			continue
		}
		log.Info("removing interrupted download to free space", zap.String("file", name))
		os.Remove(filepath.Join(p.ingest, name))
	}
}
