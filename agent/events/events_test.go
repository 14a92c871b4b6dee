package events

import (
	"os"
	"path/filepath"
	"testing"

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
