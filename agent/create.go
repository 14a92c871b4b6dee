package agent

import (
	"context"
	"github.com/otherix/otherix-agent/agent/crashpoint"
	"os"
	"path/filepath"
	"strings"

	"go.uber.org/zap"

	"github.com/google/uuid"
	"github.com/otherix/otherix-agent/agent/api"

	"github.com/otherix/otherix-agent/agent/firmware"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/agent/vnc"
	"github.com/otherix/otherix-agent/cloudinit"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// rootBuses maps seed 000's bus names to the engine's.
var rootBuses = map[string]string{"NVME": vm.BusNVMe, "VIRTIO-BLK": vm.BusVirtioBlk, "VIRTIO-SCSI": vm.BusVirtioSCSI}

// rootBootIndex is the root disk's QEMU bootindex: boot_priority 1 (see
// bootIndex).
const rootBootIndex = 3

// Defaults of seed 004 for fields a create leaves out.
const (
	DefaultVCPUs    = 2
	DefaultMemoryMB = 2048
)

// ValidateCreate checks a create request without touching anything and
// fills in defaults. Errors carry stable codes.
func (h *Host) ValidateCreate(c *api.CreateVM) error {
	if err := vm.ValidateName(c.Name); err != nil {
		return err
	}
	if c.ImageURL == "" {
		return errcode.New(errcode.ValidationFailed, "image_url is required")
	}
	switch c.Arch {
	case vm.ArchAMD64, vm.ArchARM64:
	case "":
		return errcode.New(errcode.ValidationFailed, "arch is required (amd64 or arm64)")
	default:
		return errcode.New(errcode.ValidationFailed, "arch %q is not supported: use amd64 or arm64", c.Arch)
	}
	supported := false
	for _, a := range h.Arches() {
		supported = supported || a == c.Arch
	}
	if !supported {
		return errcode.New(errcode.ValidationFailed, "this host cannot run arch %s", c.Arch)
	}
	if c.Firmware != "" && c.FirmwareID != "" {
		return errcode.New(errcode.ValidationFailed, "firmware and firmware_id are mutually exclusive")
	}
	if c.NoCloudInit && (c.UserData != "" || c.NetworkConfig != "") {
		return errcode.New(errcode.ValidationFailed, "no_cloud_init is mutually exclusive with user_data and network_config")
	}
	if c.VCPUs == 0 {
		c.VCPUs = DefaultVCPUs
	}
	if c.MemoryMB == 0 {
		c.MemoryMB = DefaultMemoryMB
	}
	if c.VCPUs < vm.MinVCPUs || c.VCPUs > vm.MaxVCPUs {
		return errcode.New(errcode.ValidationFailed, "vcpus %d out of range %d..%d", c.VCPUs, vm.MinVCPUs, vm.MaxVCPUs)
	}
	if c.MemoryMB < vm.MinMemoryMB || c.MemoryMB > vm.MaxMemoryMB {
		return errcode.New(errcode.ValidationFailed, "memory_mb %d out of range %d..%d", c.MemoryMB, vm.MinMemoryMB, vm.MaxMemoryMB)
	}
	if err := vm.ValidateCPULimit(c.CPULimit); err != nil {
		return err
	}
	if _, err := h.resolveFirmware(c); err != nil {
		return err
	}
	if err := vnc.Validate(c.VNCEnabled, c.VNCPort, c.VNCPassword); err != nil {
		return err
	}
	if c.RootDiskSize != 0 {
		if c.DiskGiB != 0 && c.DiskGiB != c.RootDiskSize {
			return errcode.New(errcode.ValidationFailed, "disk_gib %d and root_disk_size %d disagree (root_disk_size is disk_gib's seed-000 name)", c.DiskGiB, c.RootDiskSize)
		}
		c.DiskGiB = c.RootDiskSize
	}
	if c.RestartPolicy == "" {
		c.RestartPolicy = api.RestartOnFailure
	}
	if !api.ValidRestartPolicy(c.RestartPolicy) {
		return errcode.New(errcode.ValidationFailed, "restart_policy %q: use on-failure, always or never", c.RestartPolicy)
	}
	if c.RootDiskIOBus == "" {
		c.RootDiskIOBus = h.cfg.QEMU.RootDiskBus
	}
	if _, ok := rootBuses[c.RootDiskIOBus]; !ok {
		return errcode.New(errcode.ValidationFailed, "root_disk_io_bus %q: use NVME, VIRTIO-BLK or VIRTIO-SCSI", c.RootDiskIOBus)
	}
	if c.DiskGiB < 0 || c.DiskGiB > 65536 {
		return errcode.New(errcode.ValidationFailed, "disk_gib %d out of range 1..65536", c.DiskGiB)
	}
	if c.ImageSHA256 != "" {
		c.ImageSHA256 = strings.ToLower(strings.TrimPrefix(c.ImageSHA256, "sha256:"))
		if len(c.ImageSHA256) != 64 || strings.Trim(c.ImageSHA256, "0123456789abcdef") != "" {
			return errcode.New(errcode.ValidationFailed, "image_sha256 must be 64 hex digits")
		}
	}
	switch c.Format {
	case "", "qcow2", "raw":
	default:
		return errcode.New(errcode.ImageFormatUnsupported, "format %q is not supported: use qcow2 or raw", c.Format)
	}
	if c.Pool == "" {
		p, err := h.cache.DefaultPool()
		if err != nil {
			return err
		}
		c.Pool = p
	}
	if _, err := h.cache.PoolDir(c.Pool); err != nil {
		return err
	}
	if c.Node != "" && c.Node != h.cfg.NodeName {
		return errcode.New(errcode.PoolNotOnNode, "pool %q is not on node %q (this node is %q)", c.Pool, c.Node, h.cfg.NodeName)
	}
	// Networks and devices: a dry run of the NIC plan, on a probe
	// reservation (no name: it holds nothing but its MACs and host
	// devices, briefly). Host devices are checked against the host and
	// what VMs and creates hold now (device_not_found, iommu_unavailable,
	// device_busy), held by the create from its devices step, and claimed
	// again at every start.
	probe, err := h.engine.Reserve("", uuid.NewString(), api.VM{})
	if err != nil {
		return err
	}
	plan, err := h.planNICs(c, probe)
	if err == nil {
		err = probe.HoldDevices(context.Background(), plan.host)
	}
	probe.Release()
	if err != nil {
		return err
	}
	if !c.NoCloudInit {
		s := seedOf(c, "00000000-0000-4000-8000-000000000000")
		if err := s.Validate(cloudinit.Limits{MaxUserData: h.cfg.Limits.MaxUserDataBytes}); err != nil {
			return err
		}
	}
	return nil
}

func seedOf(c *api.CreateVM, id string) cloudinit.Seed {
	s := cloudinit.Seed{InstanceID: id, Hostname: c.Name}
	if c.UserData != "" {
		s.UserData = []byte(c.UserData)
	}
	if c.NetworkConfig != "" {
		s.NetworkConfig = []byte(c.NetworkConfig)
	}
	return s
}

// Create materializes the image in the pool's cache, makes the VM's
// copy-on-write root disk and seed ISO, defines the VM and starts it: the
// steps of createSteps. Anything it made is removed if a later step
// fails.
func (h *Host) Create(ctx context.Context, id string, c api.CreateVM, task *api.TaskRef, progress func(api.Progress)) (api.VM, error) {
	if err := h.ValidateCreate(&c); err != nil {
		return api.VM{}, err
	}
	if !vm.IsUUID(id) {
		return api.VM{}, errcode.New(errcode.ValidationFailed, "vm uuid %q is not a UUID", id)
	}
	id = strings.ToLower(id)
	// The engine holds the VM's name, uuid, MACs and VNC port for it
	// until it defines the VM, and lists it meanwhile as creating.
	pv := api.VM{Name: c.Name, UUID: id, Status: api.StatusCreating, Arch: c.Arch, VCPUs: c.VCPUs, MemoryMB: c.MemoryMB, CPULimit: c.CPULimit,
		Pool: c.Pool, Node: h.cfg.NodeName, ImageURL: c.ImageURL, ImageSHA256: c.ImageSHA256, DiskGiB: c.DiskGiB,
		CloudInit: !c.NoCloudInit, DesiredPhase: api.PhaseRunning, LastTask: task}
	res, err := h.engine.Reserve(c.Name, id, pv)
	if err != nil {
		return api.VM{}, err
	}
	var u undo
	defer u.run()
	u.add(res.Release)

	select {
	case h.creates <- struct{}{}:
	case <-ctx.Done():
		return api.VM{}, errcode.Wrap(errcode.Cancelled, ctx.Err(), "waiting for a create slot")
	}
	defer func() { <-h.creates }()

	b := h.newBuild(res, &c, task, progress, &u)
	if err := b.run(ctx, createSteps); err != nil {
		return api.VM{}, err
	}
	u.success()
	v := b.view
	b.log.Info("vm created", zap.Int("qemu_pid", v.PID))
	taskID := ""
	if task != nil {
		taskID = task.ID
	}
	h.event(v, api.EventCreated, "", taskID) // the create's commit point (createdBy)
	crashpoint.Hit("create.done")
	return h.toAPI(v), nil
}

// keptDevices are the devices a VM's host metadata keeps as asked: those
// the spec does not describe by itself (see vm.Record.Devices).
func keptDevices(ds []api.Device) []api.Device {
	var out []api.Device
	for _, d := range ds {
		if d.DevType != api.DevNIC && d.DevType != api.DevProxy && (d.DevType != api.DevTPM || d.Path != "") {
			out = append(out, d)
		}
	}
	return out
}

// resolveFirmware picks the create's firmware from the catalogue: by name
// or uuid, or the arch's default (bios on amd64, uefi on arm64).
func (h *Host) resolveFirmware(c *api.CreateVM) (*firmware.Entry, error) {
	ref := c.Firmware
	if ref == "" {
		ref = c.FirmwareID
	}
	return h.firmwares.Resolve(ref, c.Arch, c.MemoryMB)
}

// tpmDir is where a VM's swtpm keeps its state: <data_dir>/tpm/<uuid>.
// swtpm runs as the QEMU user, so the directories above it are searchable
// (0711: traversal, no listing); the VM's own is the QEMU user's, 0700.
func (h *Host) tpmDir(id string) (string, error) {
	root := filepath.Join(h.cfg.DataDir, "tpm")
	if err := os.MkdirAll(root, 0o711); err != nil {
		return "", errcode.Wrap(errcode.Internal, err, "tpm dir")
	}
	for _, d := range []string{h.cfg.DataDir, root} {
		if err := os.Chmod(d, 0o711); err != nil {
			return "", errcode.Wrap(errcode.Internal, err, "tpm dir")
		}
	}
	return filepath.Join(root, id), nil
}
