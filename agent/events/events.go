// Package events keeps each VM's history: a bounded list of the facts of
// its life (created, started, guest shutdown, crashed, restarted, ...),
// persisted per VM, numbered host-wide, and handed to the control plane
// through heartbeats until it acknowledges them.
package events

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/atomicfile"
)

// Defaults of Options.
const (
	DefaultPerVM   = 100
	DefaultPending = 1000
)

// Options tune a Store. Zero values take the defaults.
type Options struct {
	// PerVM bounds each VM's history (oldest dropped first).
	PerVM int
	// Pending bounds the events kept for the control plane while it does
	// not acknowledge them (oldest dropped first).
	Pending int
	// Observe, when set, is called with each new event's type (metrics).
	Observe func(typ string)
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Logger receives the errors of background writes (default none).
	Logger *zap.Logger
}

// Store is the host's VM event store. It is safe for concurrent use.
//
// Add returns once its event is on disk. AddSoon records at once in
// memory and writes within writeDelay, in the background, together with
// whatever else came meanwhile: a task's history entry (a pause, a reset)
// need not make its task wait for the disk. Either way an event reaches
// the control plane (Pending) only once it is on disk, so a crash never
// loses an event the control plane has seen, nor reuses its number.
type Store struct {
	dir string
	o   Options

	// wmu is held while files are written or removed; mu is never held
	// across a write.
	wmu     sync.Mutex
	mu      sync.Mutex
	seq     int64
	acked   int64
	saved   int64                    // every event up to this number is on disk
	byVM    map[string][]api.VMEvent // by VM uuid, oldest first
	pending []api.VMEvent            // seq > acked, oldest first
	dirty   map[string]bool          // VMs whose history changed since written
	stateOK bool                     // state.json holds acked (seq: see state)
	timer   *time.Timer              // armed while AddSoon's write is due
}

// state is <dir>/state.json: the last number the control plane
// acknowledged, and a floor of the numbering. The histories' files hold
// the numbers they use, so an event costs no write of the state: it is
// written when the control plane acknowledges, and before a history's
// file is removed with its numbers.
type state struct {
	Seq   int64 `json:"seq"`
	Acked int64 `json:"acked"`
}

// Open loads the store kept in dir (created 0700 when missing).
func Open(dir string, o Options) (*Store, error) {
	if o.PerVM <= 0 {
		o.PerVM = DefaultPerVM
	}
	if o.Pending <= 0 {
		o.Pending = DefaultPending
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	s := &Store{dir: dir, o: o, byVM: map[string][]api.VMEvent{}, dirty: map[string]bool{}, stateOK: true}
	var st state
	if b, err := os.ReadFile(filepath.Join(dir, "state.json")); err == nil {
		if err := json.Unmarshal(b, &st); err != nil {
			return nil, fmt.Errorf("events: %s: %w", filepath.Join(dir, "state.json"), err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("events: %w", err)
	}
	s.seq, s.acked = st.Seq, st.Acked
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	for _, ent := range ents {
		id, ok := strings.CutSuffix(ent.Name(), ".json")
		if !ok || id == "state" || ent.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, ent.Name()))
		if err != nil {
			return nil, fmt.Errorf("events: %w", err)
		}
		var evs []api.VMEvent
		if err := json.Unmarshal(b, &evs); err != nil {
			// A torn history is not worth refusing to start for.
			continue
		}
		s.byVM[id] = evs
		for _, e := range evs {
			s.seq = max(s.seq, e.Seq)
			if e.Seq > s.acked {
				s.pending = append(s.pending, e)
			}
		}
	}
	sort.Slice(s.pending, func(i, j int) bool { return s.pending[i].Seq < s.pending[j].Seq })
	s.trimPendingLocked()
	s.saved = s.seq
	return s, nil
}

// Add records an event, numbering and timing it, and returns it once it
// is on disk. A failure to persist keeps it in memory (the history is
// advisory), to be written with the next event, and is returned.
func (s *Store) Add(e api.VMEvent) (api.VMEvent, error) {
	e, err := s.record(e)
	if err != nil {
		return e, err
	}
	return e, s.write()
}

// AddSoon records an event at once, in memory, and writes it within
// writeDelay in the background (Flush waits for it). A write that fails
// is retried with the next event.
func (s *Store) AddSoon(e api.VMEvent) (api.VMEvent, error) {
	e, err := s.record(e)
	if err != nil {
		return e, err
	}
	s.mu.Lock()
	if s.timer == nil {
		s.timer = time.AfterFunc(writeDelay, s.writeSoon)
	}
	s.mu.Unlock()
	return e, nil
}

// writeDelay is how long AddSoon's events gather before they are written:
// a burst of tasks costs one write.
const writeDelay = 20 * time.Millisecond

// writeSoon is AddSoon's background write.
func (s *Store) writeSoon() {
	s.mu.Lock()
	s.timer = nil
	s.mu.Unlock()
	if err := s.write(); err != nil {
		s.o.Logger.Warn("persist vm events; retried with the next event", zap.Error(err))
	}
}

// Flush writes what AddSoon recorded and is not on disk yet.
func (s *Store) Flush() error {
	s.mu.Lock()
	if s.timer != nil && s.timer.Stop() {
		s.timer = nil
	}
	s.mu.Unlock()
	return s.write()
}

// record numbers and times an event and keeps it in memory.
func (s *Store) record(e api.VMEvent) (api.VMEvent, error) {
	if e.VMUUID == "" || e.VMUUID != filepath.Base(e.VMUUID) || e.VMUUID == "state" {
		return e, fmt.Errorf("events: bad vm uuid %q", e.VMUUID)
	}
	if e.Time.IsZero() {
		e.Time = s.o.Now().UTC()
	}
	s.mu.Lock()
	s.seq++
	e.Seq = s.seq
	h := append(s.byVM[e.VMUUID], e)
	if len(h) > s.o.PerVM {
		h = append([]api.VMEvent(nil), h[len(h)-s.o.PerVM:]...)
	}
	s.byVM[e.VMUUID] = h
	s.pending = append(s.pending, e)
	s.trimPendingLocked()
	s.dirty[e.VMUUID] = true
	s.mu.Unlock()
	if s.o.Observe != nil {
		s.o.Observe(e.Type)
	}
	return e, nil
}

// write writes every changed history and the state, each to a temporary
// file (fsync'd, renamed into place), then fsyncs the directory once.
// What fails to be written stays marked for the next write.
func (s *Store) write() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	seq := s.seq
	files := map[string][]byte{}
	for uuid := range s.dirty {
		if h, ok := s.byVM[uuid]; ok {
			files[uuid+".json"], _ = json.Marshal(h)
		}
	}
	clear(s.dirty)
	if !s.stateOK {
		files["state.json"], _ = json.Marshal(state{Seq: s.seq, Acked: s.acked})
		s.stateOK = true
	}
	s.mu.Unlock()
	if len(files) == 0 {
		return nil
	}
	var errs []error
	renamed := false
	for name, b := range files {
		err := atomicfile.WriteNoDirSync(filepath.Join(s.dir, name), b, 0o600)
		if err == nil {
			renamed = true
			delete(files, name)
			continue
		}
		errs = append(errs, err)
	}
	if renamed {
		if err := atomicfile.SyncDir(s.dir); err != nil {
			errs = append(errs, err)
			files = nil // nothing is known to be on disk: all again
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if files == nil || len(errs) > 0 {
		// Write everything again next time.
		for uuid := range s.byVM {
			s.dirty[uuid] = true
		}
		s.stateOK = false
		return errors.Join(errs...)
	}
	s.saved = max(s.saved, seq)
	return nil
}

// List returns a VM's history, oldest first.
func (s *Store) List(uuid string) []api.VMEvent {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]api.VMEvent{}, s.byVM[uuid]...)
}

// Pending returns up to n events the control plane has not acknowledged,
// oldest first.
func (s *Store) Pending(n int) []api.VMEvent {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Only what is on disk: a crash must not take back an event the
	// control plane has seen, nor give its number to another.
	on := sort.Search(len(s.pending), func(i int) bool { return s.pending[i].Seq > s.saved })
	n = min(n, on)
	return append([]api.VMEvent(nil), s.pending[:n]...)
}

// Ack records that the control plane has every event up to seq.
func (s *Store) Ack(seq int64) error {
	s.mu.Lock()
	if seq <= s.acked {
		s.mu.Unlock()
		return nil
	}
	s.acked = seq
	i := sort.Search(len(s.pending), func(i int) bool { return s.pending[i].Seq > seq })
	s.pending = append([]api.VMEvent(nil), s.pending[i:]...)
	s.stateOK = false
	s.mu.Unlock()
	return s.write()
}

// Remove forgets a deleted VM's history; events not yet acknowledged
// the control plane has not acknowledged stay pending while the agent
// runs (a restart loses them with the file).
func (s *Store) Remove(uuid string) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	delete(s.byVM, uuid)
	delete(s.dirty, uuid)
	st, _ := json.Marshal(state{Seq: s.seq, Acked: s.acked})
	s.mu.Unlock()
	// The numbers in the file go with it: state.json keeps the floor of
	// the numbering first.
	if err := atomicfile.Write(filepath.Join(s.dir, "state.json"), st, 0o600); err != nil {
		return err
	}
	if err := os.Remove(s.path(uuid)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (s *Store) path(uuid string) string {
	return filepath.Join(s.dir, filepath.Base(uuid)+".json")
}

func (s *Store) trimPendingLocked() {
	if over := len(s.pending) - s.o.Pending; over > 0 {
		s.pending = append([]api.VMEvent(nil), s.pending[over:]...)
	}
}
