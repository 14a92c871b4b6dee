package vm

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/otherix/otherix-agent/agent/hostdev"
)

// state is what the engine persists per VM, in <state>/vms/<uuid>/vm.json.
type state struct {
	Spec      Spec      `json:"spec"`
	Status    string    `json:"status"`
	Reason    string    `json:"reason,omitempty"`
	PID       int       `json:"pid,omitempty"`
	StartedAt time.Time `json:"started_at,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
	// Record is the agent's typed record of the VM; "meta" is its key
	// from when the engine kept it as opaque JSON (same fields).
	Record Record `json:"meta"`
	// Next is the spec the VM gets at its next start (changes made while
	// it runs: CPU, memory).
	Next *Spec `json:"next,omitempty"`
	// Hot lists the disks attached while QEMU runs (cleared at start).
	Hot []HotDisk `json:"hot,omitempty"`
	// MediumSeq numbers CD-ROM medium changes (descriptor set ids).
	MediumSeq int `json:"medium_seq,omitempty"`
	// HostPlan is what the spec's host devices resolved to for the running
	// QEMU, with what Acquire changed on the host: Release undoes it when
	// QEMU exits, even after an agent restart.
	HostPlan *hostdev.Plan `json:"host_plan,omitempty"`
	// UID is the uid and gid the VM's QEMU runs as (Config.UIDs).
	UID uint32 `json:"uid,omitempty"`
}

func loadState(path string) (*state, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("decode %s: %w", path, err)
	}
	return &st, nil
}
