package main

import (
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/api"
)

// TestTaskCommands: task list (of one VM), task get and task cancel speak
// GET /v1/tasks?vm=, GET /v1/tasks/{id} and POST /v1/tasks/{id}/cancel; a
// cancel the server refuses exits 1 with its code.
func TestTaskCommands(t *testing.T) {
	h := newHarness(t)
	h.api.AddVM(api.VM{Name: "web-1", Status: "stopped"})
	h.api.AddVM(api.VM{Name: "web-2", Status: "stopped"})
	h.must("vm", "start", "web-1")
	h.must("vm", "start", "web-2")

	r := h.must("task", "list", "--vm", "web-1")
	if !strings.Contains(r.stdout, "task-1") || strings.Contains(r.stdout, "task-2") || !strings.HasPrefix(r.stdout, "ID ") {
		t.Fatalf("task list --vm web-1:\n%s", r.stdout)
	}
	if r := h.must("task", "list", "-o", "json"); !strings.Contains(r.stdout, `"task-2"`) || !strings.Contains(r.stdout, `"task-1"`) {
		t.Fatalf("task list -o json:\n%s", r.stdout)
	}
	if r := h.must("task", "cancel", "task-1"); !strings.Contains(r.stdout, "status: cancelled") || !strings.Contains(r.stdout, "error: cancelled:") {
		t.Fatalf("task cancel:\n%s", r.stdout)
	}
	if r := h.must("task", "get", "task-1"); !strings.Contains(r.stdout, "id: task-1\ntype: vm.start\nvm: web-1\nstatus: cancelled") {
		t.Fatalf("task get:\n%s", r.stdout)
	}
	r = h.run("", "task", "cancel", "task-1")
	if r.code != 1 || !strings.Contains(r.stderr, "conflict") {
		t.Fatalf("a second cancel: %d %q", r.code, r.stderr)
	}
	if r := h.run("", "task", "get"); r.code == 0 || !strings.Contains(r.stderr, "missing task id") {
		t.Fatalf("task get without an id: %d %q", r.code, r.stderr)
	}
	var lines []string
	for _, req := range h.api.Requests(true) {
		if strings.HasPrefix(req.Path, "/v1/tasks") {
			lines = append(lines, req.Method+" "+req.Path+"?"+req.Query)
		}
	}
	want := "GET /v1/tasks?vm=web-1"
	if len(lines) == 0 || lines[0] != want {
		t.Fatalf("requests: %q, want the first %q", lines, want)
	}
}
