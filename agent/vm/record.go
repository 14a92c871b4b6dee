package vm

import (
	"slices"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/portfwd"
)

// Record is what the agent keeps with a VM besides its spec and status:
// what the VM was created from and as, what the control plane wants of
// it, its last task, its sealed secrets, the forwards the agent's proxy
// serves and the cached images its CD-ROMs pin. It lives with the VM's
// state (vm.json, under "meta", its key from before it was typed) and
// changes only under the VM's lock: through Engine.UpdateRecord or a Txn.
type Record struct {
	ImageURL     string       `json:"image_url"`
	ImageSHA256  string       `json:"image_sha256"`
	ImageFormat  string       `json:"image_format"`
	Pool         string       `json:"pool"`
	DiskGiB      int          `json:"disk_gib"`
	Network      string       `json:"network,omitempty"`
	CloudInit    bool         `json:"cloud_init"`
	DesiredPhase string       `json:"desired_phase"`
	LastTask     *api.TaskRef `json:"last_task,omitempty"`
	// VNCPassword is sealed (agent/secrets), never in clear.
	VNCPassword string `json:"vnc_password_sealed,omitempty"`
	// Forwards of bridged VMs, served by the agent's proxy (SLIRP VMs'
	// are in the spec's NICs).
	Forwards      []portfwd.Rule `json:"forwards,omitempty"`
	RootDiskIOBus string         `json:"root_disk_io_bus,omitempty"`
	Autostart     bool           `json:"autostart"`
	// RestartPolicy is api.RestartOnFailure when empty (VMs made before
	// the field existed).
	RestartPolicy string `json:"restart_policy,omitempty"`
	// Restarts counts restarts by the policy since the last start by
	// request; Crashes are the times of recent crashes (the crash-loop
	// window); CrashLoop holds restarts until a start by request.
	Restarts  int         `json:"restarts,omitempty"`
	Crashes   []time.Time `json:"crashes,omitempty"`
	CrashLoop bool        `json:"crash_loop,omitempty"`
	// Devices are the seed-000 DISK, CDROM, PCI, GPU, USB and host TPM
	// devices as asked (NIC, PROXY and the emulated TPM are derived from
	// the spec), kept current by attach, detach and medium changes.
	Devices []api.Device `json:"devices,omitempty"`
	// CDROMPins are the cached images the VM's CD-ROMs use, each pinned
	// for the VM's CD-ROM owner: set at create, kept exact by medium
	// changes, all unpinned at delete.
	CDROMPins []CDROMPin `json:"cdrom_pins,omitempty"`
}

// CDROMPin is a cached image one of a VM's CD-ROMs uses. Several CD-ROMs
// with the same image share one pin.
type CDROMPin struct {
	Index  int    `json:"index"` // the engine's CD-ROM index (the seed ISO, when any, is 0)
	Pool   string `json:"pool"`
	Digest string `json:"sha256"`
}

// clone is a deep copy: views and callbacks never share the engine's
// slices.
func (r Record) clone() Record {
	if r.LastTask != nil {
		t := *r.LastTask
		r.LastTask = &t
	}
	r.Forwards = slices.Clone(r.Forwards)
	r.Devices = slices.Clone(r.Devices)
	r.CDROMPins = slices.Clone(r.CDROMPins)
	r.Crashes = slices.Clone(r.Crashes)
	return r
}

// Policy is the restart policy in force: RestartPolicy, or
// api.RestartOnFailure when it is empty.
func (r Record) Policy() string {
	if r.RestartPolicy == "" {
		return api.RestartOnFailure
	}
	return r.RestartPolicy
}
