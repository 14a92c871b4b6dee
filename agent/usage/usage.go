// Package usage samples what each running VM uses: CPU time and rate and
// resident memory of its QEMU process (/proc), disk IO (QMP
// query-blockstats), NIC traffic (the counters of its tap or macvtap in
// /sys/class/net) and, when the guest has a balloon driver, its memory
// (QMP query-balloon). A Collector samples every VM at an interval and
// keeps the last sample of each; the VM view, the heartbeat, the stats API
// and /metrics all read those, so they show the same figures.
//
// It reads the VMs through Source, a small interface the agent
// implements over the engine.
package usage

import (
	"context"
	"errors"
	"sort"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/qmp"
)

// VM is one VM whose QEMU runs (running or paused).
type VM struct {
	Name, UUID string
	PID        int
	NICs       []NIC
}

// NIC is a NIC with a host link.
type NIC struct {
	Index int
	Link  string // host interface name
	// Macvtap is true for a macvtap (its rx is the guest's rx); a tap's
	// directions are the other way round (the host transmits what the
	// guest receives).
	Macvtap bool
}

// Source is what the collector reads the VMs through.
type Source interface {
	// Running lists the VMs whose QEMU runs.
	Running() []VM
	// QMP runs one QMP command on the named VM.
	QMP(ctx context.Context, name, cmd string, args, out any) error
}

// Options configure a Collector. The zero value samples every
// DefaultInterval.
type Options struct {
	Interval time.Duration
	// Workers bounds the VMs sampled at once (default 8).
	Workers int
	// QMPTimeout bounds each QMP command (default 2s).
	QMPTimeout time.Duration
	// ProcRoot and SysRoot default to /proc and /sys (tests use trees).
	ProcRoot, SysRoot string
	Now               func() time.Time
	Logger            *zap.Logger
}

// DefaultInterval is the default sampling interval.
const DefaultInterval = 10 * time.Second

// Collector samples VMs and keeps the last sample of each.
type Collector struct {
	src  Source
	o    Options
	proc procReader

	mu   sync.Mutex
	last map[string]*sample // by uuid
}

type sample struct {
	name  string
	usage api.Usage
	// noBalloon: query-balloon said the VM has none; not asked again for
	// this QEMU process.
	noBalloon bool
	// polling: the balloon's guest statistics polling was turned on in
	// this QEMU process.
	polling bool
}

// New returns a collector reading src.
func New(src Source, o Options) *Collector {
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	if o.Workers <= 0 {
		o.Workers = 8
	}
	if o.QMPTimeout <= 0 {
		o.QMPTimeout = 2 * time.Second
	}
	if o.ProcRoot == "" {
		o.ProcRoot = "/proc"
	}
	if o.SysRoot == "" {
		o.SysRoot = "/sys"
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	return &Collector{src: src, o: o, proc: newProcReader(o.ProcRoot), last: map[string]*sample{}}
}

// Interval returns the sampling interval.
func (c *Collector) Interval() time.Duration { return c.o.Interval }

// Run samples at once, then every interval, until ctx ends.
func (c *Collector) Run(ctx context.Context) {
	t := time.NewTicker(c.o.Interval)
	defer t.Stop()
	for {
		c.Collect(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Collect samples every running VM once and forgets VMs that no longer
// run.
func (c *Collector) Collect(ctx context.Context) {
	vms := c.src.Running()
	live := make(map[string]bool, len(vms))
	for _, v := range vms {
		live[v.UUID] = true
	}
	c.mu.Lock()
	for id := range c.last {
		if !live[id] {
			delete(c.last, id)
		}
	}
	c.mu.Unlock()

	work := make(chan VM)
	var wg sync.WaitGroup
	for range min(c.o.Workers, len(vms)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for v := range work {
				c.sampleVM(ctx, v)
			}
		}()
	}
	for _, v := range vms {
		select {
		case work <- v:
		case <-ctx.Done():
		}
	}
	close(work)
	wg.Wait()
}

// sampleVM samples one VM and records it. A VM whose process is gone
// (it exited between the listing and now) is dropped.
func (c *Collector) sampleVM(ctx context.Context, v VM) {
	c.mu.Lock()
	prev := c.last[v.UUID]
	c.mu.Unlock()
	if prev != nil && prev.usage.QEMUPID != v.PID {
		prev = nil // a new QEMU: its counters start again
	}
	now := c.o.Now()
	u := api.Usage{SampledAt: now.UTC(), QEMUPID: v.PID}
	cpu, rss, err := c.proc.read(v.PID)
	if err != nil {
		c.o.Logger.Debug("usage: qemu process gone", zap.String("vm", v.Name), zap.Int("qemu_pid", v.PID), zap.Error(err))
		c.mu.Lock()
		delete(c.last, v.UUID)
		c.mu.Unlock()
		return
	}
	u.CPUSeconds, u.MemoryRSSBytes = cpu, rss
	if prev != nil {
		if dt := now.Sub(prev.usage.SampledAt).Seconds(); dt > 0 {
			u.CPUPercent = max(0, (cpu-prev.usage.CPUSeconds)/dt*100)
		}
	}
	if err := c.blockStats(ctx, v.Name, &u); err != nil {
		c.o.Logger.Debug("usage: query-blockstats", zap.String("vm", v.Name), zap.Error(err))
	}
	noBalloon := prev != nil && prev.noBalloon
	polling := prev != nil && prev.polling
	if !noBalloon {
		gm, err := c.balloon(ctx, v.Name)
		switch {
		case err == nil:
			u.GuestMemory = gm
			if !polling {
				polling = c.startGuestStats(ctx, v.Name)
			} else {
				c.guestStats(ctx, v.Name, gm)
			}
		case isNoBalloon(err):
			noBalloon = true
		default:
			c.o.Logger.Debug("usage: query-balloon", zap.String("vm", v.Name), zap.Error(err))
		}
	}
	c.netStats(v.NICs, &u)
	c.mu.Lock()
	c.last[v.UUID] = &sample{name: v.Name, usage: u, noBalloon: noBalloon, polling: polling}
	c.mu.Unlock()
}

// blockStats fills u's disks from query-blockstats.
func (c *Collector) blockStats(ctx context.Context, name string, u *api.Usage) error {
	ctx, cancel := context.WithTimeout(ctx, c.o.QMPTimeout)
	defer cancel()
	var reply []struct {
		Device   string `json:"device"`
		QDev     string `json:"qdev"`
		NodeName string `json:"node-name"`
		Stats    struct {
			RdBytes int64 `json:"rd_bytes"`
			WrBytes int64 `json:"wr_bytes"`
			RdOps   int64 `json:"rd_operations"`
			WrOps   int64 `json:"wr_operations"`
		} `json:"stats"`
	}
	if err := c.src.QMP(ctx, name, "query-blockstats", nil, &reply); err != nil {
		return err
	}
	for _, b := range reply {
		node := b.NodeName
		if node == "" {
			node = b.Device
		}
		if node == "" {
			node = b.QDev
		}
		d := api.DiskUsage{Node: node, ReadBytes: b.Stats.RdBytes, WriteBytes: b.Stats.WrBytes, ReadOps: b.Stats.RdOps, WriteOps: b.Stats.WrOps}
		u.Disks = append(u.Disks, d)
		u.DiskReadBytes += d.ReadBytes
		u.DiskWriteBytes += d.WriteBytes
		u.DiskReadOps += d.ReadOps
		u.DiskWriteOps += d.WriteOps
	}
	sort.Slice(u.Disks, func(i, j int) bool { return u.Disks[i].Node < u.Disks[j].Node })
	return nil
}

// balloon asks the guest's balloon for its memory.
func (c *Collector) balloon(ctx context.Context, name string) (*api.GuestMemory, error) {
	ctx, cancel := context.WithTimeout(ctx, c.o.QMPTimeout)
	defer cancel()
	var reply struct {
		Actual int64 `json:"actual"`
	}
	if err := c.src.QMP(ctx, name, "query-balloon", nil, &reply); err != nil {
		return nil, err
	}
	return &api.GuestMemory{ActualBytes: reply.Actual}, nil
}

// balloonPath is the QOM path of the engine's balloon (vm.BalloonID).
const balloonPath = "/machine/peripheral/balloon0"

// startGuestStats asks the balloon driver to report the guest's memory
// statistics every interval (whole seconds, at least one); the next
// samples read them. It reports whether polling is on.
func (c *Collector) startGuestStats(ctx context.Context, name string) bool {
	ctx, cancel := context.WithTimeout(ctx, c.o.QMPTimeout)
	defer cancel()
	secs := max(int(c.o.Interval/time.Second), 1)
	err := c.src.QMP(ctx, name, "qom-set", map[string]any{"path": balloonPath, "property": "guest-stats-polling-interval", "value": secs}, nil)
	if err != nil {
		c.o.Logger.Debug("usage: balloon stats polling", zap.String("vm", name), zap.Error(err))
		return false
	}
	return true
}

// guestStats adds the guest's last reported statistics to gm. A value
// the guest does not report is -1 (or absent) and left out.
func (c *Collector) guestStats(ctx context.Context, name string, gm *api.GuestMemory) {
	ctx, cancel := context.WithTimeout(ctx, c.o.QMPTimeout)
	defer cancel()
	var reply struct {
		Stats      map[string]int64 `json:"stats"`
		LastUpdate int64            `json:"last-update"`
	}
	if err := c.src.QMP(ctx, name, "qom-get", map[string]any{"path": balloonPath, "property": "guest-stats"}, &reply); err != nil {
		c.o.Logger.Debug("usage: balloon guest stats", zap.String("vm", name), zap.Error(err))
		return
	}
	if reply.LastUpdate == 0 {
		return // the guest has not reported yet
	}
	pos := func(k string) int64 { return max(reply.Stats[k], 0) }
	gm.TotalBytes, gm.FreeBytes, gm.AvailableBytes = pos("stat-total-memory"), pos("stat-free-memory"), pos("stat-available-memory")
}

// isNoBalloon reports QEMU's answer for a VM without a balloon device.
func isNoBalloon(err error) bool {
	var qe *qmp.Error
	return errors.As(err, &qe) && (qe.Class == "DeviceNotActive" || qe.Class == "KVMMissingCap")
}

// Get returns the last sample of the VM with uuid.
func (c *Collector) Get(uuid string) (api.Usage, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.last[uuid]
	if s == nil {
		return api.Usage{}, false
	}
	return s.usage, true
}

// Sample is one VM's last sample.
type Sample struct {
	Name, UUID string
	Usage      api.Usage
}

// All returns the last sample of every VM that runs, sorted by name.
func (c *Collector) All() []Sample {
	c.mu.Lock()
	out := make([]Sample, 0, len(c.last))
	for id, s := range c.last {
		out = append(out, Sample{Name: s.name, UUID: id, Usage: s.usage})
	}
	c.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
