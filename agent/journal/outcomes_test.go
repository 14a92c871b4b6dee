package journal_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/journal"
)

// names lists dir's files.
func names(t *testing.T, dir string) []string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, de := range des {
		out = append(out, de.Name())
	}
	return out
}

// run starts, finishes and acknowledges task id.
func run(t *testing.T, j *journal.Journal, id string) {
	t.Helper()
	if err := j.Start(entry(id)); err != nil {
		t.Fatal(err)
	}
	e := entry(id)
	e.Outcome, e.FinishedAt = success(), t0
	if err := j.Finish(e); err != nil {
		t.Fatal(err)
	}
	if err := j.Ack(id, t0); err != nil {
		t.Fatal(err)
	}
}

// TestOutcomeLog: outcomes and acknowledgements go to the outcome log and
// the spares their started records used are blanked and used again, so a
// steady stream of tasks creates no file; all of it survives a reopen.
func TestOutcomeLog(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "journal")
	j := open(t, dir, journal.Options{})
	run(t, j, "warm")
	j.Flush()
	before := names(t, dir)
	for i := range 100 {
		run(t, j, fmt.Sprintf("t%d", i))
		if i%3 == 0 {
			j.Flush()
		}
	}
	j.Flush()
	if after := names(t, dir); !slices.Equal(before, after) {
		t.Errorf("100 tasks changed the journal's files:\n before %v\n after  %v", before, after)
	}
	j.Close()
	j = open(t, dir, journal.Options{})
	if j.Len() != 101 {
		t.Fatalf("after reopen %d entries, want 101", j.Len())
	}
	for _, e := range j.List() {
		if !e.Acked() || e.Outcome == nil {
			t.Fatalf("after reopen %s: %+v, want acked with its outcome", e.TaskID, e)
		}
	}
}

// TestOutcomeLogCrashImages: a line cut by a crash never happened and is
// cut off; a started record the writer had yet to blank loses to the
// log's later line and is blanked at Open; a file holding a later state
// than the log wins.
func TestOutcomeLogCrashImages(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "journal")
	j := open(t, dir, journal.Options{})
	run(t, j, "done")
	if err := j.Start(entry("cut")); err != nil {
		t.Fatal(err)
	}
	j.Flush()
	started := copyDir(t, dir) // "cut" started: its spare holds its record
	j.Close()

	logPath := filepath.Join(started, "outcomes.log")
	fi, err := os.Stat(logPath)
	if err != nil {
		t.Fatal(err)
	}
	whole := fi.Size()
	// "cut" finished, its line torn; "blank" finished in the log while
	// its started record's spare was not blanked yet; "later" acked in a
	// file of an earlier version, finished in the log.
	line := func(id string) []byte {
		e := entry(id)
		e.State, e.Outcome, e.FinishedAt = journal.Finished, success(), t0
		b, _ := json.Marshal(e)
		return append(b, '\n')
	}
	blankStarted := entry("blank")
	b, _ := json.Marshal(blankStarted)
	slot := filepath.Join(started, "slot-blank.json")
	if err := os.WriteFile(slot, append(b, []byte(strings.Repeat(" ", 4096-len(b)))...), 0o600); err != nil {
		t.Fatal(err)
	}
	later := entry("later")
	later.State, later.Outcome, later.FinishedAt, later.AckedAt = journal.Finished, success(), t0, t0
	b, _ = json.Marshal(later)
	if err := os.WriteFile(filepath.Join(started, "task-later.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(line("blank"))
	f.Write(line("later"))
	torn := line("cut")
	f.Write(torn[:len(torn)/2])
	f.Close()

	c := open(t, started, journal.Options{})
	if e, ok := c.Get("cut"); !ok || e.State != journal.Started {
		t.Errorf("cut: %+v %v, want started (its outcome's line was torn)", e, ok)
	}
	if e, ok := c.Get("blank"); !ok || e.State != journal.Finished {
		t.Errorf("blank: %+v %v, want finished", e, ok)
	}
	if b, err := os.ReadFile(slot); err != nil || strings.TrimLeft(string(b), " ") != "" {
		t.Errorf("the spare of blank's started record after Open: %q %v, want blanks", b, err)
	}
	if e, ok := c.Get("later"); !ok || !e.Acked() {
		t.Errorf("later: %+v %v, want acked (its file's later state)", e, ok)
	}
	if e, ok := c.Get("done"); !ok || !e.Acked() {
		t.Errorf("done: %+v %v, want acked", e, ok)
	}
	want := whole + int64(len(line("blank"))+len(line("later")))
	if fi, err := os.Stat(logPath); err != nil || fi.Size() != want {
		t.Errorf("log after Open: %v %v, want the torn line cut off (%d bytes)", fi, err, want)
	}
	// The log goes on after the cut.
	e := entry("cut")
	e.Outcome, e.FinishedAt = success(), t0
	if err := c.Finish(e); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = open(t, started, journal.Options{})
	if e, ok := c.Get("cut"); !ok || e.State != journal.Finished {
		t.Errorf("cut after a second reopen: %+v %v, want finished", e, ok)
	}
}

// TestOutcomeLogCompact: entries Compact drops leave the outcome log,
// which is rewritten with the others.
func TestOutcomeLogCompact(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "journal")
	j := open(t, dir, journal.Options{MaxAcked: 3})
	for i := range 10 {
		run(t, j, fmt.Sprintf("t%d", i))
	}
	j.Flush()
	if n, err := j.Compact(t0); err != nil || n != 7 {
		t.Fatalf("compact: %d %v, want 7 removed", n, err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "outcomes.log"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "\n"); n != 3 {
		t.Errorf("the log holds %d lines after compaction, want 3", n)
	}
	j.Close()
	j = open(t, dir, journal.Options{})
	if j.Len() != 3 {
		t.Errorf("after reopen %d entries, want 3", j.Len())
	}
}
