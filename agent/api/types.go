// Package api holds the JSON wire types shared by the agent's HTTP API, the
// control-plane protocol and the otherix CLI. Field names are snake_case and
// follow seed 004 (the otherix VM guide).
package api

import (
	"bytes"
	"encoding/json"
	"time"
)

// VM statuses (seed 004 lowercase form).
const (
	StatusCreating = "creating"
	StatusStarting = "starting"
	StatusRunning  = "running"
	StatusPaused   = "paused"
	StatusStopping = "stopping"
	StatusStopped  = "stopped"
	StatusCrashed  = "crashed"
	StatusDeleting = "deleting"
	StatusDeleted  = "deleted"
	StatusError    = "error"
)

// Task types (seed 004's operations).
const (
	TaskCreate   = "vm.create"
	TaskStart    = "vm.start"
	TaskStop     = "vm.stop"
	TaskPoweroff = "vm.poweroff"
	TaskReboot   = "vm.reboot"
	TaskReset    = "vm.reset"
	TaskPause    = "vm.pause"
	TaskResume   = "vm.resume"
	TaskDelete   = "vm.delete"
	// TaskImagePull fills a pool's image cache ahead of creates.
	TaskImagePull = "image.pull"

	// Changes to a VM (docs/protocol.md, "Task types and specs").
	TaskUpdate        = "vm.update"         // spec UpdateVM
	TaskAttachDisk    = "vm.disk.attach"    // spec Device (DISK)
	TaskDetachDisk    = "vm.disk.detach"    // spec Device: source, storage_pool
	TaskChangeMedium  = "vm.cdrom.change"   // spec MediumSpec
	TaskEjectMedium   = "vm.cdrom.eject"    // spec MediumSpec: index
	TaskAddForward    = "vm.forward.add"    // spec Device (PROXY)
	TaskRemoveForward = "vm.forward.remove" // spec Device: source_proto, source_port
	// Read-only results of a VM the control plane cannot dial.
	TaskScreenshot  = "vm.screenshot"   // result TaskOutput.Screenshot
	TaskConsoleTail = "vm.console.tail" // spec ConsoleTailSpec; result TaskOutput.Console
	// Volumes and images: keyed by pool and name (digest), not by VM.
	TaskCreateVolume = "volume.create" // spec CreateVolume; result TaskOutput.Volume
	TaskDeleteVolume = "volume.delete" // spec VolumeRef
	TaskDeleteImage  = "image.delete"  // spec ImageRef
)

// Task statuses.
const (
	TaskPending   = "pending"
	TaskRunning   = "running"
	TaskSuccess   = "success"
	TaskFailed    = "failed"
	TaskCancelled = "cancelled"
)

// Restart policies: what the agent does when a VM's QEMU ends on its own.
// "on-failure" (the default) restarts it after a crash (QEMU killed,
// OOM-killed or aborted, a guest kernel panic) and leaves a guest that
// powered itself off stopped; "always" restarts it after a guest power-off
// too; "never" leaves it as it ended. Restarts back off, and a VM that
// keeps crashing stays crashed (crash_loop) until someone starts it.
const (
	RestartOnFailure = "on-failure"
	RestartAlways    = "always"
	RestartNever     = "never"
)

// Desired phases (seed 004 desired_phase).
const (
	PhaseRunning = "running"
	PhaseStopped = "stopped"
)

// CreateVM is the body of POST /v1/vms and the spec of a vm.create task.
type CreateVM struct {
	Name        string `json:"name" yaml:"name"`
	ImageURL    string `json:"image_url" yaml:"image_url"`
	Arch        string `json:"arch" yaml:"arch"`
	ImageSHA256 string `json:"image_sha256,omitempty" yaml:"image_sha256,omitempty"`
	Firmware    string `json:"firmware,omitempty" yaml:"firmware,omitempty"`
	FirmwareID  string `json:"firmware_id,omitempty" yaml:"firmware_id,omitempty"`
	Format      string `json:"format,omitempty" yaml:"format,omitempty"`
	DiskGiB     int    `json:"disk_gib,omitempty" yaml:"disk_gib,omitempty"`
	Pool        string `json:"pool,omitempty" yaml:"pool,omitempty"`
	Node        string `json:"node,omitempty" yaml:"node,omitempty"`
	Network     string `json:"network,omitempty" yaml:"network,omitempty"`
	VCPUs       int    `json:"vcpus,omitempty" yaml:"vcpus,omitempty"`
	MemoryMB    int    `json:"memory_mb,omitempty" yaml:"memory_mb,omitempty"`
	// CPULimit caps the VM's CPU time, in CPUs (0.5: half of one CPU;
	// 0 or absent: no cap, the VM's share follows its vCPU count).
	CPULimit      float64 `json:"cpu_limit,omitempty" yaml:"cpu_limit,omitempty"`
	UserData      string  `json:"user_data,omitempty" yaml:"user_data,omitempty"`
	NetworkConfig string  `json:"network_config,omitempty" yaml:"network_config,omitempty"`
	NoCloudInit   bool    `json:"no_cloud_init,omitempty" yaml:"no_cloud_init,omitempty"`
	// Seed 000: root disk bus (NVME, VIRTIO-BLK, VIRTIO-SCSI) and size in
	// GiB (disk_gib under its seed-000 name), and autostart (default true).
	RootDiskIOBus string `json:"root_disk_io_bus,omitempty" yaml:"root_disk_io_bus,omitempty"`
	RootDiskSize  int    `json:"root_disk_size,omitempty" yaml:"root_disk_size,omitempty"`
	Autostart     *bool  `json:"autostart,omitempty" yaml:"autostart,omitempty"`
	// RestartPolicy is on-failure (default), always or never.
	RestartPolicy string `json:"restart_policy,omitempty" yaml:"restart_policy,omitempty"`
	// Seed 000 VNC console: vnc_port null picks the next free one from
	// 5900; the password (at most 8 characters, DES) is a secret.
	VNCEnabled  bool   `json:"vnc_enabled,omitempty" yaml:"vnc_enabled,omitempty"`
	VNCPort     *int   `json:"vnc_port,omitempty" yaml:"vnc_port,omitempty"`
	VNCPassword string `json:"vnc_password,omitempty" yaml:"vnc_password,omitempty"`
	// Devices in seed 000's shape (dev_type and its fields).
	Devices []Device `json:"devices,omitempty" yaml:"devices,omitempty"`
}

// Device types (seed 000).
const (
	DevNIC   = "NIC"
	DevProxy = "PROXY"
	DevTPM   = "TPM"
	DevDisk  = "DISK"
	DevCDROM = "CDROM"
	DevPCI   = "PCI"
	DevGPU   = "GPU"
	DevUSB   = "USB"
)

// Device is one seed-000 device of a create request.
type Device struct {
	DevType     string `json:"dev_type" yaml:"dev_type"`
	Name        string `json:"name,omitempty" yaml:"name,omitempty"`
	Description string `json:"description,omitempty" yaml:"description,omitempty"`
	// NIC
	Network string `json:"network,omitempty" yaml:"network,omitempty"`
	NICType string `json:"nic_type,omitempty" yaml:"nic_type,omitempty"` // BRIDGED or MACVLAN
	Parent  string `json:"parent,omitempty" yaml:"parent,omitempty"`
	MAC     string `json:"mac,omitempty" yaml:"mac,omitempty"`
	// PROXY: a host port forwarded to a guest port.
	SourceProto string `json:"source_proto,omitempty" yaml:"source_proto,omitempty"`
	SourcePort  int    `json:"source_port,omitempty" yaml:"source_port,omitempty"`
	DestProto   string `json:"dest_proto,omitempty" yaml:"dest_proto,omitempty"`
	DestPort    int    `json:"dest_port,omitempty" yaml:"dest_port,omitempty"`
	// TPM: no path means an emulated TPM 2.0 (swtpm); a path is a host TPM
	// (/dev/tpmN) passed through. pathrm is a container option, refused.
	Path   string `json:"path,omitempty" yaml:"path,omitempty"`
	PathRM string `json:"pathrm,omitempty" yaml:"pathrm,omitempty"`
	// PCI: the host function passed through whole (DDDD:BB:DD.F).
	Address string `json:"address,omitempty" yaml:"address,omitempty"`
	// GPU: gpu_type PHYSICAL, MDEV, MIG or SRIOV and the fields it uses
	// (see package hostdev). uid, gid and mode are container options.
	GPUType      string `json:"gpu_type,omitempty" yaml:"gpu_type,omitempty"`
	ID           string `json:"id,omitempty" yaml:"id,omitempty"`
	PCI          string `json:"pci,omitempty" yaml:"pci,omitempty"`
	Mdev         string `json:"mdev,omitempty" yaml:"mdev,omitempty"`
	MIGUUID      string `json:"mig_uuid,omitempty" yaml:"mig_uuid,omitempty"`
	GPUVendorID  string `json:"vendorid,omitempty" yaml:"vendorid,omitempty"`
	GPUProductID string `json:"productid,omitempty" yaml:"productid,omitempty"`
	UID          *int   `json:"uid,omitempty" yaml:"uid,omitempty"`
	GID          *int   `json:"gid,omitempty" yaml:"gid,omitempty"`
	Mode         string `json:"mode,omitempty" yaml:"mode,omitempty"`
	// USB: by bus and dev, or by vendor_id and product_id.
	Bus       *int   `json:"bus,omitempty" yaml:"bus,omitempty"`
	Dev       *int   `json:"dev,omitempty" yaml:"dev,omitempty"`
	VendorID  string `json:"vendor_id,omitempty" yaml:"vendor_id,omitempty"`
	ProductID string `json:"product_id,omitempty" yaml:"product_id,omitempty"`
	// DISK: a volume (source) of storage_pool, readonly, io_bus and
	// boot_priority (lower boots first; null: not bootable).
	Source       string `json:"source,omitempty" yaml:"source,omitempty"`
	StoragePool  string `json:"storage_pool,omitempty" yaml:"storage_pool,omitempty"`
	Readonly     bool   `json:"readonly,omitempty" yaml:"readonly,omitempty"`
	IOBus        string `json:"io_bus,omitempty" yaml:"io_bus,omitempty"`
	BootPriority *int   `json:"boot_priority,omitempty" yaml:"boot_priority,omitempty"`
	// CDROM from an image URL: its expected sha256.
	SHA256 string `json:"sha256,omitempty" yaml:"sha256,omitempty"`
}

// Volume is an agent-managed disk in a pool (/v1/volumes).
type Volume struct {
	Name       string   `json:"name"`
	Pool       string   `json:"pool"`
	Bytes      int64    `json:"bytes"`
	AttachedTo []string `json:"attached_to,omitempty"`
}

// CreateVolume is the body of POST /v1/volumes.
type CreateVolume struct {
	Name    string `json:"name"`
	Pool    string `json:"pool,omitempty"`
	SizeGiB int    `json:"size_gib"`
}

// VolumeRef names a volume: the spec of volume.delete.
type VolumeRef struct {
	Name string `json:"name"`
	Pool string `json:"pool,omitempty"`
}

// ImageRef names a cached image: the spec of image.delete.
type ImageRef struct {
	Pool   string `json:"pool,omitempty"`
	Digest string `json:"digest"` // sha256, lowercase hex
}

// MediumSpec is the spec of vm.cdrom.change (source: an allowed ISO or an
// image URL, with its sha256 and pool) and vm.cdrom.eject (index only).
// Index counts the VM's CD-ROMs in spec order; the seed ISO is 0 when the
// VM has cloud-init.
type MediumSpec struct {
	Index       int    `json:"index"`
	Source      string `json:"source,omitempty"`
	SHA256      string `json:"sha256,omitempty"`
	StoragePool string `json:"storage_pool,omitempty"`
}

// ConsoleTailSpec is the spec of vm.console.tail: the last Bytes of the
// serial console log (default and most MaxConsoleTail).
type ConsoleTailSpec struct {
	Bytes int64 `json:"bytes,omitempty"`
}

// Caps of read-only task results: they travel in a completion and are
// kept in the agent's journal until acknowledged.
const (
	MaxConsoleTail = 64 << 10 // bytes of console log
	MaxScreenshot  = 4 << 20  // bytes of PNG
)

// TaskOutput is what a task gives back besides (or instead of) a VM view.
type TaskOutput struct {
	Volume     *Volume      `json:"volume,omitempty"`     // volume.create
	Image      *Image       `json:"image,omitempty"`      // image.pull
	Screenshot *Screenshot  `json:"screenshot,omitempty"` // vm.screenshot
	Console    *ConsoleTail `json:"console,omitempty"`    // vm.console.tail
}

// Screenshot is a VM's display as a PNG.
type Screenshot struct {
	Format string `json:"format"` // "png"
	Data   []byte `json:"data"`   // base64 in JSON
}

// ConsoleTail is the end of a VM's serial console log.
type ConsoleTail struct {
	Data   string `json:"data"`   // the bytes, as text (invalid UTF-8 replaced)
	Offset int64  `json:"offset"` // where Data starts in the log
	Size   int64  `json:"size"`   // the log's size when read
}

// NICView is one NIC in the VM view.
type NICView struct {
	Network string   `json:"network,omitempty"`
	Type    string   `json:"type"` // user, bridge, macvlan
	MAC     string   `json:"mac"`
	Link    string   `json:"link,omitempty"` // the host-side tap/macvtap
	IPs     []string `json:"ip_addresses,omitempty"`
}

// StartSpec is the spec of a vm.start task (optional). Restart marks a
// start by the VM's restart policy (the agent's reconcile), counted in
// restart_count; a start without it is a start by request, which clears
// the count and a crash loop.
type StartSpec struct {
	Restart bool `json:"restart,omitempty"`
}

// StopSpec is the spec of a vm.stop task.
type StopSpec struct {
	Force bool `json:"force,omitempty"`
}

// TaskRef names a task from a VM view.
type TaskRef struct {
	ID     string `json:"id"`
	Type   string `json:"type"`
	Status string `json:"status"`
}

// VM is the VM view returned by the API, task results and heartbeats.
type VM struct {
	Name         string  `json:"name"`
	UUID         string  `json:"uuid"`
	Status       string  `json:"status"`
	StatusReason string  `json:"status_reason,omitempty"`
	DesiredPhase string  `json:"desired_phase,omitempty"`
	Arch         string  `json:"arch"`
	VCPUs        int     `json:"vcpus"`
	MemoryMB     int     `json:"memory_mb"`
	CPULimit     float64 `json:"cpu_limit,omitempty"`
	Pool         string  `json:"pool"`
	Node         string  `json:"node"`
	// NodeState is the state of the VM's node (api.NodeReady,
	// api.NodeLost) in cluster mode; absent in standalone mode.
	NodeState string `json:"node_state,omitempty"`
	// Placement is why the VM is on its node (cluster mode).
	Placement   *Placement `json:"placement,omitempty"`
	Network     string     `json:"network,omitempty"`
	ImageURL    string     `json:"image_url"`
	ImageSHA256 string     `json:"image_sha256"`
	DiskGiB     int        `json:"disk_gib"`
	QEMUPID     int        `json:"qemu_pid,omitempty"`
	CloudInit   bool       `json:"cloud_init"`
	IPAddresses []string   `json:"ip_addresses,omitempty"`
	NICs        []NICView  `json:"nics,omitempty"`
	// Seed 000/003 view: the instance status (RUNNING, STOPPED, STARTING,
	// STOPPING, FROZEN, ERROR, UNKNOWN), root disk bus, autostart, and the
	// changes that apply at the next start.
	InstanceStatus string `json:"instance_status"`
	Firmware       string `json:"firmware"`
	SecureBoot     bool   `json:"secure_boot"`
	TPM            bool   `json:"tpm"`
	VNCEnabled     bool   `json:"vnc_enabled"`
	VNCPort        int    `json:"vnc_port,omitempty"`
	RootDiskIOBus  string `json:"root_disk_io_bus,omitempty"`
	Autostart      bool   `json:"autostart"`
	// RestartPolicy is the VM's restart policy; RestartCount how many
	// times the agent restarted it by that policy since it was last
	// started or created by request; CrashLoop is set when it crashed too
	// often in a short window: it then stays crashed until started.
	RestartPolicy  string          `json:"restart_policy"`
	RestartCount   int             `json:"restart_count,omitempty"`
	CrashLoop      bool            `json:"crash_loop,omitempty"`
	PendingChanges *PendingChanges `json:"pending_changes,omitempty"`
	Forwards       []Device        `json:"forwards,omitempty"` // PROXY devices
	// Devices are the VM's DISK, CDROM, PCI, GPU, USB and host TPM
	// devices, as asked at create and changed by attach, detach and
	// medium changes.
	Devices   []Device  `json:"devices,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	// StartedAt is when its QEMU started (absent while it has none).
	StartedAt time.Time `json:"started_at,omitzero"`
	LastTask  *TaskRef  `json:"last_task,omitempty"`
	// Usage is the last usage sample while QEMU runs (the details:
	// GET /v1/vms/{name}/stats).
	Usage *UsageSummary `json:"usage,omitempty"`
}

// Placement is a VM's placement (cluster mode): the node and pool chosen
// at create and why ("pinned: node given (--node)", or the scheduler's
// reason).
type Placement struct {
	Node   string `json:"node"`
	Pool   string `json:"pool,omitempty"`
	Reason string `json:"reason"`
}

// VM event types: the facts of a VM's life, newest last in its history.
const (
	EventCreated       = "created"
	EventStarted       = "started"        // by a task
	EventStopped       = "stopped"        // by a task (stop or poweroff)
	EventGuestShutdown = "guest_shutdown" // the guest powered itself off
	EventGuestReboot   = "guest_reboot"   // the guest rebooted itself (same QEMU)
	EventCrashed       = "crashed"        // QEMU ended without a guest shutdown, or the guest panicked
	EventRestarted     = "restarted"      // started again by the restart policy
	EventCrashLoop     = "crash_loop"     // too many crashes: restarts held
	EventStopTimeout   = "stop_timeout"   // the guest ignored the power button
	EventRebooted      = "rebooted"       // by a task (new QEMU)
	EventReset         = "reset"          // by a task
	EventPaused        = "paused"         // by a task, or by QEMU (message: why)
	EventResumed       = "resumed"        // by a task, or by QEMU
	EventIOError       = "io_error"       // a disk error reported to the guest
	EventMediumChanged = "medium_changed"
	EventDiskAttached  = "disk_attached"
	EventDiskDetached  = "disk_detached"
	EventHostRebooted  = "host_rebooted" // QEMU gone with the host's boot
	EventAutostarted   = "autostarted"   // started after a host boot
	EventDeleted       = "deleted"
)

// VMEvent is one entry of a VM's history (GET /v1/vms/{name}/events) and
// of a heartbeat's events. Seq numbers every event of the host, growing.
type VMEvent struct {
	Seq     int64     `json:"seq"`
	Time    time.Time `json:"time"`
	VMName  string    `json:"vm_name"`
	VMUUID  string    `json:"vm_uuid"`
	Type    string    `json:"type"`
	Message string    `json:"message,omitempty"`
	TaskID  string    `json:"task_id,omitempty"`
}

// VMEventList is the answer of GET /v1/vms/{name}/events, oldest first.
type VMEventList struct {
	Events []VMEvent `json:"events"`
}

// Progress of a long task (e.g. image download bytes).
type Progress struct {
	Phase string `json:"phase,omitempty"` // e.g. "download", "boot"
	Done  int64  `json:"done"`
	Total int64  `json:"total"` // -1 when unknown
}

// Progress phases the runner reports around a task's execution (the
// executor reports its own: "download", "prepare", "boot").
const (
	// ProgressQueued: leased, waiting behind another task of its VM (or
	// volume, or image); it has not started and can still be cancelled
	// with nothing to undo.
	ProgressQueued = "queued"
	// ProgressStarted: a task reported queued is about to start; the
	// control plane's answer to this report is the last word on a
	// cancel.
	ProgressStarted = "started"
)

// Error is the {code, message} pair of failed tasks and API errors.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// ErrorEnvelope is the body of every API error: {"error": {...}}.
type ErrorEnvelope struct {
	Error Error `json:"error"`
}

// Task is an async operation as seen through GET /v1/tasks/{id}.
type Task struct {
	ID       string          `json:"id"`
	Type     string          `json:"type"`
	VMName   string          `json:"vm_name"`
	VMUUID   string          `json:"vm_uuid,omitempty"`
	Status   string          `json:"status"`
	Progress *Progress       `json:"progress,omitempty"`
	Error    *Error          `json:"error,omitempty"`
	Spec     json.RawMessage `json:"-"`
	Result   *VM             `json:"result,omitempty"`
	// Output is a result other than a VM view (volume.create,
	// image.pull, vm.screenshot, vm.console.tail).
	Output    *TaskOutput `json:"output,omitempty"`
	CreatedAt time.Time   `json:"created_at"`
	UpdatedAt time.Time   `json:"updated_at"`
}

// Image is one cached image of GET /v1/images.
type Image struct {
	Pool        string    `json:"pool"`
	Digest      string    `json:"digest"` // sha256, lowercase hex
	Format      string    `json:"format"` // qcow2 or raw
	Size        int64     `json:"size"`
	VirtualSize int64     `json:"virtual_size"`
	URLs        []string  `json:"urls"`
	LastUsed    time.Time `json:"last_used"`
	PinnedBy    []string  `json:"pinned_by"` // VM uuids whose root disks use it; "<uuid>:cdrom" for a VM's CD-ROMs
}

// ImageList is the answer of GET /v1/images.
type ImageList struct {
	Images []Image `json:"images"`
}

// PullImage is the body of POST /v1/images and the spec of image.pull.
type PullImage struct {
	URL    string `json:"url"`
	Pool   string `json:"pool"`
	SHA256 string `json:"sha256,omitempty"`
}

// PendingChanges are changes to a running VM that apply at its next start.
type PendingChanges struct {
	VCPUs    int     `json:"vcpus,omitempty"`
	MemoryMB int     `json:"memory_mb,omitempty"`
	CPULimit float64 `json:"cpu_limit,omitempty"`
	// VNCEnabled is the console's state at the next start when it
	// changes; VNCPort its port then, when it changes.
	VNCEnabled *bool `json:"vnc_enabled,omitempty"`
	VNCPort    int   `json:"vnc_port,omitempty"`
}

// UpdateVM is the body of PATCH /v1/vms/{name} (seed 003's
// InstanceUpdateRequest): only the fields given change.
type UpdateVM struct {
	VCPUs         *int    `json:"vcpus,omitempty"`
	MemoryMB      *int    `json:"memory_mb,omitempty"`
	Autostart     *bool   `json:"autostart,omitempty"`
	RestartPolicy *string `json:"restart_policy,omitempty"`
	// CPULimit in CPUs; 0 removes the cap.
	CPULimit *float64 `json:"cpu_limit,omitempty"`
	// VNCEnabled turns the VNC console (and its display adapter) on or
	// off: on a running VM at its next start (pending_changes), as QEMU
	// cannot add or remove a display at run time. Turning it on needs
	// VNCPassword.
	VNCEnabled *bool `json:"vnc_enabled,omitempty"`
	// VNCPort moves the console to this port (5900..65535; port_in_use
	// when taken). Absent: the VM keeps its port, and one turned on gets
	// the next free one from 5900 (seed 000).
	VNCPort *int `json:"vnc_port,omitempty"`
	// VNCPortAuto is "vnc_port": null on the wire: the port goes back to
	// automatic, the next free one from 5900 (seed 000's null), the VM's
	// own port counting as free for it.
	VNCPortAuto bool `json:"-"`
	// VNCPassword is a new password of a vnc_enabled VM's console (at
	// most 8 characters, a secret), set at once when the VM runs.
	VNCPassword *string `json:"vnc_password,omitempty"`
}

// updateVM is UpdateVM's wire form without its methods.
type updateVM UpdateVM

// UnmarshalJSON reads "vnc_port": null as VNCPortAuto. A field it does
// not know is an error, from the API and in a vm.update task alike: a
// change the agent cannot make is refused, never dropped.
func (u *UpdateVM) UnmarshalJSON(b []byte) error {
	var w updateVM
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&w); err != nil {
		return err
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return err
	}
	if p, ok := fields["vnc_port"]; ok && string(bytes.TrimSpace(p)) == "null" {
		w.VNCPortAuto = true
	}
	*u = UpdateVM(w)
	return nil
}

// MarshalJSON writes VNCPortAuto as "vnc_port": null.
func (u UpdateVM) MarshalJSON() ([]byte, error) {
	b, err := json.Marshal(updateVM(u))
	if err != nil || !u.VNCPortAuto || u.VNCPort != nil {
		return b, err
	}
	if len(b) == 2 { // {}
		return []byte(`{"vnc_port":null}`), nil
	}
	return append([]byte(`{"vnc_port":null,`), b[1:]...), nil
}

// ValidRestartPolicy reports whether p is a restart policy ("" is not).
func ValidRestartPolicy(p string) bool {
	switch p {
	case RestartOnFailure, RestartAlways, RestartNever:
		return true
	}
	return false
}

// InstanceStatus maps a seed-004 status onto the seed 000/003 form.
func InstanceStatus(status string) string {
	switch status {
	case StatusRunning:
		return "RUNNING"
	case StatusStopped:
		return "STOPPED"
	case StatusCreating, StatusStarting:
		return "STARTING"
	case StatusStopping, StatusDeleting:
		return "STOPPING"
	case StatusPaused:
		return "FROZEN"
	case StatusCrashed, StatusError:
		return "ERROR"
	}
	return "UNKNOWN"
}

// Firmware is one entry of the firmware catalogue (GET /v1/firmwares).
type Firmware struct {
	Name        string `json:"name"`
	UUID        string `json:"uuid"`
	Arch        string `json:"arch"`
	Description string `json:"description,omitempty"`
	SecureBoot  bool   `json:"secure_boot"`
	Descriptor  string `json:"descriptor,omitempty"`
}

// FirmwareList is the answer of GET /v1/firmwares.
type FirmwareList struct {
	Firmwares []Firmware `json:"firmwares"`
}
