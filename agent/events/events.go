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
}

// Store is the host's VM event store. It is safe for concurrent use.
type Store struct {
	dir string
	o   Options

	mu      sync.Mutex
	seq     int64
	acked   int64
	byVM    map[string][]api.VMEvent // by VM uuid, oldest first
	pending []api.VMEvent            // seq > acked, oldest first
}

// state is <dir>/state.json: the last number given and the last one the
// control plane acknowledged.
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
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	s := &Store{dir: dir, o: o, byVM: map[string][]api.VMEvent{}}
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
	return s, nil
}

// Add records an event, numbering and timing it, and returns it. A failure
// to persist keeps it in memory (the history is advisory) and is returned.
func (s *Store) Add(e api.VMEvent) (api.VMEvent, error) {
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
	err := errors.Join(s.saveStateLocked(), s.saveVMLocked(e.VMUUID))
	s.mu.Unlock()
	if s.o.Observe != nil {
		s.o.Observe(e.Type)
	}
	return e, err
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
	if n > len(s.pending) {
		n = len(s.pending)
	}
	return append([]api.VMEvent(nil), s.pending[:n]...)
}

// Ack records that the control plane has every event up to seq.
func (s *Store) Ack(seq int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if seq <= s.acked {
		return nil
	}
	s.acked = seq
	i := sort.Search(len(s.pending), func(i int) bool { return s.pending[i].Seq > seq })
	s.pending = append([]api.VMEvent(nil), s.pending[i:]...)
	return s.saveStateLocked()
}

// Remove forgets a deleted VM's history; events not yet acknowledged
// the control plane has not acknowledged stay pending while the agent
// runs (a restart loses them with the file).
func (s *Store) Remove(uuid string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.byVM, uuid)
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

func (s *Store) saveStateLocked() error {
	b, _ := json.Marshal(state{Seq: s.seq, Acked: s.acked})
	return atomicfile.Write(filepath.Join(s.dir, "state.json"), b, 0o600)
}

func (s *Store) saveVMLocked(uuid string) error {
	if uuid == "" || uuid != filepath.Base(uuid) || uuid == "state" {
		return fmt.Errorf("events: bad vm uuid %q", uuid)
	}
	b, _ := json.Marshal(s.byVM[uuid])
	return atomicfile.Write(s.path(uuid), b, 0o600)
}
