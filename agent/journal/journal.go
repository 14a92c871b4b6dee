// Package journal records, on disk, each control-plane task this host ran
// and its outcome, so that a task delivered again (the protocol delivers
// at least once) is never executed again: its stored outcome is re-sent.
//
// A started task is a small JSON file; outcomes and acknowledgements are
// lines of one outcome log (outcomes.go). The files and the directory
// are private (0600/0700) and the directory is locked against a second
// agent. An entry goes started → finished → acked; Compact drops acked
// entries after a retention period.
//
// Durability is spent where exactly-once effect needs it. Start returns
// only once the started record is on disk, so a task's effect never
// happens unrecorded. It costs one fdatasync of data alone: the record
// overwrites the start of a spare, a file of spareSize blanks the journal
// wrote and made durable (file and directory) in advance, in the
// background, so the write changes neither the file's size nor its
// blocks and the file system has no metadata to commit (JSON allows the
// blanks after the record). Without a spare, or for a record larger than
// one, the record's file is created and fsync'd, and then its directory.
// The outcome (Finish) and the acknowledgement (Ack) are recorded in
// memory at once and written durably in the background, in order (lines
// appended to the outcome log, one fdatasync a batch), so the completion
// need not wait for the disk; the spare of the started record is then
// blanked and used again. A crash before that write keeps the task's
// started record intact, and the restart policy decides
// (docs/protocol.md).
package journal

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/flock"
)

// State is where a task stands on this host.
type State string

const (
	// Started: execution began (recorded before the executor is called).
	Started State = "started"
	// Finished: the outcome is known and must be delivered.
	Finished State = "finished"
)

// Outcome is a finished task's result as sent to the control plane.
type Outcome struct {
	Status string     `json:"status"` // api.TaskSuccess, api.TaskFailed, api.TaskCancelled
	VM     *api.VM    `json:"vm,omitempty"`
	Error  *api.Error `json:"error,omitempty"`
	// Output is a result other than a VM view (size-capped: see
	// api.MaxScreenshot and api.MaxConsoleTail).
	Output *api.TaskOutput `json:"output,omitempty"`
}

// Entry is one task's record. It never holds the task's spec (which may
// carry user-data).
type Entry struct {
	TaskID     string    `json:"task_id"`
	Type       string    `json:"type"`
	VMName     string    `json:"vm_name"`
	VMUUID     string    `json:"vm_uuid"`
	Attempt    int       `json:"attempt"`
	LeaseID    string    `json:"lease_id"`
	State      State     `json:"state"`
	StartedAt  time.Time `json:"started_at,omitzero"`
	FinishedAt time.Time `json:"finished_at,omitzero"`
	Outcome    *Outcome  `json:"outcome,omitempty"`
	// AckedAt is when the control plane acknowledged the outcome.
	AckedAt time.Time `json:"acked_at,omitzero"`
}

// Acked reports whether the control plane acknowledged the outcome.
func (e Entry) Acked() bool { return !e.AckedAt.IsZero() }

// Options tune a journal.
type Options struct {
	// Retention is how long an acked entry (or a started one that never
	// finished) is kept; default 7 days. The control plane must not
	// deliver a task again after acknowledging its outcome; retention only
	// guards against its mistakes.
	Retention time.Duration
	// MaxAcked caps how many acked entries are kept; default 10000.
	MaxAcked int
	Logger   *zap.Logger
}

// Errors.
var (
	ErrClosed   = errors.New("journal is closed")
	ErrFinished = errors.New("task already finished")
	ErrNotFound = errors.New("task not in journal")
	ErrLocked   = errors.New("journal is in use by another process")
)

// Journal is an open journal directory. It is safe for concurrent use.
type Journal struct {
	dir  string
	opts Options
	log  *zap.Logger
	lock *os.File

	mu      sync.Mutex
	entries map[string]Entry
	// names maps a task to its file when that is not fileName(task): a
	// spare its started record went into.
	names  map[string]string
	spares []string // blank, durable files ready for started records
	closed bool
	// The outcome log (outcomes.go): inLog holds the tasks whose latest
	// record is a line of it; logDirty that Remove or Compact dropped
	// one, so the log must be rewritten without it.
	logFile  *os.File
	logLines int
	inLog    map[string]bool
	logDirty bool
	// Background writes: the latest entry of each task to write, in the
	// order first queued. wmu is held while a file is written or
	// removed, so that a removal never races a pending write.
	wmu     sync.Mutex
	pending map[string]Entry
	queue   []string
	writing bool
	kick    chan struct{}
	drained chan struct{} // closed and replaced when the queue empties
	stop    chan struct{}
	stopped chan struct{}
}

const (
	suffix    = ".json"
	tmpSuffix = ".tmp"
	lockName  = "LOCK"
	// spare files are named slot-*.json; while blank they are spares.
	sparePrefix = "slot-"
	// spareTarget is how many spares the journal keeps ready: a burst of
	// that many tasks starts at one fdatasync each. The writer makes the
	// used ones again every writeDelay at most, so 16 cover 800 starts a
	// second; 4 ran out at one sync op every 5 ms, and each start past
	// them paid a file creation and two fsyncs.
	spareTarget = 16
	// spareSize is a spare's size: blanks a started record overwrites
	// (one is a few hundred bytes; a larger one gets a file of its own).
	spareSize = 4096
)

// blanks is a spare's content.
var blanks = bytes.Repeat([]byte{' '}, spareSize)

// isSpare reports whether a slot file's content is a spare's: blanks, or
// nothing (the spares of earlier versions).
func isSpare(data []byte) bool { return len(bytes.TrimLeft(data, " ")) == 0 }

// Open opens (creating) the journal in dir and loads its entries.
// Leftover temporary files are removed; an unreadable entry is renamed
// aside with a ".corrupt" suffix and logged, not fatal.
func Open(dir string, opts Options) (*Journal, error) {
	if opts.Retention <= 0 {
		opts.Retention = 7 * 24 * time.Hour
	}
	if opts.MaxAcked <= 0 {
		opts.MaxAcked = 10000
	}
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	if err := flock.Exclusive(lock); err != nil {
		lock.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("journal %s: %w", dir, ErrLocked)
		}
		return nil, fmt.Errorf("journal %s: lock: %w", dir, err)
	}
	j := &Journal{dir: dir, opts: opts, log: log, lock: lock, entries: map[string]Entry{}, names: map[string]string{},
		inLog: map[string]bool{}, pending: map[string]Entry{}, kick: make(chan struct{}, 1), drained: make(chan struct{}),
		stop: make(chan struct{}), stopped: make(chan struct{})}
	if err := j.load(); err != nil {
		lock.Close()
		return nil, err
	}
	stale, err := j.openLog()
	if err != nil {
		lock.Close()
		return nil, err
	}
	j.spares = append(j.spares, j.dropStale(stale)...)
	if made := j.makeSpares(); len(made) > 0 {
		if err := syncDir(dir); err != nil {
			j.logFile.Close()
			lock.Close()
			return nil, fmt.Errorf("journal: %w", err)
		}
		j.spares = append(j.spares, made...)
	}
	go j.writer()
	return j, nil
}

func (j *Journal) load() error {
	des, err := os.ReadDir(j.dir)
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	for _, de := range des {
		name := de.Name()
		p := filepath.Join(j.dir, name)
		switch {
		case strings.Contains(name, tmpSuffix):
			// A write that never reached its rename: it never happened.
			if err := os.Remove(p); err != nil {
				return fmt.Errorf("journal: %w", err)
			}
		case strings.HasSuffix(name, suffix):
			data, err := os.ReadFile(p)
			spare := strings.HasPrefix(name, sparePrefix)
			if err == nil && spare && isSpare(data) {
				j.spares = append(j.spares, name)
				continue
			}
			var e Entry
			if err == nil {
				err = json.Unmarshal(data, &e)
			}
			if err == nil && (e.TaskID == "" || !spare && fileName(e.TaskID) != name) {
				err = errors.New("entry does not match its file name")
			}
			if old, dup := j.entries[e.TaskID]; err == nil && dup {
				if rank(old) >= rank(e) {
					err = errors.New("a second entry of a task, not newer")
				} else if rerr := j.setAside(filepath.Join(j.dir, j.nameOf(e.TaskID)), errors.New("a second entry of a task, older")); rerr != nil {
					return rerr
				}
			}
			if err != nil {
				if rerr := j.setAside(p, err); rerr != nil {
					return rerr
				}
				continue
			}
			j.entries[e.TaskID] = e
			if name != fileName(e.TaskID) {
				j.names[e.TaskID] = name
			} else {
				delete(j.names, e.TaskID)
			}
		}
	}
	return nil
}

// setAside renames an unreadable entry's file with a ".corrupt" suffix.
func (j *Journal) setAside(p string, why error) error {
	j.log.Warn("journal entry unreadable, set aside", zap.String("file", p), zap.Error(why))
	if err := os.Rename(p, p+".corrupt"); err != nil {
		return fmt.Errorf("journal: set aside %s: %w", p, err)
	}
	return nil
}

// rank orders an entry's states: started, finished, acked.
func rank(e Entry) int {
	switch {
	case e.Acked():
		return 2
	case e.State == Finished:
		return 1
	}
	return 0
}

// nameOf is the file of a task's entry; mu held (or loading).
func (j *Journal) nameOf(id string) string {
	if n, ok := j.names[id]; ok {
		return n
	}
	return fileName(id)
}

// makeSpares creates the spares missing from spareTarget, each spareSize
// blanks, fsync'd, and returns their names; the caller fsyncs the
// directory before using them. A failure is logged: Start then creates
// files.
func (j *Journal) makeSpares() []string {
	j.mu.Lock()
	need := spareTarget - len(j.spares)
	j.mu.Unlock()
	var made []string
	for range need {
		f, err := os.CreateTemp(j.dir, sparePrefix+"*"+suffix)
		if err == nil {
			err = writeSyncClose(f, f.Name(), blanks)
		}
		if err != nil {
			j.log.Warn("journal: make a spare file", zap.Error(err))
			break
		}
		made = append(made, filepath.Base(f.Name()))
	}
	return made
}

var safeID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// fileName maps a task id to its file: the id itself when it is a safe
// file name, else a hash of it.
func fileName(id string) string {
	if safeID.MatchString(id) {
		return "task-" + id + suffix
	}
	sum := sha256.Sum256([]byte(id))
	return "task-h" + hex.EncodeToString(sum[:16]) + suffix
}

// Get returns a task's entry.
func (j *Journal) Get(taskID string) (Entry, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	e, ok := j.entries[taskID]
	return e, ok
}

// List returns every entry, oldest start first.
func (j *Journal) List() []Entry {
	j.mu.Lock()
	out := make([]Entry, 0, len(j.entries))
	for _, e := range j.entries {
		out = append(out, e)
	}
	j.mu.Unlock()
	sort.Slice(out, func(a, b int) bool {
		if !out[a].StartedAt.Equal(out[b].StartedAt) {
			return out[a].StartedAt.Before(out[b].StartedAt)
		}
		return out[a].TaskID < out[b].TaskID
	})
	return out
}

// Len returns the number of entries.
func (j *Journal) Len() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.entries)
}

// Start durably records that e's task is about to be executed: it returns
// once the record is on disk. It fails with ErrFinished when the task
// already has an outcome: a finished task must never run again. A started
// entry is overwritten (a re-run). The caller runs one Start at a time
// per task.
func (j *Journal) Start(e Entry) error {
	if e.TaskID == "" {
		return errors.New("journal: empty task id")
	}
	j.mu.Lock()
	old, had := j.entries[e.TaskID]
	closed := j.closed
	j.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if had && old.State == Finished {
		return fmt.Errorf("journal: start %s: %w", e.TaskID, ErrFinished)
	}
	e.State, e.Outcome, e.FinishedAt, e.AckedAt = Started, nil, time.Time{}, time.Time{}
	data, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("journal: encode %s: %w", e.TaskID, err)
	}
	// A new task's record goes into a spare (one fsync), else into a
	// file created in place (fsync of the file and of the directory). A
	// torn record can only come from a crash before the fsync returned,
	// i.e. before the task ran: an empty spare is a spare again, anything
	// else is set aside at the next Open. A re-run replaces its record
	// atomically.
	j.mu.Lock()
	name, spare := j.nameOf(e.TaskID), ""
	if !had && len(j.spares) > 0 && len(data) <= spareSize {
		spare = j.spares[len(j.spares)-1]
		j.spares = j.spares[:len(j.spares)-1]
		name = spare
	}
	j.mu.Unlock()
	switch {
	case had:
		err = writeFile(j.dir, name, data)
	case spare != "":
		err = fillSpare(j.dir, spare, data)
		j.kickWriter() // make another
	default:
		err = createFile(j.dir, name, data)
	}
	if err != nil {
		return fmt.Errorf("journal: write %s: %w", e.TaskID, err)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return ErrClosed
	}
	j.entries[e.TaskID] = e
	if spare != "" {
		j.names[e.TaskID] = spare
	}
	return nil
}

// Finish records a task's outcome, in memory at once and on disk in the
// background (Flush waits for it). e carries the task's fields (used when
// the task has no entry yet, e.g. one cancelled before it started) and its
// Outcome and FinishedAt.
func (j *Journal) Finish(e Entry) error {
	if e.TaskID == "" || e.Outcome == nil {
		return errors.New("journal: finish needs a task id and an outcome")
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if old, ok := j.entries[e.TaskID]; ok {
		if old.State == Finished {
			return fmt.Errorf("journal: finish %s: %w", e.TaskID, ErrFinished)
		}
		if e.StartedAt.IsZero() {
			e.StartedAt = old.StartedAt
		}
	}
	e.State, e.AckedAt = Finished, time.Time{}
	return j.putLater(e)
}

// Ack records that the control plane acknowledged a task's outcome, in
// memory at once and on disk in the background.
func (j *Journal) Ack(taskID string, at time.Time) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	e, ok := j.entries[taskID]
	if !ok {
		return fmt.Errorf("journal: ack %s: %w", taskID, ErrNotFound)
	}
	if e.State != Finished {
		return fmt.Errorf("journal: ack %s: task is %s, not finished", taskID, e.State)
	}
	e.AckedAt = at
	return j.putLater(e)
}

// Remove forgets a task, e.g. one handed back unfinished for redelivery.
func (j *Journal) Remove(taskID string) error {
	j.wmu.Lock()
	defer j.wmu.Unlock()
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return ErrClosed
	}
	if _, ok := j.entries[taskID]; !ok {
		return nil
	}
	if err := j.remove(taskID); err != nil {
		return err
	}
	if err := j.rewriteIfDirty(); err != nil {
		return err
	}
	return syncDir(j.dir)
}

// Compact removes acked entries acked before now-Retention, started
// entries older than that (their task was never delivered again), and the
// oldest acked entries beyond MaxAcked. Unacked outcomes are kept.
func (j *Journal) Compact(now time.Time) (int, error) {
	j.wmu.Lock()
	defer j.wmu.Unlock()
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return 0, ErrClosed
	}
	cutoff := now.Add(-j.opts.Retention)
	var acked []Entry
	removed := 0
	for id, e := range j.entries {
		old := (e.Acked() && e.AckedAt.Before(cutoff)) || (e.State == Started && e.StartedAt.Before(cutoff))
		if old {
			if err := j.remove(id); err != nil {
				return removed, err
			}
			removed++
			continue
		}
		if e.Acked() {
			acked = append(acked, e)
		}
	}
	if extra := len(acked) - j.opts.MaxAcked; extra > 0 {
		sort.Slice(acked, func(a, b int) bool { return acked[a].AckedAt.Before(acked[b].AckedAt) })
		for _, e := range acked[:extra] {
			if err := j.remove(e.TaskID); err != nil {
				return removed, err
			}
			removed++
		}
	}
	if err := j.rewriteIfDirty(); err != nil {
		return removed, err
	}
	if removed > 0 {
		if err := syncDir(j.dir); err != nil {
			return removed, err
		}
	}
	return removed, nil
}

// Close writes what is pending and releases the directory lock. Later
// calls fail with ErrClosed.
func (j *Journal) Close() error {
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return nil
	}
	j.closed = true
	j.mu.Unlock()
	close(j.stop)
	<-j.stopped
	j.logFile.Close()
	return j.lock.Close()
}

// Flush waits until every outcome and acknowledgement recorded so far is
// on disk, and the spares are made again.
func (j *Journal) Flush() {
	j.mu.Lock()
	refill := len(j.spares) < spareTarget && !j.closed
	if len(j.queue) == 0 && !j.writing && !refill {
		j.mu.Unlock()
		return
	}
	ch := j.drained
	j.mu.Unlock()
	if refill {
		j.kickWriter()
	}
	<-ch
}

// putLater records e in memory and queues its durable write; mu held.
func (j *Journal) putLater(e Entry) error {
	if j.closed {
		return ErrClosed
	}
	j.entries[e.TaskID] = e
	if _, ok := j.pending[e.TaskID]; !ok {
		j.queue = append(j.queue, e.TaskID)
	}
	j.pending[e.TaskID] = e
	j.kickWriter()
	return nil
}

// kickWriter wakes the background writer.
func (j *Journal) kickWriter() {
	select {
	case j.kick <- struct{}{}:
	default:
	}
}

// writeDelay is how long the writer lets records gather before it writes
// them: an outcome and its acknowledgement, a few milliseconds apart, then
// cost one write, and a burst of tasks one directory fsync.
const writeDelay = 20 * time.Millisecond

// writer writes queued entries until Close; it drains the queue before it
// returns.
func (j *Journal) writer() {
	defer close(j.stopped)
	for {
		select {
		case <-j.kick:
		case <-j.stop:
			j.writeQueued()
			return
		}
		t := time.NewTimer(writeDelay)
		select {
		case <-t.C:
		case <-j.stop:
			t.Stop()
		}
		j.writeQueued()
	}
}

// writeQueued writes queued entries in batches until the queue is empty;
// the first batch also makes the spares Start used up.
func (j *Journal) writeQueued() {
	refill := true
	for {
		j.wmu.Lock()
		j.mu.Lock()
		refill = refill && len(j.spares) < spareTarget && !j.closed
		if len(j.queue) == 0 && !refill {
			j.writing = false
			close(j.drained)
			j.drained = make(chan struct{})
			j.mu.Unlock()
			j.wmu.Unlock()
			return
		}
		batch := make([]Entry, 0, len(j.queue))
		names := make([]string, 0, len(j.queue))
		for _, id := range j.queue {
			batch = append(batch, j.pending[id])
			names = append(names, j.nameOf(id))
		}
		j.queue = nil
		clear(j.pending)
		j.writing = true
		j.mu.Unlock()
		made := j.writeOutcomes(batch, names, refill)
		refill = false
		j.mu.Lock()
		j.spares = append(j.spares, made...)
		long := j.logTooLong()
		j.mu.Unlock()
		if long {
			if err := j.rewriteLog(); err != nil {
				j.log.Error("journal: rewrite the outcome log", zap.Error(err))
			}
		}
		j.wmu.Unlock()
	}
}

// writeOutcomes writes a batch of outcomes and acknowledgements to the
// outcome log, then blanks the spares of their started records (spares
// again) or removes their files, and makes the spares still missing when
// spares is set. It returns the spares made. Should the log fail, each
// entry's file is replaced as before the log existed (writeBatch). wmu
// held.
func (j *Journal) writeOutcomes(batch []Entry, names []string, spares bool) []string {
	if err := j.appendOutcomes(batch); err != nil {
		j.log.Error("journal: append to the outcome log; writing entry files instead", zap.Error(err))
		made := j.writeBatch(batch, names, spares)
		j.mu.Lock()
		for _, e := range batch {
			delete(j.inLog, e.TaskID) // its file holds the latest record
		}
		j.mu.Unlock()
		return made
	}
	j.mu.Lock()
	for _, e := range batch {
		j.inLog[e.TaskID] = true
		delete(j.names, e.TaskID)
	}
	j.mu.Unlock()
	blanked := j.dropStale(names)
	j.mu.Lock()
	j.spares = append(j.spares, blanked...)
	j.mu.Unlock()
	if !spares {
		return nil
	}
	made := j.makeSpares() // those still missing
	if len(made) > 0 {
		if err := syncDir(j.dir); err != nil {
			j.log.Error("journal: fsync directory", zap.Error(err))
			return nil
		}
	}
	return made
}

// writeBatch replaces each entry's file (names[i] is batch[i]'s) durably
// and, when spares is set, makes the missing spares: every temporary file written and
// fsync'd, then renamed, the spares created and fsync'd, then one fsync
// of the directory. It returns the spares made.
func (j *Journal) writeBatch(batch []Entry, names []string, spares bool) []string {
	type done struct{ tmp, name string }
	var ready []done
	for i, e := range batch {
		data, err := json.Marshal(e)
		var tmp string
		if err == nil {
			tmp, err = writeTemp(j.dir, names[i], data)
		}
		if err != nil {
			j.log.Error("journal: write entry", zap.String("task", e.TaskID), zap.String("state", string(e.State)), zap.Error(err))
			continue
		}
		ready = append(ready, done{tmp, names[i]})
	}
	for _, d := range ready {
		if err := os.Rename(d.tmp, filepath.Join(j.dir, d.name)); err != nil {
			j.log.Error("journal: write entry", zap.String("file", d.name), zap.Error(err))
			os.Remove(d.tmp)
		}
	}
	var made []string
	if spares {
		made = j.makeSpares()
	}
	if len(ready) > 0 || len(made) > 0 {
		if err := syncDir(j.dir); err != nil {
			j.log.Error("journal: fsync directory", zap.Error(err))
			return nil // the spares are not known durable: not used
		}
	}
	return made
}

// remove deletes an entry's file, or marks the outcome log for a rewrite
// without it (rewriteIfDirty), and forgets any pending write of it
// (directory fsync left to the caller when batching); wmu and mu held.
func (j *Journal) remove(id string) error {
	if _, ok := j.pending[id]; ok {
		delete(j.pending, id)
		j.queue = slices.DeleteFunc(j.queue, func(q string) bool { return q == id })
	}
	if j.inLog[id] {
		delete(j.inLog, id)
		j.logDirty = true
	} else if err := os.Remove(filepath.Join(j.dir, j.nameOf(id))); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("journal: remove %s: %w", id, err)
	}
	delete(j.entries, id)
	delete(j.names, id)
	return nil
}

// writeFile replaces dir/name atomically and durably with data, mode 0600.
func writeFile(dir, name string, data []byte) error {
	tmp, err := writeTemp(dir, name, data)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(dir)
}

// writeTemp writes data to a new temporary file beside dir/name, mode
// 0600, fsync'd, and returns its path.
func writeTemp(dir, name string, data []byte) (path string, err error) {
	f, err := os.CreateTemp(dir, name+tmpSuffix+"-*")
	if err != nil {
		return "", err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = f.Chmod(0o600); err != nil {
		return "", err
	}
	if _, err = f.Write(data); err != nil {
		return "", err
	}
	if err = f.Sync(); err != nil {
		return "", err
	}
	return tmp, f.Close()
}

// fillSpare writes data over the start of the spare dir/name (blanks,
// durable) and fdatasyncs it. A failed write removes the spare.
func fillSpare(dir, name string, data []byte) error {
	p := filepath.Join(dir, name)
	// The record's bytes alone: the spare's size and blocks are already
	// durable, so fdatasync has no metadata to wait for.
	err := overwrite(p, data, 0)
	if pe := (*fs.PathError)(nil); err != nil && !(errors.As(err, &pe) && pe.Op == "open") {
		os.Remove(p) // opened, then failed: a torn record is no spare
	}
	return err
}

// overwrite writes data at the start of the existing file p, cuts the
// file to size when size > 0, and fdatasyncs it.
func overwrite(p string, data []byte, size int64) error {
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(data, 0)
	if err == nil && size > 0 {
		err = f.Truncate(size)
	}
	if err == nil {
		err = ignoringEINTR(func() error { return syscall.Fdatasync(int(f.Fd())) })
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// ignoringEINTR calls fn again while it fails with EINTR, as os.File's
// own methods do.
func ignoringEINTR(fn func() error) error {
	for {
		if err := fn(); err != syscall.EINTR {
			return err
		}
	}
}

// writeSyncClose writes data to f (the file at p), fsyncs and closes it;
// a failure closes and removes the file.
func writeSyncClose(f *os.File, p string, data []byte) (err error) {
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(p)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	return f.Close()
}

// createFile creates dir/name (which must not exist) with data, mode
// 0600, and makes it durable: fsync of the file, then of the directory.
// A failed write removes the file.
func createFile(dir, name string, data []byte) error {
	p := filepath.Join(dir, name)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return writeFile(dir, name, data)
	}
	if err != nil {
		return err
	}
	if err := writeSyncClose(f, p, data); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
