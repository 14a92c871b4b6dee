package vm

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// bareEngine is an engine on fresh directories that never starts QEMU.
func bareEngine(t *testing.T, state string) *Engine {
	t.Helper()
	run, err := os.MkdirTemp("/tmp", "oxrec")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	e, err := New(Config{StateDir: state, RunDir: run, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

// TestRecordFromPreviousVersion: a vm.json written before the record was
// typed (the host's opaque "meta") loads into the same Record, and
// rewriting it keeps every field the previous version wrote.
func TestRecordFromPreviousVersion(t *testing.T) {
	const id = "6a0e7c52-3f7e-4c6b-9d1a-2b8f0c4e5d61"
	old, err := os.ReadFile("testdata/state/vm-before-record.json")
	if err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	path := filepath.Join(state, "vms", id, "vm.json")
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, old, 0o600); err != nil {
		t.Fatal(err)
	}
	e := bareEngine(t, state)
	v, err := e.Get("old")
	if err != nil {
		t.Fatalf("the previous version's VM did not load: %v", err)
	}
	if v.Status != "stopped" || v.Reason != "powered off" || v.Spec.UUID != id || len(v.Spec.CDROMs) != 2 {
		t.Errorf("view = %s %q %s %d cdroms", v.Status, v.Reason, v.Spec.UUID, len(v.Spec.CDROMs))
	}
	one := 1
	want := Record{
		ImageURL:      "http://images.example/guest.qcow2",
		ImageSHA256:   "5f0c6e1d2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5",
		ImageFormat:   "qcow2",
		Pool:          "default",
		DiskGiB:       2,
		Network:       "lan",
		CloudInit:     true,
		DesiredPhase:  "stopped",
		LastTask:      &api.TaskRef{ID: "t-42", Type: "vm.stop", Status: "success"},
		VNCPassword:   "c2VhbGVkLXBhc3N3b3Jk",
		Forwards:      []portfwd.Rule{{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: 2222, GuestPort: 22}},
		RootDiskIOBus: "VIRTIO-BLK",
		Autostart:     true,
		RestartPolicy: "always",
		Restarts:      2,
		Crashes:       []time.Time{time.Date(2026, 12, 1, 17, 30, 0, 0, time.UTC)},
		Devices:       []api.Device{{DevType: "CDROM", Source: "http://images.example/tools.iso", BootPriority: &one}},
		CDROMPins:     []CDROMPin{{Index: 1, Pool: "default", Digest: "9b1d0e2f3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5"}},
	}
	if !reflect.DeepEqual(v.Record, want) {
		t.Errorf("record =\n%+v\nwant\n%+v", v.Record, want)
	}

	if err := e.UpdateRecord("old", func(r *Record) { r.Autostart = false }); err != nil {
		t.Fatal(err)
	}
	now, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	before, after := metaOf(t, old), metaOf(t, now)
	if after["autostart"] != false {
		t.Errorf("autostart after the update = %v", after["autostart"])
	}
	delete(before, "autostart")
	delete(after, "autostart")
	if !reflect.DeepEqual(before, after) {
		t.Errorf("rewritten meta lost or changed fields:\nbefore %v\nafter  %v", before, after)
	}
	// And the engine reads its own file back the same.
	e.Close()
	e2 := bareEngine(t, state)
	v2, err := e2.Get("old")
	if err != nil {
		t.Fatal(err)
	}
	want.Autostart = false
	if !reflect.DeepEqual(v2.Record, want) {
		t.Errorf("record after a reload =\n%+v\nwant\n%+v", v2.Record, want)
	}
}

func metaOf(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var st struct {
		Meta map[string]any `json:"meta"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st.Meta
}

func defineBare(t *testing.T, e *Engine, name string, rec *Record) View {
	t.Helper()
	v, err := e.Define(context.Background(), Spec{Name: name, UUID: "0f8fad5b-d9cb-469f-a165-70867728950e", Arch: ArchAMD64, VCPUs: 1, MemoryMB: 128,
		Disks: []Disk{{Path: "/nonexistent/disk.raw", Format: "raw"}}}, rec)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestRecordUpdates: updates of different fields from many goroutines
// lose none; a view's record is a copy the caller may change.
func TestRecordUpdates(t *testing.T) {
	e := bareEngine(t, t.TempDir())
	defineBare(t, e, "r", &Record{Pool: "default", Devices: []api.Device{{DevType: api.DevDisk, Source: "vol"}}})
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e.UpdateRecord("r", func(r *Record) {
				if i%2 == 0 {
					r.Restarts++
				} else {
					r.CDROMPins = append(r.CDROMPins, CDROMPin{Index: i})
				}
			})
		}()
	}
	wg.Wait()
	v, _ := e.Get("r")
	if v.Record.Restarts != 10 || len(v.Record.CDROMPins) != 10 {
		t.Errorf("after 10 + 10 updates: restarts %d, pins %d", v.Record.Restarts, len(v.Record.CDROMPins))
	}
	v.Record.Devices[0].Source = "changed"
	if v, _ := e.Get("r"); v.Record.Devices[0].Source != "vol" {
		t.Errorf("a view's record shares the engine's: %q", v.Record.Devices[0].Source)
	}
	if err := e.UpdateRecord("missing", func(*Record) {}); errcode.Of(err) != errcode.NotFound {
		t.Errorf("UpdateRecord of a missing VM = %v, want not_found", err)
	}
}

// TestTxnHoldsTheVM: while a Txn runs, every other op on the VM answers
// conflict; the Txn's own record changes and ops go through; the Txn's
// error is the op's.
func TestTxnHoldsTheVM(t *testing.T) {
	e := bareEngine(t, t.TempDir())
	defineBare(t, e, "x", nil)
	ctx := context.Background()
	inside := make(chan struct{})
	leave := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, err := e.Do(ctx, "x", "cdrom_change", func(tx *Txn) error {
			close(inside)
			<-leave
			return tx.UpdateRecord(func(r *Record) { r.Pool = "p2" })
		})
		done <- err
	}()
	<-inside
	if _, err := e.Start(ctx, "x"); errcode.Of(err) != errcode.Conflict {
		t.Errorf("Start during a Txn = %v, want conflict", err)
	}
	if _, err := e.Do(ctx, "x", "disk_attach", func(*Txn) error { return nil }); errcode.Of(err) != errcode.Conflict {
		t.Errorf("a second Txn = %v, want conflict", err)
	}
	close(leave)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if v, _ := e.Get("x"); v.Record.Pool != "p2" {
		t.Errorf("pool = %q after the Txn", v.Record.Pool)
	}
	if _, err := e.Do(ctx, "x", "delete", func(tx *Txn) error { return tx.Delete(ctx) }); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Get("x"); errcode.Of(err) != errcode.NotFound {
		t.Errorf("Get after a Txn's delete = %v, want not_found", err)
	}
}
