package cpserver_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
)

// TestCancelTask: the point of no return. A pending task ends cancelled
// at once; a leased create is cancellable until it reports a phase past
// its download; a leased task of another type, or an ended one, is not.
func TestCancelTask(t *testing.T) {
	ctx := context.Background()
	s := &cpserver.Server{DesiredFollowsTasks: true}
	enqueue := func(id, typ string) {
		if _, err := s.Enqueue(ctx, cpserver.Task{Task: api.Task{ID: id, Type: typ, VMName: "v-" + id, VMUUID: "u-" + id}}); err != nil {
			t.Fatal(err)
		}
	}
	enqueue("create", api.TaskCreate)
	enqueue("start", api.TaskStart)
	enqueue("late", api.TaskCreate)
	leased, err := s.Lease(ctx, protocol.LeaseRequest{Max: 3})
	if err != nil || len(leased.Tasks) != 3 {
		t.Fatalf("lease: %+v %v", leased, err)
	}
	lease := map[string]string{}
	for _, l := range leased.Tasks {
		lease[l.ID] = l.LeaseID
	}
	if _, err := s.Progress(ctx, "late", protocol.ProgressRequest{LeaseID: lease["late"], Progress: &api.Progress{Phase: "boot"}}); err != nil {
		t.Fatal(err)
	}
	enqueue("pending", api.TaskCreate)

	got, err := s.CancelTask(ctx, "pending")
	if err != nil || got.Status != api.TaskCancelled {
		t.Fatalf("pending: %+v %v", got, err)
	}
	if _, ok := s.UUIDOf(ctx, "v-pending"); ok {
		t.Error("a cancelled pending create is still desired")
	}
	if _, err := s.Progress(ctx, "create", protocol.ProgressRequest{LeaseID: lease["create"], Progress: &api.Progress{Phase: "download", Done: 1, Total: 9}}); err != nil {
		t.Fatal(err)
	}
	got, err = s.CancelTask(ctx, "create")
	if err != nil || got.Status != api.TaskRunning || !got.Cancel {
		t.Fatalf("a downloading create: %+v %v", got, err)
	}
	if p, _ := s.Progress(ctx, "create", protocol.ProgressRequest{LeaseID: lease["create"]}); !p.Cancelled {
		t.Error("the agent is not told to cancel the downloading create")
	}
	for _, id := range []string{"start", "late", "pending"} {
		if _, err := s.CancelTask(ctx, id); !errors.Is(err, cpserver.ErrNotCancellable) {
			t.Errorf("%s: %v, want ErrNotCancellable", id, err)
		}
	}
}

// TestCancelQueued: a leased task the agent reported queued is
// cancellable, whatever its type, until it reports started; a queued
// report overtaken by a later phase is ignored. The cancel reaches the
// agent in its next lease answer, once.
func TestCancelQueued(t *testing.T) {
	ctx := context.Background()
	s := &cpserver.Server{}
	for _, id := range []string{"q", "s"} {
		if _, err := s.Enqueue(ctx, cpserver.Task{Task: api.Task{ID: id, Type: api.TaskStop, VMName: "v", VMUUID: "u"}}); err != nil {
			t.Fatal(err)
		}
	}
	leased, err := s.Lease(ctx, protocol.LeaseRequest{Max: 2})
	if err != nil || len(leased.Tasks) != 2 {
		t.Fatalf("lease: %+v %v", leased, err)
	}
	report := func(i int, phase string) {
		t.Helper()
		l := leased.Tasks[i]
		if _, err := s.Progress(ctx, l.ID, protocol.ProgressRequest{LeaseID: l.LeaseID, Progress: &api.Progress{Phase: phase}}); err != nil {
			t.Fatal(err)
		}
	}
	report(0, api.ProgressQueued)
	report(1, api.ProgressQueued)
	report(1, api.ProgressStarted)
	report(1, api.ProgressQueued) // overtaken: ignored
	if _, err := s.CancelTask(ctx, "s"); !errors.Is(err, cpserver.ErrNotCancellable) {
		t.Errorf("started: %v, want ErrNotCancellable", err)
	}
	got, err := s.CancelTask(ctx, "q")
	if err != nil || got.Status != api.TaskRunning || !got.Cancel {
		t.Fatalf("queued: %+v %v", got, err)
	}
	l, err := s.Lease(ctx, protocol.LeaseRequest{Max: 1, WaitSeconds: 1})
	if err != nil || len(l.Tasks) != 0 || len(l.Cancel) != 1 || l.Cancel[0] != "q" {
		t.Fatalf("lease after the cancel: %+v %v", l, err)
	}
	if l, _ := s.Lease(ctx, protocol.LeaseRequest{Max: 1}); len(l.Cancel) != 0 {
		t.Errorf("the cancel was sent twice: %+v", l)
	}
	if p, _ := s.Progress(ctx, "q", protocol.ProgressRequest{LeaseID: leased.Tasks[0].LeaseID, Progress: &api.Progress{Phase: api.ProgressStarted}}); !p.Cancelled {
		t.Error("the start report of a cancelled queued task is not answered cancelled")
	}
}

// TestNoRouteEnvelope: a path the protocol does not have is 404 and a
// wrong method 405 with Allow, both in the error envelope.
func TestNoRouteEnvelope(t *testing.T) {
	s := &cpserver.Server{}
	for _, tc := range []struct {
		method, path string
		status       int
		code, allow  string
	}{
		{"POST", "/v1/agent/nothing", 404, "not_found", ""},
		{"GET", protocol.PathLease, 405, "validation_failed", "POST"},
	} {
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, httptest.NewRequest(tc.method, tc.path, nil))
		var env api.ErrorEnvelope
		if err := json.Unmarshal(rec.Body.Bytes(), &env); err != nil || rec.Code != tc.status || env.Error.Code != tc.code ||
			rec.Header().Get("Allow") != tc.allow || rec.Header().Get("Content-Type") != "application/json" {
			t.Errorf("%s %s: %d %q Allow %q: %s", tc.method, tc.path, rec.Code, env.Error.Code, rec.Header().Get("Allow"), rec.Body)
		}
	}
}
