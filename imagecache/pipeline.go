package imagecache

import (
	"bytes"
	"context"
	"encoding"
	"errors"
	"fmt"
	"io"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// The pipeline: the calling goroutine reads the source into large
// buffers; a hasher goroutine feeds sha256; a writer goroutine writes the
// same buffers (skipping all-zero blocks), starts their writeback early
// with sync_file_range and checks free space. A buffer goes back to the
// reader when both are done with it, so reading, hashing and writing
// overlap, and the final fsync finds little dirty data.
const (
	pipelineBuffers = 4
	sparseBlock     = 64 << 10
	directAlign     = 4096 // O_DIRECT alignment of offsets, lengths and memory
	// writebackWindow: after this many new bytes, writeback of them is
	// started, and the previous window is waited for. At most two windows
	// are dirty at any time.
	writebackWindow = 32 << 20
)

var zeroBlock = make([]byte, sparseBlock)

type chunk struct {
	buf    []byte
	n      int
	off    int64
	ckpt   bool          // take a resume checkpoint after this chunk
	state  []byte        // sha256 state after the chunk, when ckpt
	hashed chan struct{} // closed by the hasher
}

// stream copies src into st from st.off until EOF, limit bytes, or an
// error. limit < 0 means unknown. abort cancels the source (the writer
// calls it when it fails). done reports progress after each buffer.
// On return st.off counts the bytes both hashed and written.
func (c *Cache) stream(p *pool, r request, st *partial, src io.Reader, limit int64, abort context.CancelCauseFunc, done func(int64)) error {
	if st.bufs == nil {
		for range pipelineBuffers {
			st.bufs = append(st.bufs, alignedBuffer(c.opts.chunkSize))
		}
	}
	free := make(chan *chunk, len(st.bufs))
	for _, b := range st.bufs {
		free <- &chunk{buf: b}
	}
	hashCh := make(chan *chunk, len(st.bufs))
	writeCh := make(chan *chunk, len(st.bufs))
	stop := make(chan struct{})
	var werr error
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for ch := range hashCh {
			st.h.Write(ch.buf[:ch.n])
			if ch.ckpt {
				ch.state, _ = st.h.(encoding.BinaryMarshaler).MarshalBinary()
			}
			close(ch.hashed)
		}
	}()
	go func() {
		defer wg.Done()
		stopped := false
		for ch := range writeCh {
			if werr == nil {
				werr = c.writeChunk(p, st, ch)
			}
			<-ch.hashed
			end := ch.off + int64(ch.n)
			if werr == nil && ch.ckpt && ch.state != nil {
				if err := st.checkpoint(r, end, ch.state); err != nil {
					werr = writeErr(p, err)
				}
			}
			if werr == nil {
				done(end)
			} else if !stopped {
				stopped = true
				close(stop)
				abort(werr)
			}
			free <- ch
		}
	}()

	resumable := st.canResume(r)
	var rerr error
	sent := st.off
read:
	for limit < 0 || sent-st.off < limit {
		var ch *chunk
		select {
		case <-stop:
			break read
		default:
		}
		select {
		case ch = <-free:
		case <-stop:
			break read
		}
		// After a short read, realign: the next buffer then starts on a
		// block boundary and can be written with direct I/O.
		want := int64(len(ch.buf)) - sent%directAlign
		if limit >= 0 {
			want = min(want, limit-(sent-st.off))
		}
		n, err := fill(src, ch.buf[:want])
		if n > 0 {
			ch.n, ch.off = n, sent
			sent += int64(n)
			ch.ckpt = resumable && sent/c.opts.checkpointBytes > ch.off/c.opts.checkpointBytes
			ch.state = nil
			ch.hashed = make(chan struct{})
			hashCh <- ch
			writeCh <- ch
		} else {
			free <- ch
		}
		if sent > c.opts.MaxImageBytes {
			rerr = errcode.New(errcode.ImageDownloadFailed, "download %s: image is larger than the %s limit", redact(r.u), fmtBytes(c.opts.MaxImageBytes))
			break
		}
		if err != nil {
			if err != io.EOF {
				rerr = err
			}
			break
		}
	}
	close(hashCh)
	close(writeCh)
	wg.Wait()
	if werr != nil {
		// The writer failed: st.off stays at the last consistent point
		// only if nothing was written past it; callers discard st.
		return werr
	}
	st.off = sent
	return rerr
}

// fill reads into b until it is full or src fails.
func fill(src io.Reader, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := src.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// writeChunk writes ch at its offset, leaving holes for all-zero blocks,
// pushes writeback along and checks the free-space floor.
func (c *Cache) writeChunk(p *pool, st *partial, ch *chunk) error {
	b := ch.buf[:ch.n]
	for i := 0; i < len(b); {
		j := i
		for j < len(b) && isZero(b[j:min(j+sparseBlock, len(b))]) {
			j = min(j+sparseBlock, len(b))
		}
		k := j
		for k < len(b) && !isZero(b[k:min(k+sparseBlock, len(b))]) {
			k = min(k+sparseBlock, len(b))
		}
		if k > j {
			if err := st.writeAt(b[j:k], ch.off+int64(j)); err != nil {
				return writeErr(p, err)
			}
			st.fileSize = max(st.fileSize, ch.off+int64(k))
		}
		i = k
	}
	end := ch.off + int64(ch.n)
	if st.dirty && end-st.flushed >= writebackWindow {
		st.dirty = false
		fd := int(st.f.Fd())
		if err := syncRange(fd, st.flushed, end-st.flushed, unix.SYNC_FILE_RANGE_WRITE); err != nil {
			return writeErr(p, err)
		}
		if st.flushed > st.waited {
			if err := syncRange(fd, st.waited, st.flushed-st.waited,
				unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER); err != nil {
				return writeErr(p, err)
			}
			st.waited = st.flushed
		}
		st.flushed = end
	}
	if c.opts.MinFreeBytes > 0 {
		if _, free, err := fsSpace(p.dir); err == nil && free < c.opts.MinFreeBytes {
			return errcode.New(errcode.DiskFull, "pool %q: free space fell to %s, under the %s floor", p.name, fmtBytes(free), fmtBytes(c.opts.MinFreeBytes))
		}
	}
	return nil
}

// writeAt writes b at off: the block-aligned part with direct I/O when
// available (b starts block-aligned in memory whenever off is aligned: the
// buffers are aligned and sparse blocks are multiples of the block size),
// the rest through the page cache.
func (st *partial) writeAt(b []byte, off int64) error {
	if st.df != nil && off%directAlign == 0 {
		if n := len(b) &^ (directAlign - 1); n > 0 {
			if _, err := st.df.WriteAt(b[:n], off); err != nil {
				return err
			}
			b, off = b[n:], off+int64(n)
		}
	}
	if len(b) == 0 {
		return nil
	}
	st.dirty = true
	_, err := st.f.WriteAt(b, off)
	return err
}

// alignedBuffer returns n bytes starting on a directAlign boundary.
func alignedBuffer(n int) []byte {
	b := make([]byte, n+directAlign)
	skip := (directAlign - int(uintptr(unsafe.Pointer(unsafe.SliceData(b)))%directAlign)) % directAlign
	return b[skip : skip+n : skip+n]
}

// syncRange is sync_file_range(2); file systems that do not support it
// are left to the final fsync.
func syncRange(fd int, off, n int64, flags int) error {
	err := unix.SyncFileRange(fd, off, n, flags)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ESPIPE) || errors.Is(err, unix.ENOSYS) {
		return nil
	}
	return err
}

func isZero(b []byte) bool {
	if len(b) == 0 || b[0] != 0 || b[len(b)-1] != 0 {
		return false
	}
	return bytes.Equal(b, zeroBlock[:len(b)])
}

// writeErr turns a write failure into disk_full or internal.
func writeErr(p *pool, err error) error {
	if isNoSpace(err) {
		return errcode.Wrap(errcode.DiskFull, err, "pool %q", p.name)
	}
	return errcode.Wrap(errcode.Internal, fmt.Errorf("write ingest file: %w", err), "pool %q", p.name)
}
