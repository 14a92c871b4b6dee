package agent

import (
	"context"
	"github.com/otherix/otherix-agent/agent/crashpoint"
	"os"
	"path/filepath"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/firmware"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/agent/vnc"
	"github.com/otherix/otherix-agent/cloudinit"
	"github.com/otherix/otherix-agent/imagecache"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// A create is a sequence of named steps (createSteps), each making one
// part of the VM and pushing what undoes it on the build's undo stack:
// a failed step unwinds everything the steps before it made.

// build is one create in progress: its request (validated, defaults
// filled in) and what each step made for the next ones.
type build struct {
	h        *Host
	res      *vm.Reservation // the VM's name, uuid, MACs, VNC port and host devices until define
	id       string          // the VM's uuid
	c        *api.CreateVM
	task     *api.TaskRef
	progress func(api.Progress)
	log      *zap.Logger
	undo     *undo

	entry  imagecache.Entry // image: the cached image
	dir    string           // disk: the VM's folder in its pool
	root   string           // disk: its copy-on-write root disk
	fw     *vm.Firmware     // firmware: nil for BIOS
	plan   nicPlan          // devices: NICs (MACs reserved), forwards, disks, host devices
	cdroms []vm.CDROM       // devices: CDROM devices, their images pinned
	pins   []vm.CDROMPin
	tpm    *vm.TPM  // devices: the emulated TPM's state
	owned  []string // what the VM's delete removes
	vnc    *vm.VNC  // console
	sealed string   // console: the sealed VNC password
	seed   string   // seed: the NoCloud ISO, "" without cloud-init
	view   vm.View  // define, then start
}

// createStep is one named step of a create.
type createStep struct {
	name string
	run  func(b *build, ctx context.Context) error
}

// createSteps are a create's steps, in order.
var createSteps = []createStep{
	{"image", (*build).image},
	{"disk", (*build).disk},
	{"firmware", (*build).firmware},
	{"devices", (*build).devices},
	{"console", (*build).console},
	{"seed", (*build).makeSeed},
	{"define", (*build).define},
	{"start", (*build).start},
}

func (h *Host) newBuild(res *vm.Reservation, c *api.CreateVM, task *api.TaskRef, progress func(api.Progress), u *undo) *build {
	if progress == nil {
		progress = func(api.Progress) {}
	}
	id := res.UUID()
	return &build{h: h, res: res, id: id, c: c, task: task, progress: progress, undo: u,
		log: h.log.With(zap.String("vm", c.Name), zap.String("vm_uuid", id), zap.String("pool", c.Pool))}
}

// run runs the steps in order and stops at the first failure; the caller
// unwinds the undo stack.
func (b *build) run(ctx context.Context, steps []createStep) error {
	for _, s := range steps {
		if err := s.run(b, ctx); err != nil {
			b.log.Debug("create step failed", zap.String("step", s.name))
			return err
		}
		crashpoint.Hit("create." + s.name)
	}
	return nil
}

// undo is a stack of cleanups run unless the work succeeds.
type undo struct {
	fns []func()
	ok  bool
}

func (u *undo) add(fn func()) { u.fns = append(u.fns, fn) }
func (u *undo) success()      { u.ok = true }
func (u *undo) run() {
	if u.ok {
		return
	}
	for i := len(u.fns) - 1; i >= 0; i-- {
		u.fns[i]()
	}
	u.fns = nil
}

// image materializes the image in the pool's cache (downloaded and
// verified once, however many creates ask). The image is not pinned yet:
// the disk step pins it.
func (b *build) image(ctx context.Context) error {
	c := b.c
	entry, err := b.h.cache.Ensure(ctx, c.Pool, imagecache.Request{URL: c.ImageURL, SHA256: c.ImageSHA256, Format: c.Format},
		func(done, total int64) { b.progress(api.Progress{Phase: "download", Done: done, Total: total}) })
	if err != nil {
		return err
	}
	b.entry = entry
	b.log.Info("image ready", zap.String("image_sha256", entry.Digest), zap.String("format", entry.Format))
	b.progress(api.Progress{Phase: "prepare", Done: entry.Size, Total: entry.Size})
	return nil
}

// disk makes the VM's folder in its pool and its root disk: a qcow2
// overlay on the cached image, which it pins for the VM.
func (b *build) disk(ctx context.Context) error {
	dir, err := b.h.vmDir(b.c.Pool, b.id)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return errcode.Wrap(errcode.Internal, err, "vm dir")
	}
	b.undo.add(func() { os.RemoveAll(dir) })
	b.dir = dir
	b.owned = append(b.owned, dir)
	root := filepath.Join(dir, "root.qcow2")
	if err := b.h.cache.CreateOverlay(ctx, b.c.Pool, b.entry.Digest, root, b.c.DiskGiB, b.id); err != nil {
		return err
	}
	pool, digest, id := b.c.Pool, b.entry.Digest, b.id
	b.undo.add(func() { b.h.cache.Unpin(pool, digest, id) })
	b.root = root
	return nil
}

// firmware resolves the firmware; UEFI gets the VM's own copy of the
// variable store in its folder.
func (b *build) firmware(ctx context.Context) error {
	e, err := b.h.resolveFirmware(b.c)
	if err != nil {
		return err
	}
	if e.Interface != "uefi" {
		return nil
	}
	vars := filepath.Join(b.dir, "efivars.fd")
	if err := firmware.PrepareVars(e, vars); err != nil {
		return err
	}
	// Distribution firmware paths are often symlinks; the engine opens
	// VM files with O_NOFOLLOW, so it gets the real file.
	code, err := filepath.EvalSymlinks(e.Code)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "firmware %s", e.Name)
	}
	b.fw = &vm.Firmware{Name: e.Name, Interface: e.Interface, Code: code, CodeFormat: e.CodeFormat,
		Vars: vars, VarsFormat: e.VarsFormat, RequiresSMM: e.RequiresSMM, SecureBoot: e.SecureBoot}
	return nil
}

// devices plans the NICs (their MACs in the build's reservation), forwards,
// DISK and host devices (held in the reservation until define; the start
// claims them for the VM), resolves the CDROM devices (an image URL is ensured in the
// cache and pinned for the VM's CD-ROM owner) and makes the emulated
// TPM's state folder.
func (b *build) devices(ctx context.Context) error {
	h, c, id := b.h, b.c, b.id
	plan, err := h.planNICs(c, b.res)
	if err != nil {
		return err
	}
	if err := b.res.HoldDevices(ctx, plan.host); err != nil {
		return err
	}
	b.plan = plan
	if err := portfwd.CheckFree(ctx, plan.forwards); err != nil {
		return err
	}
	firstCD := 0 // the engine's index of the first CDROM device: after the seed ISO
	if !c.NoCloudInit {
		firstCD = 1
	}
	for k, i := range plan.cdroms {
		cd, img, err := h.cdromDevice(ctx, i, c.Devices[i], c.Pool)
		if err != nil {
			return err
		}
		if img != nil {
			pin, err := h.pinCDROM(ctx, img, cdromOwner(id), firstCD+k)
			if err != nil {
				return errcode.Prefix(err, "devices[%d]", i)
			}
			b.undo.add(func() { h.cache.Unpin(pin.Pool, pin.Digest, cdromOwner(id)) })
			cd.Path = img.entry.Path
			b.pins = append(b.pins, pin)
		}
		b.cdroms = append(b.cdroms, cd)
	}
	if plan.tpm {
		state, err := h.tpmDir(id)
		if err != nil {
			return err
		}
		b.tpm = &vm.TPM{State: state}
		b.owned = append(b.owned, state)
		b.undo.add(func() { os.RemoveAll(state) })
	}
	return nil
}

// console holds the VNC port in the build's reservation (the asked one,
// or a free one picked) and seals the VNC password for the VM's record.
func (b *build) console(ctx context.Context) error {
	h, c, id := b.h, b.c, b.id
	if !c.VNCEnabled {
		return nil
	}
	var port int
	if c.VNCPort != nil {
		port = *c.VNCPort
		if err := vnc.CheckPort(h.cfg.Listen.VNC, port); err != nil {
			return err
		}
		if err := b.res.HoldVNC(port); err != nil {
			return err
		}
	} else {
		p, err := b.res.PickVNC(h.cfg.Listen.VNC, vnc.BasePort)
		if err != nil {
			return err
		}
		port = p
	}
	sealed, err := h.box.Seal(c.VNCPassword, id)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "seal vnc password")
	}
	b.sealed = sealed
	b.vnc = &vm.VNC{Listen: h.cfg.Listen.VNC, Port: port}
	return nil
}

// makeSeed writes the NoCloud seed ISO into the VM's folder (the seed
// step): user-data and network-config as asked, else a network-config
// matching each bridged or macvlan NIC by MAC.
func (b *build) makeSeed(ctx context.Context) error {
	if b.c.NoCloudInit {
		return nil
	}
	seed := filepath.Join(b.dir, "seed.iso")
	s := seedOf(b.c, b.id)
	if s.NetworkConfig == nil {
		s.NetworkConfig = generatedNetworkConfig(b.plan.nics)
	}
	if err := cloudinit.WriteISO(seed, s); err != nil {
		return errcode.Wrap(errcode.Internal, err, "write seed iso")
	}
	b.seed = seed
	return nil
}

// spec is the VM's engine spec from what the steps made.
func (b *build) spec() vm.Spec {
	c := b.c
	s := vm.Spec{
		Name: c.Name, UUID: b.id, Arch: c.Arch, VCPUs: c.VCPUs, MemoryMB: c.MemoryMB, CPULimit: c.CPULimit,
		VNC: b.vnc,
		Disks: append([]vm.Disk{{Path: b.root, Format: "qcow2", Bus: rootBuses[c.RootDiskIOBus], BootIndex: rootBootIndex,
			Backing: &vm.Backing{Path: b.entry.Path, Format: b.entry.Format}}}, b.plan.disks...),
		NICs:        b.plan.nics,
		Firmware:    b.fw,
		TPM:         b.tpm,
		HostDevices: b.plan.host,
		OwnedPaths:  b.owned,
	}
	if b.seed != "" {
		s.CDROMs = []vm.CDROM{{Path: b.seed}}
	}
	s.CDROMs = append(s.CDROMs, b.cdroms...)
	return s
}

// record is the VM's record from the request and what the steps made.
func (b *build) record() vm.Record {
	c := b.c
	diskGiB := c.DiskGiB
	if diskGiB == 0 {
		diskGiB = int((b.entry.VirtualSize + (1<<30 - 1)) >> 30)
	}
	network := c.Network
	if network == "" && len(b.plan.nics) > 0 {
		network = b.plan.nics[0].Network
	}
	if network != "" {
		if name, _, err := b.h.network(network); err == nil {
			network = name
		}
	}
	return vm.Record{ImageURL: c.ImageURL, ImageSHA256: b.entry.Digest, ImageFormat: b.entry.Format, Pool: c.Pool, DiskGiB: diskGiB,
		Network: network, CloudInit: !c.NoCloudInit, DesiredPhase: api.PhaseRunning, LastTask: b.task, Forwards: b.plan.forwards,
		RootDiskIOBus: c.RootDiskIOBus, Autostart: c.Autostart == nil || *c.Autostart, VNCPassword: b.sealed, RestartPolicy: c.RestartPolicy,
		Devices: keptDevices(c.Devices), CDROMPins: b.pins}
}

// define registers the VM with the engine, stopped, with its record.
func (b *build) define(ctx context.Context) error {
	rec := b.record()
	v, err := b.h.engine.Define(ctx, b.spec(), &rec)
	if err != nil {
		return err
	}
	name := b.c.Name
	b.undo.add(func() { b.h.engine.Delete(context.Background(), name) })
	b.view = v
	return nil
}

// start boots the VM.
func (b *build) start(ctx context.Context) error {
	b.progress(api.Progress{Phase: "boot", Done: 0, Total: -1})
	v, err := b.h.engine.Start(ctx, b.c.Name)
	if err != nil {
		return err
	}
	b.view = v
	return nil
}
