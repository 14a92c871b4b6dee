package journal_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/journal"
)

var t0 = time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)

func open(t *testing.T, dir string, opts journal.Options) *journal.Journal {
	t.Helper()
	j, err := journal.Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return j
}

func entry(id string) journal.Entry {
	return journal.Entry{TaskID: id, Type: api.TaskStart, VMName: "web-1", VMUUID: "u-1", Attempt: 1, LeaseID: "l-1", StartedAt: t0}
}

func success() *journal.Outcome {
	return &journal.Outcome{Status: api.TaskSuccess, VM: &api.VM{Name: "web-1", UUID: "u-1", Status: api.StatusRunning}}
}

func TestLifecycleSurvivesReopen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "journal")
	j := open(t, dir, journal.Options{})
	if err := j.Start(entry("t1")); err != nil {
		t.Fatal(err)
	}
	if err := j.Start(entry("t2")); err != nil {
		t.Fatal(err)
	}
	e := entry("t1")
	e.Outcome, e.FinishedAt = success(), t0.Add(time.Second)
	if err := j.Finish(e); err != nil {
		t.Fatal(err)
	}
	if err := j.Start(entry("t1")); !errors.Is(err, journal.ErrFinished) {
		t.Fatalf("start of a finished task: got %v, want ErrFinished", err)
	}
	if err := j.Finish(e); !errors.Is(err, journal.ErrFinished) {
		t.Fatalf("second finish: got %v, want ErrFinished", err)
	}
	if err := j.Ack("t2", t0); err == nil {
		t.Fatal("ack of an unfinished task succeeded")
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if err := j.Start(entry("t3")); !errors.Is(err, journal.ErrClosed) {
		t.Fatalf("start after close: %v", err)
	}

	j = open(t, dir, journal.Options{})
	got, ok := j.Get("t1")
	if !ok || got.State != journal.Finished || got.Outcome.VM.Status != api.StatusRunning || got.Acked() {
		t.Fatalf("t1 after reopen: %+v", got)
	}
	if got, ok := j.Get("t2"); !ok || got.State != journal.Started {
		t.Fatalf("t2 after reopen: %+v", got)
	}
	if err := j.Ack("t1", t0.Add(2*time.Second)); err != nil {
		t.Fatal(err)
	}
	j.Close()
	j = open(t, dir, journal.Options{})
	if got, _ := j.Get("t1"); !got.Acked() {
		t.Fatal("ack lost across reopen")
	}
	if got := len(j.List()); got != 2 {
		t.Fatalf("%d entries, want 2", got)
	}
}

func TestPrivateFilesAndLock(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "journal")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	j := open(t, dir, journal.Options{})
	if err := j.Start(entry("t1")); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %04o, want 0700", fi.Mode().Perm())
	}
	des, _ := os.ReadDir(dir)
	for _, de := range des {
		fi, _ := de.Info()
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %04o, want 0600", de.Name(), fi.Mode().Perm())
		}
	}
	if _, err := journal.Open(dir, journal.Options{}); !errors.Is(err, journal.ErrLocked) {
		t.Fatalf("second open: got %v, want ErrLocked", err)
	}
	j.Close()
	j2, err := journal.Open(dir, journal.Options{})
	if err != nil {
		t.Fatalf("open after close: %v", err)
	}
	j2.Close()
}

func TestLeftoversAndCorruption(t *testing.T) {
	dir := t.TempDir()
	j := open(t, dir, journal.Options{})
	weird := "a/../b c" // not a safe file name: hashed
	if err := j.Start(entry(weird)); err != nil {
		t.Fatal(err)
	}
	if err := j.Start(entry("ok")); err != nil {
		t.Fatal(err)
	}
	j.Close()
	des, _ := os.ReadDir(dir)
	for _, de := range des {
		if strings.Contains(de.Name(), "..") || strings.Contains(de.Name(), " ") {
			t.Errorf("unsafe file name %q", de.Name())
		}
	}
	// A torn write (never renamed) and a corrupt entry.
	if err := os.WriteFile(filepath.Join(dir, "task-x.json.tmp-123"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	okFile := fileOf(t, dir, "ok")
	if err := os.WriteFile(okFile, []byte("{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	j = open(t, dir, journal.Options{})
	if _, ok := j.Get("ok"); ok {
		t.Error("corrupt entry loaded")
	}
	if _, ok := j.Get(weird); !ok {
		t.Error("entry with an unsafe id lost")
	}
	if _, err := os.Stat(okFile + ".corrupt"); err != nil {
		t.Errorf("corrupt entry not set aside: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "task-x.json.tmp-123")); !os.IsNotExist(err) {
		t.Errorf("temporary file left: %v", err)
	}
}

func TestCompact(t *testing.T) {
	dir := t.TempDir()
	j := open(t, dir, journal.Options{Retention: 24 * time.Hour, MaxAcked: 3})
	finish := func(id string, acked time.Time) {
		t.Helper()
		e := entry(id)
		e.Outcome = success()
		if err := j.Finish(e); err != nil {
			t.Fatal(err)
		}
		if !acked.IsZero() {
			if err := j.Ack(id, acked); err != nil {
				t.Fatal(err)
			}
		}
	}
	finish("old-acked", t0)
	finish("old-unacked", time.Time{})
	for i := range 5 {
		finish(fmt.Sprintf("new-%d", i), t0.Add(47*time.Hour+time.Duration(i)*time.Minute))
	}
	old := entry("old-started")
	old.StartedAt = t0
	if err := j.Start(old); err != nil {
		t.Fatal(err)
	}
	fresh := entry("fresh-started")
	fresh.StartedAt = t0.Add(47 * time.Hour)
	if err := j.Start(fresh); err != nil {
		t.Fatal(err)
	}
	n, err := j.Compact(t0.Add(48 * time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	// old-acked and old-started by age, new-0 and new-1 beyond MaxAcked.
	if n != 4 {
		t.Errorf("removed %d, want 4", n)
	}
	var ids []string
	for _, e := range j.List() {
		ids = append(ids, e.TaskID)
	}
	want := "fresh-started new-2 new-3 new-4 old-unacked"
	if got := strings.Join(slices.Sorted(slices.Values(ids)), " "); got != want {
		t.Errorf("kept %q, want %q", got, want)
	}
	j.Close()
	j = open(t, dir, journal.Options{})
	if j.Len() != 5 {
		t.Errorf("after reopen %d entries, want 5", j.Len())
	}
}

// TestDurabilitySplit: a started record is on disk when Start returns; an
// outcome and its acknowledgement are in memory at once and on disk after
// Flush; a removal while a write is pending leaves no file behind.
func TestDurabilitySplit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "journal")
	j := open(t, dir, journal.Options{})
	readState := func(id string) string {
		e, ok := onDisk(t, dir, id)
		switch {
		case !ok:
			return "absent"
		case e.Acked():
			return "acked"
		}
		return string(e.State)
	}
	if err := j.Start(entry("d1")); err != nil {
		t.Fatal(err)
	}
	if got := readState("d1"); got != "started" {
		t.Fatalf("after Start: %s on disk", got)
	}
	e := entry("d1")
	e.Outcome, e.FinishedAt = success(), t0
	if err := j.Finish(e); err != nil {
		t.Fatal(err)
	}
	if got, _ := j.Get("d1"); got.State != journal.Finished {
		t.Fatalf("after Finish: %s in memory", got.State)
	}
	if err := j.Ack("d1", t0); err != nil {
		t.Fatal(err)
	}
	j.Flush()
	if got := readState("d1"); got != "acked" {
		t.Fatalf("after Flush: %s on disk", got)
	}
	// A re-run of a started task replaces its record.
	if err := j.Start(entry("d2")); err != nil {
		t.Fatal(err)
	}
	if err := j.Start(entry("d2")); err != nil {
		t.Fatal(err)
	}
	e = entry("d2")
	e.Outcome, e.FinishedAt = success(), t0
	j.Finish(e)
	if err := j.Remove("d2"); err != nil {
		t.Fatal(err)
	}
	j.Flush()
	if got := readState("d2"); got != "absent" {
		t.Fatalf("removed entry: %s on disk", got)
	}
	// Close writes what is pending.
	e = entry("d3")
	e.Outcome, e.FinishedAt = success(), t0
	j.Finish(e)
	j.Close()
	if got := readState("d3"); got != "finished" {
		t.Fatalf("after Close: %s on disk", got)
	}
}

// onDisk returns task id's latest record in dir, as a crash would leave
// it: its file's, or the outcome log's last line of it.
func onDisk(t *testing.T, dir, id string) (journal.Entry, bool) {
	t.Helper()
	var last journal.Entry
	found := false
	if f := fileOf(t, dir, id); f != "" {
		b, err := os.ReadFile(f)
		if err == nil && json.Unmarshal(b, &last) == nil {
			found = true
		}
	}
	b, _ := os.ReadFile(filepath.Join(dir, "outcomes.log"))
	for _, line := range strings.Split(string(b), "\n") {
		var e journal.Entry
		if json.Unmarshal([]byte(line), &e) == nil && e.TaskID == id {
			last, found = e, true
		}
	}
	return last, found
}

// fileOf returns the file holding task id's entry in dir ("" when none).
func fileOf(t *testing.T, dir, id string) string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, de := range des {
		if !strings.HasSuffix(de.Name(), ".json") {
			continue
		}
		p := filepath.Join(dir, de.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		var e journal.Entry
		if json.Unmarshal(b, &e) == nil && e.TaskID == id {
			return p
		}
	}
	return ""
}

// copyDir copies the journal's files as a crash would leave them: what
// is in them now, whatever the background writer has yet to do.
func copyDir(t *testing.T, dir string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "crashed")
	if err := os.Mkdir(out, 0o700); err != nil {
		t.Fatal(err)
	}
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, de := range des {
		if de.Name() == "LOCK" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, de.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(out, de.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// TestSpares: a started record goes into a spare made in advance (one
// fdatasync on Start's path, the spare's size unchanged: no metadata to
// commit); more starts than spares, or a record larger than a spare, fall
// back to created files; the spares are made again in the background. A
// crash right after Start keeps the record; a blank or empty spare (the
// latter from earlier versions) is a spare again, a torn one is set
// aside.
func TestSpares(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "journal")
	j := open(t, dir, journal.Options{})
	blank := func(p string) bool {
		b, err := os.ReadFile(p)
		return err == nil && len(b) == 4096 && strings.TrimLeft(string(b), " ") == ""
	}
	spares := func(dir string) []string {
		des, _ := os.ReadDir(dir)
		var out []string
		for _, de := range des {
			if strings.HasPrefix(de.Name(), "slot-") && blank(filepath.Join(dir, de.Name())) {
				out = append(out, de.Name())
			}
		}
		return out
	}
	ready := spares(dir)
	if len(ready) == 0 {
		t.Fatal("no spare files after Open")
	}
	var ids []string
	for i := range len(ready) + 2 {
		id := fmt.Sprintf("s%d", i)
		ids = append(ids, id)
		if err := j.Start(entry(id)); err != nil {
			t.Fatal(err)
		}
	}
	if f := filepath.Base(fileOf(t, dir, ids[0])); !strings.HasPrefix(f, "slot-") {
		t.Errorf("first started record in %s, want a spare", f)
	} else if fi, err := os.Stat(filepath.Join(dir, f)); err != nil || fi.Size() != 4096 {
		t.Errorf("spare holding a record: %v %v, want its 4096 bytes kept", fi, err)
	}
	if f := filepath.Base(fileOf(t, dir, ids[len(ids)-1])); f != "task-"+ids[len(ids)-1]+".json" {
		t.Errorf("record past the spares in %s, want a file of its own", f)
	}
	crashed := copyDir(t, dir)
	j.Flush()
	if n := len(spares(dir)); n != len(ready) {
		t.Errorf("%d spares after the background write, want %d", n, len(ready))
	}
	// The crash image: every started record, the spares it had.
	torn := filepath.Join(crashed, "slot-torn.json")
	if err := os.WriteFile(torn, []byte(`{"task_id":"x","sta`+strings.Repeat(" ", 4000)), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(crashed, "slot-empty.json")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c := open(t, crashed, journal.Options{})
	for _, id := range ids {
		if e, ok := c.Get(id); !ok || e.State != journal.Started {
			t.Errorf("after a crash right after Start, %s: %+v %v", id, e, ok)
		}
	}
	if c.Len() != len(ids) {
		t.Errorf("after the crash %d entries, want %d", c.Len(), len(ids))
	}
	if _, err := os.Stat(torn + ".corrupt"); err != nil {
		t.Errorf("torn spare not set aside: %v", err)
	}
	if _, err := os.Stat(empty); err != nil {
		t.Errorf("an empty spare of an earlier version: %v, want it kept as a spare", err)
	}
	// A record larger than a spare gets a file of its own.
	big := entry("big")
	big.VMName = strings.Repeat("v", 5000)
	if err := c.Start(big); err != nil {
		t.Fatal(err)
	}
	if f := filepath.Base(fileOf(t, crashed, "big")); f != "task-big.json" {
		t.Errorf("a record larger than a spare in %s, want a file of its own", f)
	}
	ids = append(ids, "big")
	// Finished, acked, removed and compacted records in spares behave as
	// any: the outcome replaces the record in its file.
	e := entry(ids[0])
	e.Outcome, e.FinishedAt = success(), t0
	if err := c.Finish(e); err != nil {
		t.Fatal(err)
	}
	if err := c.Remove(ids[1]); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = open(t, crashed, journal.Options{})
	if e, ok := c.Get(ids[0]); !ok || e.State != journal.Finished {
		t.Errorf("finished record in a spare after reopen: %+v %v", e, ok)
	}
	if _, ok := c.Get(ids[1]); ok {
		t.Errorf("removed record in a spare came back")
	}
}
