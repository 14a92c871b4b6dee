// Package agent is the daemon's brain: it wires the VM engine, the image
// cache and the seed builder into a Host that executes control-plane tasks
// and reports this node's inventory.
package agent

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/events"
	"github.com/otherix/otherix-agent/agent/firmware"
	"github.com/otherix/otherix-agent/agent/hostdev"
	"github.com/otherix/otherix-agent/agent/metrics"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/secrets"
	"github.com/otherix/otherix-agent/agent/usage"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/imagecache"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/qmp"
)

// Version is the agent's version token (agent_version), set by cmd from
// build info (internal/buildinfo).
var Version = "v0.0.0-unknown"

// Host runs tasks against this node.
type Host struct {
	cfg    *config.Config
	log    *zap.Logger
	engine *vm.Engine
	cache  *imagecache.Cache

	creates chan struct{} // create concurrency limit

	// apiURL and apiCertSHA256: SetAPI (cluster mode), under apiMu.
	apiMu                 sync.Mutex
	apiURL, apiCertSHA256 string

	qemuVersion string
	onChange    func(api.VM)

	firmwares *firmware.Catalog
	box       *secrets.Box     // seals VNC passwords at rest
	usage     *usage.Collector // nil when usage.interval is 0
	events    *events.Store    // every VM's history
	life      lifecycle        // status changes no task ordered

	// Facts of the host found once at start (every heartbeat reports
	// them; the binaries change only with a restart).
	arches []string
	memMB  int64
}

// Options are the parts of a Host that tests and cmd inject.
type Options struct {
	Logger   *zap.Logger
	Placer   vm.Placer
	Env      []string
	OnChange func(api.VM) // VM view changes (status, pid)
	// Engine tuning (zero = defaults).
	PowerdownInterval time.Duration
	// Metrics, optional.
	Metrics *metrics.Metrics
	// BootIDPath is where the host's boot id is read (default
	// /proc/sys/kernel/random/boot_id); tests simulate a host reboot.
	BootIDPath string
	// HostDevices is the host's sysfs and /dev for passthrough (nil: the
	// real /sys and /dev); tests pass a fake tree (hostdev/sysfstest).
	HostDevices *hostdev.Host
}

// NewHost opens the image cache and the VM engine and re-adopts VMs.
func NewHost(ctx context.Context, cfg *config.Config, o Options) (*Host, error) {
	log := o.Logger
	if log == nil {
		log = zap.NewNop()
	}
	h := &Host{cfg: cfg, log: log, onChange: o.OnChange}
	h.creates = make(chan struct{}, cfg.Limits.ConcurrentCreates)

	var pools []imagecache.PoolConfig
	for name, p := range cfg.Pools {
		pools = append(pools, imagecache.PoolConfig{Name: name, Dir: p.Path, Default: name == cfg.DefaultPool})
	}
	cache, err := imagecache.Open(pools, imagecache.Options{
		MaxConcurrentDownloads: cfg.Limits.ConcurrentDownloads,
		MaxImageBytes:          cfg.Limits.MaxImageBytes,
		MaxCacheBytes:          cfg.Limits.CacheMaxBytes,
		MinFreeBytes:           cfg.Limits.MinFreeBytes,
		AllowFileURLs:          cfg.Images.AllowFileURLs,
		Logger:                 log.Named("imagecache"),
		Observer:               o.Metrics,
	})
	if err != nil {
		return nil, err
	}
	h.cache = cache
	accel := cfg.QEMU.Accel
	if accel == "auto" {
		accel = ""
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		cache.Close()
		return nil, err
	}
	box, err := secrets.Open(filepath.Join(cfg.DataDir, "secret.key"))
	if err != nil {
		cache.Close()
		return nil, err
	}
	h.box = box
	evs, err := events.Open(filepath.Join(cfg.DataDir, "events"), events.Options{Observe: o.Metrics.ObserveVMEvent, Logger: log.Named("events")})
	if err != nil {
		cache.Close()
		return nil, err
	}
	h.events = evs
	cred, uids, err := qemuIdentity(cfg.QEMU)
	if err != nil {
		cache.Close()
		return nil, err
	}
	hostdevs := o.HostDevices
	if hostdevs == nil {
		hostdevs = &hostdev.Host{}
	}
	boot, booted, err := bootChanged(cfg.DataDir, o.BootIDPath)
	if err != nil {
		log.Warn("host boot id", zap.Error(err))
	}
	eng, err := vm.New(vm.Config{
		HostBooted:        booted,
		HostDevices:       hostdevs,
		Credential:        cred,
		UIDs:              uids,
		StateDir:          cfg.DataDir,
		RunDir:            cfg.RunDir,
		Binaries:          map[string]string{vm.ArchAMD64: cfg.QEMU.X86_64, vm.ArchARM64: cfg.QEMU.AArch64},
		Accel:             accel,
		StopTimeout:       cfg.QEMU.StopTimeout,
		PowerdownInterval: o.PowerdownInterval,
		Env:               o.Env,
		Placer:            o.Placer,
		ExitCause:         exitCause(o.Placer),
		Dial: func(ctx context.Context, path string) (vm.Monitor, error) {
			return qmp.Dial(ctx, path, qmp.WithLogger(log.Named("qmp")), qmp.WithObserver(o.Metrics.QMPObserver()))
		},
		Logger:       log.Named("vm"),
		OnGuestAgent: h.onGuestAgent,
		OnRunState:   h.onRunState,
		AfterStart:   h.afterStart,
		OnChange: func(v vm.View) {
			h.syncNetState(v)
			h.followStatus(v)
			if h.onChange != nil {
				h.onChange(h.toAPI(v))
			}
		},
	})
	if err != nil {
		cache.Close()
		return nil, err
	}
	h.engine = eng
	if cfg.Usage.Interval > 0 {
		h.usage = usage.New(usageSource{eng}, usage.Options{Interval: cfg.Usage.Interval, Logger: log.Named("usage")})
	}
	if err := eng.Recover(ctx); err != nil {
		cache.Close()
		return nil, err
	}
	h.qemuVersion = qemuVersion(cfg.QEMU.X86_64)
	h.memMB = memTotalMB()
	for _, a := range []string{vm.ArchAMD64, vm.ArchARM64} {
		if _, err := exec.LookPath(eng.Binary(a)); err == nil {
			h.arches = append(h.arches, a)
		}
	}
	fw, err := firmware.Load(ctx, firmware.Options{
		Binaries: map[string]string{vm.ArchAMD64: cfg.QEMU.X86_64, vm.ArchARM64: cfg.QEMU.AArch64},
		Logger:   log.Named("firmware"),
	})
	if err != nil {
		eng.Close()
		cache.Close()
		return nil, err
	}
	h.firmwares = fw
	h.sweep() // what a create or delete cut by an agent kill left behind
	if booted {
		h.afterBoot(ctx)
		if err := os.WriteFile(filepath.Join(cfg.DataDir, "boot_id"), []byte(boot+"\n"), 0o600); err != nil {
			log.Warn("record host boot id", zap.Error(err))
		}
	}
	log.Info("host ready", zap.String("accel", eng.Accel()), zap.String("placement", eng.Placement()), zap.Int("vms", len(eng.List())))
	return h, nil
}

// exitCause is the placer's explanation of QEMU exits, when it has one
// (ScopePlacer: the memory cap's OOM kills).
func exitCause(p vm.Placer) func(vm.View) string {
	if ec, ok := p.(interface{ ExitCause(vm.View) string }); ok {
		return ec.ExitCause
	}
	return nil
}

// Close detaches from VMs (they keep running) and closes the cache.
func (h *Host) Close() {
	h.engine.Close()
	h.cache.Close()
	if h.events == nil {
		return
	}
	if err := h.events.Flush(); err != nil {
		h.log.Warn("persist vm events", zap.Error(err))
	}
}

// Engine exposes the VM engine (for the API's console endpoint and tests).
func (h *Host) Engine() *vm.Engine { return h.engine }

// Secrets is the host's sealing box (the key in <data_dir>/secret.key).
func (h *Host) Secrets() *secrets.Box { return h.box }

// Cache exposes the image cache.
func (h *Host) Cache() *imagecache.Cache { return h.cache }

// qemuIdentity is who QEMU runs as. With qemu.uid_range each VM gets its
// own uid (the engine picks it) and the credential is the template for its
// groups: qemu.user's when that user exists (it is also what VMs started
// before the range was set keep until their next start), else the kvm
// group alone. Without a range every QEMU runs as qemu.user.
func qemuIdentity(q config.QEMU) (*syscall.Credential, *vm.UIDRange, error) {
	cred, err := QEMUCredential(q.User)
	if q.UIDRange == "" {
		return cred, nil, err
	}
	first, count, perr := config.ParseUIDRange(q.UIDRange)
	if perr != nil {
		return nil, nil, fmt.Errorf("qemu.uid_range: %w", perr)
	}
	if err != nil || cred == nil {
		cred = &syscall.Credential{Groups: kvmGroups()}
	}
	return cred, &vm.UIDRange{First: first, Count: count}, nil
}

// kvmGroups is the kvm group's id, when the group exists (/dev/kvm).
func kvmGroups() []uint32 {
	groups := []uint32{}
	if g, err := user.LookupGroup("kvm"); err == nil {
		if id, err := strconv.ParseUint(g.Gid, 10, 32); err == nil {
			groups = append(groups, uint32(id))
		}
	}
	return groups
}

// QEMUCredential resolves the unprivileged user QEMU runs as: its uid and
// primary gid, plus the kvm group when it exists (for /dev/kvm), and no
// other group. An empty name means QEMU runs as the agent's user.
func QEMUCredential(name string) (*syscall.Credential, error) {
	if name == "" {
		return nil, nil
	}
	u, err := user.Lookup(name)
	if err != nil {
		return nil, fmt.Errorf("qemu.user %q: %w (create it: useradd --system --no-create-home --shell /usr/sbin/nologin %s)", name, err, name)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("qemu.user %q: bad uid/gid %s/%s", name, u.Uid, u.Gid)
	}
	if uid == 0 {
		return nil, fmt.Errorf("qemu.user %q is root: QEMU must run unprivileged", name)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: kvmGroups()}, nil
}

func qemuVersion(bin string) string {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(strings.TrimPrefix(line, "QEMU emulator version "))
}

// Node reports this host for registration.
func (h *Host) Node(ctx context.Context) protocol.NodeInfo {
	n := protocol.NodeInfo{
		Name:         h.cfg.NodeName,
		AgentVersion: Version,
		QEMUVersion:  h.qemuVersion,
		Arch:         runtime.GOARCH,
		KVM:          h.engine.Accel() == "kvm",
		CPUs:         runtime.NumCPU(),
		MemoryMB:     h.memMB,
		Arches:       h.Arches(),
	}
	for _, f := range h.firmwares.Entries() {
		n.Firmwares = append(n.Firmwares, f.Name+"/"+f.Arch)
	}
	for _, s := range h.cache.Stats() {
		n.Pools = append(n.Pools, protocol.PoolInfo{Name: s.Name, TotalBytes: s.TotalBytes, FreeBytes: protocol.RoundFreeBytes(s.FreeBytes)})
	}
	for name, nw := range h.cfg.Networks {
		n.Networks = append(n.Networks, protocol.NetworkInfo{Name: name, Bridge: nw.Bridge, Type: nw.Type})
	}
	// In a set order: node_info is sent again whenever its JSON changes.
	slices.SortFunc(n.Networks, func(a, b protocol.NetworkInfo) int { return strings.Compare(a.Name, b.Name) })
	n.DefaultPool, _ = h.cache.DefaultPool()
	h.apiMu.Lock()
	n.APIURL, n.APICertSHA256 = h.apiURL, h.apiCertSHA256
	h.apiMu.Unlock()
	return n
}

// SetAPI records where this host serves the /v1 API to the other hosts of
// its cluster, and its TLS certificate's sha256 (hex; "" without TLS):
// registration carries them (NodeInfo.APIURL).
func (h *Host) SetAPI(url, certSHA256 string) {
	h.apiMu.Lock()
	h.apiURL, h.apiCertSHA256 = url, certSHA256
	h.apiMu.Unlock()
}

// Arches lists the guest arches whose QEMU binary is installed.
func (h *Host) Arches() []string { return h.arches }

func memTotalMB() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			var kb int64
			for _, c := range f[1] {
				kb = kb*10 + int64(c-'0')
			}
			return kb / 1024
		}
	}
	return 0
}

// vmDir is where a VM's disk and seed live in its pool.
func (h *Host) vmDir(pool, uuid string) (string, error) {
	dir, err := h.cache.PoolDir(pool)
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, "vms", uuid)
	if !strings.HasPrefix(p, filepath.Clean(dir)+string(os.PathSeparator)) {
		return "", errcode.New(errcode.ValidationFailed, "vm dir escapes pool %q", pool)
	}
	return p, nil
}

// bootChanged reads the host's boot id (bootIDPath, default
// /proc/sys/kernel/random/boot_id) and reports whether it differs from
// the one recorded in <dataDir>/boot_id: the host booted since.
func bootChanged(dataDir, bootIDPath string) (boot string, booted bool, err error) {
	if bootIDPath == "" {
		bootIDPath = "/proc/sys/kernel/random/boot_id"
	}
	b, err := os.ReadFile(bootIDPath)
	if err != nil {
		return "", false, err
	}
	boot = strings.TrimSpace(string(b))
	last, err := os.ReadFile(filepath.Join(dataDir, "boot_id"))
	return boot, err != nil || strings.TrimSpace(string(last)) != boot, nil
}

// afterBoot runs once after a host boot, before the agent declares itself
// ready: every VM desired running that the boot stopped is started when
// it has autostart on, a few at a time, and otherwise left stopped with
// its desired phase stopped (the control plane learns it from the
// heartbeat), so nothing starts it until a start by request. A mere
// agent restart does none of this: running VMs were re-adopted.
func (h *Host) afterBoot(ctx context.Context) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, h.cfg.Limits.ConcurrentCreates)
	for _, v := range h.engine.List() {
		m := v.Record
		if v.Reason == vm.ReasonHostRebooted {
			h.event(v, api.EventHostRebooted, "", "")
		}
		if m.DesiredPhase != api.PhaseRunning || (v.Status != api.StatusStopped && v.Status != api.StatusCrashed) {
			continue
		}
		if !m.Autostart {
			h.updateRecord(v.Spec.Name, func(m *vm.Record) { m.DesiredPhase = api.PhaseStopped })
			h.log.Info("host booted: autostart is off, vm left stopped", zap.String("vm", v.Spec.Name))
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func(name string) {
			defer func() { <-sem; wg.Done() }()
			if _, err := h.engine.Start(ctx, name); err != nil {
				h.log.Warn("autostart failed", zap.String("vm", name), zap.Error(err))
				return
			}
			h.log.Info("autostarted after host boot", zap.String("vm", name))
			h.eventByName(name, api.EventAutostarted, "", "")
		}(v.Spec.Name)
	}
	wg.Wait()
}

// Firmwares lists the firmware catalogue.
func (h *Host) Firmwares() []api.Firmware {
	var out []api.Firmware
	for _, e := range h.firmwares.Entries() {
		out = append(out, api.Firmware{Name: e.Name, UUID: e.UUID, Arch: e.Arch, Description: e.Description,
			SecureBoot: e.SecureBoot, Descriptor: e.Descriptor})
	}
	return out
}
