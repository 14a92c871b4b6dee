package api

import "time"

// Node states in GET /v1/nodes.
const (
	NodeReady    = "ready"
	NodeDraining = "draining"
	// NodeLost: no heartbeat within the node timeout (cluster mode: its
	// liveness lease in etcd expired). Its VMs are not moved: their disks
	// are local.
	NodeLost = "lost"
)

// Node is one node of GET /v1/nodes: what its agent registered and last
// reported.
type Node struct {
	Name          string     `json:"name"`
	State         string     `json:"state"`
	LastHeartbeat time.Time  `json:"last_heartbeat,omitzero"`
	AgentVersion  string     `json:"agent_version,omitempty"`
	Arch          string     `json:"arch,omitempty"`
	KVM           bool       `json:"kvm"`
	CPUs          int        `json:"cpus,omitempty"`
	MemoryMB      int64      `json:"memory_mb,omitempty"`
	Arches        []string   `json:"arches,omitempty"`
	Pools         []NodePool `json:"pools,omitempty"`
	Networks      []string   `json:"networks,omitempty"`
	VMCount       int        `json:"vm_count"`
}

// NodePool is a storage pool of a node.
type NodePool struct {
	Name       string `json:"name"`
	Node       string `json:"node,omitempty"`
	TotalBytes int64  `json:"total_bytes"`
	FreeBytes  int64  `json:"free_bytes"`
}

// NodeList is the body of GET /v1/nodes.
type NodeList struct {
	Nodes []Node `json:"nodes"`
}
