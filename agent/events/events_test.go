package events

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

const (
	vmA = "11111111-1111-4111-8111-111111111111"
	vmB = "22222222-2222-4222-8222-222222222222"
)

func types(evs []api.VMEvent) []string {
	var out []string
	for _, e := range evs {
		out = append(out, e.Type)
	}
	return out
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestStoreHistoryPendingAckAndReopen(t *testing.T) {
	dir := t.TempDir()
	var observed []string
	s, err := Open(dir, Options{PerVM: 3, Observe: func(typ string) { observed = append(observed, typ) }})
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range []string{api.EventCreated, api.EventStarted, api.EventCrashed, api.EventRestarted} {
		if _, err := s.Add(api.VMEvent{VMUUID: vmA, VMName: "a", Type: typ}); err != nil {
			t.Fatal(err)
		}
	}
	e, _ := s.Add(api.VMEvent{VMUUID: vmB, VMName: "b", Type: api.EventCreated})
	if e.Seq != 5 || e.Time.IsZero() {
		t.Errorf("5th event: seq %d time %v, want 5 and a time", e.Seq, e.Time)
	}
	if got, want := types(s.List(vmA)), []string{api.EventStarted, api.EventCrashed, api.EventRestarted}; !equal(got, want) {
		t.Errorf("history of a = %v, want the newest 3 %v", got, want)
	}
	if len(observed) != 5 {
		t.Errorf("observed %d events, want 5", len(observed))
	}
	if got := s.Pending(2); len(got) != 2 || got[0].Seq != 1 || got[1].Seq != 2 {
		t.Errorf("Pending(2) = %+v, want seq 1 and 2", got)
	}
	if err := s.Ack(3); err != nil {
		t.Fatal(err)
	}
	if got := s.Pending(10); len(got) != 2 || got[0].Seq != 4 {
		t.Errorf("after Ack(3), pending = %+v, want seq 4 and 5", got)
	}

	// Reopened: the numbering goes on, acknowledged events are not sent
	// again, histories are kept; a deleted VM's history is gone but its
	// unacknowledged events still reach the control plane.
	if _, err := s.Add(api.VMEvent{VMUUID: vmB, VMName: "b", Type: api.EventDeleted}); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(vmB); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, vmB+".json")); !os.IsNotExist(err) {
		t.Errorf("history file of a deleted vm: %v, want it gone", err)
	}
	s2, err := Open(dir, Options{PerVM: 3})
	if err != nil {
		t.Fatal(err)
	}
	if got := types(s2.List(vmA)); len(got) != 3 {
		t.Errorf("history after reopen = %v", got)
	}
	if got := s2.List(vmB); len(got) != 0 {
		t.Errorf("deleted vm's history after reopen = %v, want none", got)
	}
	if got := s2.Pending(10); len(got) != 1 || got[0].Seq != 4 {
		t.Errorf("pending after reopen = %+v, want seq 4 (a's restarted; b's file is gone)", got)
	}
	if e, _ := s2.Add(api.VMEvent{VMUUID: vmA, Type: api.EventStopped}); e.Seq != 7 {
		t.Errorf("seq after reopen = %d, want 7", e.Seq)
	}
	if _, err := s2.Add(api.VMEvent{VMUUID: "../x", Type: api.EventStopped}); err == nil {
		t.Error("an event of a uuid that is a path was persisted")
	}
}

// AddSoon's events are in the history at once and on disk after the
// background write (or Flush); the control plane is offered only what is
// on disk, so a crash never takes back an event it has seen.
func TestStoreAddSoon(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Add(api.VMEvent{VMUUID: vmA, Type: api.EventCreated}); err != nil {
		t.Fatal(err)
	}
	e, err := s.AddSoon(api.VMEvent{VMUUID: vmA, Type: api.EventPaused})
	if err != nil || e.Seq != 2 {
		t.Fatalf("AddSoon = %+v, %v; want seq 2", e, err)
	}
	if got := types(s.List(vmA)); !equal(got, []string{api.EventCreated, api.EventPaused}) {
		t.Errorf("history before the write = %v", got)
	}
	if got := s.Pending(10); len(got) != 1 || got[0].Seq != 1 {
		t.Errorf("pending before the write = %+v, want seq 1 only", got)
	}
	// A crash now (a reopen without Flush) loses the paused event and
	// gives its number again: the control plane never had it.
	crashed, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := types(crashed.List(vmA)); !equal(got, []string{api.EventCreated}) {
		t.Errorf("history after a crash = %v, want created", got)
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := s.Pending(10); len(got) != 2 {
		t.Errorf("pending after Flush = %+v, want seq 1 and 2", got)
	}
	s2, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := types(s2.List(vmA)); !equal(got, []string{api.EventCreated, api.EventPaused}) {
		t.Errorf("history after Flush and reopen = %v", got)
	}
	if e, _ := s2.Add(api.VMEvent{VMUUID: vmA, Type: api.EventResumed}); e.Seq != 3 {
		t.Errorf("seq after reopen = %d, want 3", e.Seq)
	}

	// Without Flush, the background write lands by itself.
	if _, err := s2.AddSoon(api.VMEvent{VMUUID: vmB, Type: api.EventReset}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(s2.Pending(10)) != 4 {
		if time.Now().After(deadline) {
			t.Fatalf("the background write did not land: pending %+v", s2.Pending(10))
		}
		time.Sleep(writeDelay)
	}
	if _, err := os.Stat(filepath.Join(dir, vmB+".json")); err != nil {
		t.Errorf("b's history after the background write: %v", err)
	}
	if _, err := s2.AddSoon(api.VMEvent{VMUUID: "../x", Type: api.EventReset}); err == nil {
		t.Error("AddSoon took an event of a uuid that is a path")
	}
}
