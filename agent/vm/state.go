package vm

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// state is what the engine persists per VM, in <state>/vms/<uuid>/vm.json.
type state struct {
	Spec      Spec            `json:"spec"`
	Status    string          `json:"status"`
	Reason    string          `json:"reason,omitempty"`
	PID       int             `json:"pid,omitempty"`
	StartedAt time.Time       `json:"started_at,omitempty"`
	CreatedAt time.Time       `json:"created_at"`
	UpdatedAt time.Time       `json:"updated_at"`
	Meta      json.RawMessage `json:"meta,omitempty"`
	// Next is the spec the VM gets at its next start (changes made while
	// it runs: CPU, memory).
	Next *Spec `json:"next,omitempty"`
	// Hot lists the disks attached while QEMU runs (cleared at start).
	Hot []HotDisk `json:"hot,omitempty"`
	// MediumSeq numbers CD-ROM medium changes (descriptor set ids).
	MediumSeq int `json:"medium_seq,omitempty"`
}

// writeFileAtomic writes data to path through a temp file in the same
// directory: write, fsync, rename, fsync the directory. A crash leaves the
// old or the new content, never a mix.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(mode); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
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
