package testguest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// pollMillis bounds how long a wait sleeps without news from inotify: it is
// the delay to notice a file that did not exist yet, or a cancelled context.
const pollMillis = 50

// Console follows a console log file that another process (QEMU's
// `-chardev file`) appends to. It reads only new bytes, woken by inotify,
// and keeps every complete line seen, with "\r" removed. The file need not
// exist yet; if it is replaced or shrinks (a new QEMU truncated it),
// reading starts again from its beginning.
//
// A Console has a read position: WaitFor finds lines after it and moves it.
// Its methods are safe for concurrent use.
type Console struct {
	path string

	mu      sync.Mutex
	file    os.FileInfo // the file last read
	off     int64       // bytes of it consumed
	partial []byte      // bytes after the last newline
	lines   []string    // complete lines seen
	pos     int         // read position, an index into lines
	ifd     int         // inotify descriptor, or -1
	wd      int         // inotify watch on path, or -1
	closed  bool
}

// OpenConsole returns a Console following path, positioned at its start.
// Close it to release its inotify descriptor.
func OpenConsole(path string) *Console {
	c := &Console{path: path, ifd: -1, wd: -1}
	if fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK); err == nil {
		c.ifd = fd
	}
	return c
}

// Path returns the followed file's path.
func (c *Console) Path() string { return c.path }

// Close releases the Console's resources. Lines stays usable.
func (c *Console) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	if c.ifd >= 0 {
		err := unix.Close(c.ifd)
		c.ifd, c.wd = -1, -1
		return err
	}
	return nil
}

// WaitFor returns the first complete line containing substr that comes
// after the read position, and moves the position past it. It waits for
// the line to appear until ctx is done; the error then wraps ctx.Err() and
// shows the console's last lines, and the position stays where it was.
func (c *Console) WaitFor(ctx context.Context, substr string) (string, error) {
	from := -1 // lines before it were searched by this call
	for {
		c.mu.Lock()
		err := c.readLocked()
		if err == nil {
			if from < c.pos || from > len(c.lines) {
				from = c.pos
			}
			for ; from < len(c.lines); from++ {
				if strings.Contains(c.lines[from], substr) {
					c.pos = from + 1
					line := c.lines[from]
					c.mu.Unlock()
					return line, nil
				}
			}
		}
		c.mu.Unlock()
		if err != nil {
			return "", fmt.Errorf("waiting for %q in %s: %w", substr, c.path, err)
		}
		if ctxErr := ctx.Err(); ctxErr != nil {
			return "", fmt.Errorf("waiting for %q in %s: %w; last lines:\n%s",
				substr, c.path, ctxErr, strings.Join(c.lastLines(15), "\n"))
		}
		if err := c.wait(ctx); err != nil {
			return "", fmt.Errorf("waiting for %q in %s: %w", substr, c.path, err)
		}
	}
}

// Lines returns every complete line seen so far, reading what is new first.
func (c *Console) Lines() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	_ = c.readLocked() // what was read before an error is still good
	return append([]string(nil), c.lines...)
}

// Text returns Lines joined with newlines, each line ended by one.
func (c *Console) Text() string {
	lines := c.Lines()
	if len(lines) == 0 {
		return ""
	}
	return strings.Join(lines, "\n") + "\n"
}

// Mark moves the read position past every line written so far, so that
// WaitFor only finds lines that come after this call.
func (c *Console) Mark() {
	c.mu.Lock()
	defer c.mu.Unlock()
	_ = c.readLocked()
	c.pos = len(c.lines)
}

// Pos returns the read position: the number of lines before it.
func (c *Console) Pos() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pos
}

// Seek sets the read position to pos lines from the start (clamped), e.g.
// back to a Pos taken earlier to look for another marker in the same span.
func (c *Console) Seek(pos int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pos = min(max(pos, 0), len(c.lines))
}

func (c *Console) lastLines(n int) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.lines[max(len(c.lines)-n, 0):]...)
}

// readLocked appends what the file gained since the last read. A missing
// file is no error: it has gained nothing yet.
func (c *Console) readLocked() error {
	if c.closed {
		return errors.New("console closed")
	}
	f, err := os.Open(c.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	// Replaced, or truncated by a new writer: start over.
	if (c.file != nil && !os.SameFile(c.file, fi)) || fi.Size() < c.off {
		c.off, c.partial = 0, nil
	}
	c.file = fi
	if fi.Size() == c.off {
		return nil
	}
	buf := make([]byte, fi.Size()-c.off)
	n, err := f.ReadAt(buf, c.off)
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	c.off += int64(n)
	data := append(c.partial, buf[:n]...)
	for {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break
		}
		c.lines = append(c.lines, strings.TrimRight(string(data[:i]), "\r"))
		data = data[i+1:]
	}
	c.partial = append([]byte(nil), data...)
	return nil
}

// wait returns when the file may have changed: an inotify event on it, or
// pollMillis at most.
func (c *Console) wait(ctx context.Context) error {
	c.mu.Lock()
	ifd := c.ifd
	if ifd >= 0 && c.wd < 0 {
		wd, err := unix.InotifyAddWatch(ifd, c.path,
			unix.IN_MODIFY|unix.IN_CLOSE_WRITE|unix.IN_ATTRIB|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF)
		if err == nil {
			c.wd = wd
			// Bytes written before the watch started raised no event.
			c.mu.Unlock()
			return nil
		}
	}
	c.mu.Unlock()
	if ifd < 0 { // no inotify: poll
		t := time.NewTimer(pollMillis * time.Millisecond)
		defer t.Stop()
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		return nil
	}
	fds := []unix.PollFd{{Fd: int32(ifd), Events: unix.POLLIN}}
	if _, err := unix.Poll(fds, pollMillis); err != nil && !errors.Is(err, unix.EINTR) {
		return fmt.Errorf("poll inotify: %w", err)
	}
	if fds[0].Revents&unix.POLLIN != 0 {
		c.drain(ifd)
	}
	return nil
}

// drain reads pending inotify events; one saying the watched file went
// away drops the watch, to be set again on the file now at the path.
func (c *Console) drain(ifd int) {
	var buf [4096]byte
	for {
		n, err := unix.Read(ifd, buf[:])
		if n <= 0 || err != nil {
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			// struct inotify_event: wd, mask, cookie, len, then len bytes of name
			mask := binary.NativeEndian.Uint32(buf[off+4:])
			nameLen := binary.NativeEndian.Uint32(buf[off+12:])
			if mask&(unix.IN_IGNORED|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0 {
				c.mu.Lock()
				if c.ifd == ifd && c.wd >= 0 {
					_, _ = unix.InotifyRmWatch(ifd, uint32(c.wd))
					c.wd = -1
				}
				c.mu.Unlock()
			}
			off += unix.SizeofInotifyEvent + int(nameLen)
		}
	}
}
