// Package protocol is the agent's side of the control-plane contract: the
// wire types of /v1/agent/... and an HTTP client for them.
//
// The contract is documented in docs/protocol.md. In short: the agent
// registers, long-polls for task leases, extends a lease with progress
// reports, completes each task exactly once in effect, and heartbeats its
// VM inventory; the heartbeat answer carries each VM's desired phase.
//
// Field names are snake_case. New fields may be added to any message; a
// receiver ignores fields it does not know. A change that breaks an old
// receiver bumps Version and the path prefix.
package protocol

import (
	"encoding/json"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// Version is the protocol version the agent speaks. It is sent in every
// request body as protocol_version and matches the /v1 path prefix.
const Version = 1

// Paths of the contract, relative to the control plane's base URL.
const (
	PathRegister  = "/v1/agent/register"
	PathLease     = "/v1/agent/tasks/lease"
	PathHeartbeat = "/v1/agent/heartbeat"
	// PathTaskPrefix is followed by {task_id}/progress or {task_id}/complete.
	PathTaskPrefix = "/v1/agent/tasks/"
)

// ProgressPath returns the progress path of a task.
func ProgressPath(taskID string) string { return PathTaskPrefix + escape(taskID) + "/progress" }

// CompletePath returns the completion path of a task.
func CompletePath(taskID string) string { return PathTaskPrefix + escape(taskID) + "/complete" }

// Node states in heartbeats.
const (
	NodeReady    = "ready"    // pulling tasks
	NodeDraining = "draining" // shutting down: no new leases, in-flight ops finishing
)

// NodeInfo describes this host at registration.
type NodeInfo struct {
	Name         string        `json:"name"`
	AgentVersion string        `json:"agent_version"`
	QEMUVersion  string        `json:"qemu_version"`
	Arch         string        `json:"arch"` // host arch: amd64, arm64
	KVM          bool          `json:"kvm"`  // /dev/kvm usable; false means TCG only
	CPUs         int           `json:"cpus"`
	MemoryMB     int64         `json:"memory_mb"`
	Pools        []PoolInfo    `json:"pools"`
	Networks     []NetworkInfo `json:"networks"`
	Arches       []string      `json:"arches"`    // guest arches this host can run
	Firmwares    []string      `json:"firmwares"` // firmware names, e.g. "bios", "uefi"
	// DefaultPool is the pool a create without one takes on this node
	// (config default_pool; "" for none).
	DefaultPool string `json:"default_pool,omitempty"`
	// APIURL is where this node serves the /v1 API to the other hosts of
	// its cluster (cluster mode); APICertSHA256 the sha256 of its TLS
	// certificate (hex), which they pin.
	APIURL        string `json:"api_url,omitempty"`
	APICertSHA256 string `json:"api_cert_sha256,omitempty"`
}

// PoolInfo is a storage pool on this host.
type PoolInfo struct {
	Name       string `json:"name"`
	TotalBytes int64  `json:"total_bytes"`
	// FreeBytes is rounded down to FreeBytesGranularity (RoundFreeBytes).
	FreeBytes int64 `json:"free_bytes"`
}

// FreeBytesGranularity is the unit a pool's free_bytes is reported in:
// exact to the byte, it changed at nearly every heartbeat (a guest
// writing to its disk, a log line) and made the agent send node_info
// with each. Disks are sized in whole GiB (disk_gib) and the cache keeps
// at least limits.min_free_bytes (1 GiB by default) free, so placement
// needs no finer figure; rounding down never promises space that is not
// there.
const FreeBytesGranularity = 1 << 30

// RoundFreeBytes rounds n down to FreeBytesGranularity (0 for less).
func RoundFreeBytes(n int64) int64 {
	if n <= 0 {
		return 0
	}
	return n - n%FreeBytesGranularity
}

// NetworkInfo is a bridge network a VM NIC can attach to.
type NetworkInfo struct {
	Name   string `json:"name"`
	Bridge string `json:"bridge"`
	Type   string `json:"type"` // "bridge"
}

// RegisterRequest is the body of POST /v1/agent/register.
type RegisterRequest struct {
	ProtocolVersion int      `json:"protocol_version"`
	Node            NodeInfo `json:"node"`
}

// RegisterResponse is its answer.
type RegisterResponse struct {
	ProtocolVersion int    `json:"protocol_version"`
	NodeID          string `json:"node_id,omitempty"`
	// IntervalSeconds is the heartbeat interval; 0 keeps the agent's default.
	IntervalSeconds int `json:"interval_seconds,omitempty"`
}

// LeaseRequest is the body of POST /v1/agent/tasks/lease, a long poll: the
// control plane answers as soon as it has a task for this node, or with no
// tasks after WaitSeconds.
type LeaseRequest struct {
	ProtocolVersion int    `json:"protocol_version"`
	Node            string `json:"node"`
	WaitSeconds     int    `json:"wait_seconds"`
	Max             int    `json:"max"`
}

// LeaseResponse carries the leased tasks, oldest first.
type LeaseResponse struct {
	Tasks []Task `json:"tasks"`
	// Cancel lists tasks leased to this node earlier that the CP has
	// cancelled since: the agent cancels them at once, as it would on a
	// progress answer saying "cancelled" (which stays the fallback).
	Cancel []string `json:"cancel,omitempty"`
}

// Task is one leased task.
type Task struct {
	ID     string `json:"id"`
	Type   string `json:"type"` // api.TaskCreate ... api.TaskDelete
	VMName string `json:"vm_name"`
	VMUUID string `json:"vm_uuid"`
	// Spec is api.CreateVM for vm.create, api.StopSpec for vm.stop, absent
	// otherwise. It may hold user-data: never log or journal it.
	Spec    json.RawMessage `json:"spec,omitempty"`
	Attempt int             `json:"attempt"` // 1 on first delivery
	LeaseID string          `json:"lease_id"`
	// LeaseExpiresAt is the control plane's clock; LeaseTTLSeconds is the
	// same lease as a duration, which the agent uses (clocks differ).
	LeaseExpiresAt  time.Time `json:"lease_expires_at"`
	LeaseTTLSeconds int       `json:"lease_ttl_seconds,omitempty"`
}

// ProgressRequest is the body of POST /v1/agent/tasks/{id}/progress. It
// extends the lease; Progress is absent when there is nothing new to say.
type ProgressRequest struct {
	ProtocolVersion int           `json:"protocol_version"`
	Node            string        `json:"node"`
	LeaseID         string        `json:"lease_id"`
	Progress        *api.Progress `json:"progress,omitempty"`
}

// ProgressResponse is its answer.
type ProgressResponse struct {
	LeaseExpiresAt  time.Time `json:"lease_expires_at"`
	LeaseTTLSeconds int       `json:"lease_ttl_seconds,omitempty"`
	// Cancelled asks the agent to stop the task and complete it as
	// cancelled.
	Cancelled bool `json:"cancelled,omitempty"`
}

// Result is what a task's execution gives back: the VM view (absent for
// vm.delete and for tasks on no VM) and any other output (a volume, an
// image, a screenshot, a console tail).
type Result struct {
	VM     *api.VM
	Output *api.TaskOutput
}

// CompleteRequest is the body of POST /v1/agent/tasks/{id}/complete.
// Status is api.TaskSuccess (with VM, absent for vm.delete and tasks on no
// VM, and Output for the types that have one), api.TaskFailed (with Error)
// or api.TaskCancelled (with Error, code "cancelled").
type CompleteRequest struct {
	ProtocolVersion int             `json:"protocol_version"`
	Node            string          `json:"node"`
	LeaseID         string          `json:"lease_id"`
	Attempt         int             `json:"attempt"`
	Status          string          `json:"status"`
	VM              *api.VM         `json:"vm,omitempty"`
	Output          *api.TaskOutput `json:"output,omitempty"`
	Error           *api.Error      `json:"error,omitempty"`
	StartedAt       time.Time       `json:"started_at,omitzero"`
	FinishedAt      time.Time       `json:"finished_at"`
}

// HeartbeatRequest is the body of POST /v1/agent/heartbeat.
type HeartbeatRequest struct {
	ProtocolVersion int    `json:"protocol_version"`
	Node            string `json:"node"`
	Seq             uint64 `json:"seq"`
	State           string `json:"state"` // NodeReady or NodeDraining
	// NodeInfo is sent again only when it changed since the last
	// acknowledged heartbeat (pool free space, networks).
	NodeInfo *NodeInfo `json:"node_info,omitempty"`
	// InFlight lists the ids of tasks accepted and not yet completed.
	InFlight []string   `json:"in_flight,omitempty"`
	VMs      []VMStatus `json:"vms"`
	// Orphans lists the uuids of VMs on this host that the control
	// plane's last answer did not know. The agent never deletes them.
	Orphans []string `json:"orphans,omitempty"`
	// Events are VM events the control plane has not acknowledged yet,
	// oldest first (at most MaxHeartbeatEvents): a 2xx answer
	// acknowledges every one of them.
	Events []api.VMEvent `json:"events,omitempty"`
}

// MaxHeartbeatEvents bounds the events of one heartbeat.
const MaxHeartbeatEvents = 100

// VMStatus is one VM in a heartbeat: the part of api.VM that changes.
type VMStatus struct {
	Name         string `json:"name"`
	UUID         string `json:"uuid"`
	Status       string `json:"status"`
	StatusReason string `json:"status_reason,omitempty"`
	QEMUPID      int    `json:"qemu_pid,omitempty"`
	Pool         string `json:"pool"`
	Node         string `json:"node"`
	// Arch, VCPUs and MemoryMB are what the VM holds of its node, for
	// placement.
	Arch        string       `json:"arch,omitempty"`
	VCPUs       int          `json:"vcpus,omitempty"`
	MemoryMB    int          `json:"memory_mb,omitempty"`
	IPAddresses []string     `json:"ip_addresses,omitempty"`
	LastTask    *api.TaskRef `json:"last_task,omitempty"`
	// Usage is the VM's last usage sample while QEMU runs, for placement.
	Usage *api.UsageSummary `json:"usage,omitempty"`
	// DesiredPhase is the agent's record of the VM's desired phase: it
	// turns to stopped on a fact the control plane did not order (the
	// guest powered itself off, a host boot of a VM without autostart).
	// The control plane records it as the VM's desired phase.
	DesiredPhase string `json:"desired_phase,omitempty"`
	// RestartCount counts restarts by the VM's restart policy since its
	// last start by request; CrashLoop says the policy gave up.
	RestartCount int  `json:"restart_count,omitempty"`
	CrashLoop    bool `json:"crash_loop,omitempty"`
}

// StatusOf projects a VM view onto its heartbeat status.
func StatusOf(vm api.VM) VMStatus {
	return VMStatus{
		Name:         vm.Name,
		UUID:         vm.UUID,
		Status:       vm.Status,
		StatusReason: vm.StatusReason,
		QEMUPID:      vm.QEMUPID,
		Pool:         vm.Pool,
		Node:         vm.Node,
		Arch:         vm.Arch,
		VCPUs:        vm.VCPUs,
		MemoryMB:     vm.MemoryMB,
		IPAddresses:  vm.IPAddresses,
		LastTask:     vm.LastTask,
		Usage:        vm.Usage,
		DesiredPhase: vm.DesiredPhase,
		RestartCount: vm.RestartCount,
		CrashLoop:    vm.CrashLoop,
	}
}

// HeartbeatResponse is its answer.
type HeartbeatResponse struct {
	// IntervalSeconds is the next heartbeat interval; 0 keeps the current.
	IntervalSeconds int `json:"interval_seconds,omitempty"`
	// Desired maps each VM uuid the control plane places on this node to
	// its desired phase (api.PhaseRunning or api.PhaseStopped). An absent
	// map means "no opinion" (no reconcile, no orphans); an empty map
	// means "no VMs belong here".
	Desired map[string]string `json:"desired"`
}
