package journal

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"go.uber.org/zap"
)

// The outcome log. Outcomes and acknowledgements are appended to one file,
// outcomes.log, a JSON entry per line, by the background writer: a batch
// costs one write and one fdatasync, and no file is created, renamed or
// removed for it. Once a task's outcome is in the log, the spare its
// started record used is blanked and is a spare again, so a host running
// tasks at a steady rate creates no file at all. The latest line of a
// task wins unless a file holds a later state (rank); a line cut by a
// crash (no newline) never happened and is cut off at the next Open. The
// log is rewritten with only what it must keep when it has grown to
// twice that, and after Remove or Compact dropped entries it holds.
const logName = "outcomes.log"

// logSlack is how many lines beyond twice its live entries the log may
// hold before the writer rewrites it.
const logSlack = 256

// openLog opens the log for appending (creating it), reads its entries
// into the journal's and cuts off a torn last line. It returns the files
// of entries whose latest record is a line: their started records, to
// blank or remove. Called from Open, before the writer runs.
func (j *Journal) openLog() (stale []string, err error) {
	p := filepath.Join(j.dir, logName)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	data, err := io.ReadAll(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("journal: read %s: %w", logName, err)
	}
	whole := bytes.LastIndexByte(data, '\n') + 1
	if whole < len(data) {
		j.log.Warn("journal: cutting a torn last line off the outcome log", zap.Int("bytes", len(data)-whole))
		if err := f.Truncate(int64(whole)); err != nil {
			f.Close()
			return nil, fmt.Errorf("journal: %w", err)
		}
	}
	if _, err := f.Seek(int64(whole), io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("journal: %w", err)
	}
	j.logFile, j.logLines = f, 0
	for line := range bytes.Lines(data[:whole]) {
		j.logLines++
		var e Entry
		if err := json.Unmarshal(line, &e); err != nil || e.TaskID == "" || e.State != Finished || e.Outcome == nil {
			j.log.Warn("journal: unreadable outcome line skipped", zap.Int("line", j.logLines), zap.Error(err))
			continue
		}
		if old, ok := j.entries[e.TaskID]; ok && !j.inLog[e.TaskID] && rank(old) > rank(e) {
			continue // a file holds a later state
		}
		j.entries[e.TaskID] = e
		j.inLog[e.TaskID] = true
	}
	for id := range j.inLog {
		if n, ok := j.names[id]; ok {
			stale = append(stale, n)
			delete(j.names, id)
		} else {
			stale = append(stale, fileName(id))
		}
	}
	return stale, nil
}

// dropStale gets rid of the files of tasks whose outcome is in the log: a
// spare is blanked and used again, any other file removed. A failure is
// logged: the file is then read again at the next Open, where the log's
// later state wins. wmu held (or Open).
func (j *Journal) dropStale(names []string) (spares []string) {
	for _, n := range names {
		p := filepath.Join(j.dir, n)
		if strings.HasPrefix(n, sparePrefix) {
			if err := blank(p); err == nil {
				spares = append(spares, n)
				continue
			} else if !errors.Is(err, os.ErrNotExist) {
				j.log.Warn("journal: blank a used spare", zap.String("file", n), zap.Error(err))
			}
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			j.log.Warn("journal: remove a record the outcome log replaced", zap.String("file", n), zap.Error(err))
		}
	}
	return spares
}

// blank makes the file at p a spare again: spareSize blanks, made
// durable, so that no record it held comes back after a crash.
func blank(p string) error { return overwrite(p, blanks, spareSize) }

// appendOutcomes writes batch to the log, a line each, and fdatasyncs it.
// A failed write is cut off again so that no torn line sits before later
// ones. wmu held.
func (j *Journal) appendOutcomes(batch []Entry) error {
	var buf bytes.Buffer
	for _, e := range batch {
		data, err := json.Marshal(e)
		if err != nil {
			return err
		}
		buf.Write(data)
		buf.WriteByte('\n')
	}
	end, err := j.logFile.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	if _, err = j.logFile.Write(buf.Bytes()); err == nil {
		err = ignoringEINTR(func() error { return syscall.Fdatasync(int(j.logFile.Fd())) })
	}
	if err != nil {
		if terr := j.logFile.Truncate(end); terr != nil {
			j.log.Error("journal: cut a failed write off the outcome log", zap.Error(terr))
		}
		return err
	}
	j.logLines += len(batch)
	return nil
}

// rewriteLog replaces the log with one line per entry it holds the latest
// record of: a temporary file, fsync, rename, directory fsync. wmu held.
func (j *Journal) rewriteLog() error {
	j.mu.Lock()
	var buf bytes.Buffer
	n := 0
	for id := range j.inLog {
		data, err := json.Marshal(j.entries[id])
		if err != nil {
			j.mu.Unlock()
			return err
		}
		buf.Write(data)
		buf.WriteByte('\n')
		n++
	}
	j.mu.Unlock()
	tmp, err := writeTemp(j.dir, logName, buf.Bytes())
	if err != nil {
		return err
	}
	p := filepath.Join(j.dir, logName)
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := syncDir(j.dir); err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		f.Close()
		return err
	}
	j.logFile.Close()
	j.logFile, j.logLines = f, n
	return nil
}

// logTooLong reports whether the log holds over twice the lines it must
// keep; mu held.
func (j *Journal) logTooLong() bool { return j.logLines > 2*len(j.inLog)+logSlack }

// rewriteIfDirty rewrites the log when Remove or Compact dropped an entry
// it held; wmu and mu held (the rewrite reads the entries itself).
func (j *Journal) rewriteIfDirty() error {
	if !j.logDirty {
		return nil
	}
	j.mu.Unlock()
	err := j.rewriteLog()
	j.mu.Lock()
	if err != nil {
		return fmt.Errorf("journal: rewrite %s: %w", logName, err)
	}
	j.logDirty = false
	return nil
}
