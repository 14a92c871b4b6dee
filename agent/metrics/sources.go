package metrics

import (
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/imagecache"
)

// sources is the collector of the series computed at scrape time from
// functions the daemon provides (SetVMs, SetPools, SetControlPlane).
type sources struct {
	mu        sync.Mutex
	vms       func() []api.VM
	pools     func() []imagecache.PoolStats
	connected func() bool
	lastHB    func() time.Time
	now       func() time.Time

	vmsDesc, connDesc, hbAgeDesc                   *prometheus.Desc
	poolSize, poolFree, poolCache, poolIngest, img *prometheus.Desc
}

// vmStatuses are always reported, 0 when no VM has them, so that a rate
// or an alert over a status does not see the series vanish.
var vmStatuses = []string{
	api.StatusCreating, api.StatusStarting, api.StatusRunning, api.StatusPaused, api.StatusStopping,
	api.StatusStopped, api.StatusCrashed, api.StatusDeleting, api.StatusError,
}

func newSources() *sources {
	name := func(n string) string { return prometheus.BuildFQName(namespace, "", n) }
	pool := []string{"pool"}
	return &sources{
		now:        time.Now,
		vmsDesc:    prometheus.NewDesc(name("vms"), "VMs on this host by status.", []string{"status"}, nil),
		connDesc:   prometheus.NewDesc(name("control_plane_connected"), "1 when the last control-plane request succeeded.", nil, nil),
		hbAgeDesc:  prometheus.NewDesc(name("control_plane_heartbeat_age_seconds"), "Seconds since the control plane last acknowledged a heartbeat (absent before the first).", nil, nil),
		poolSize:   prometheus.NewDesc(name("pool_size_bytes"), "Size of the pool's file system.", pool, nil),
		poolFree:   prometheus.NewDesc(name("pool_free_bytes"), "Bytes available on the pool's file system.", pool, nil),
		poolCache:  prometheus.NewDesc(name("pool_cache_bytes"), "Allocated bytes of the pool's committed images.", pool, nil),
		poolIngest: prometheus.NewDesc(name("pool_ingest_bytes"), "Allocated bytes of the pool's running and resumable downloads.", pool, nil),
		img:        prometheus.NewDesc(name("pool_images"), "Committed images in the pool's cache.", pool, nil),
	}
}

func (s *sources) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{s.vmsDesc, s.connDesc, s.hbAgeDesc, s.poolSize, s.poolFree, s.poolCache, s.poolIngest, s.img} {
		ch <- d
	}
}

func (s *sources) Collect(ch chan<- prometheus.Metric) {
	s.mu.Lock()
	vms, pools, connected, lastHB := s.vms, s.pools, s.connected, s.lastHB
	s.mu.Unlock()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	if vms != nil {
		counts := map[string]int{}
		for _, st := range vmStatuses {
			counts[st] = 0
		}
		for _, v := range vms() {
			counts[orOther(v.Status)]++
		}
		keys := make([]string, 0, len(counts))
		for k := range counts {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			gauge(s.vmsDesc, float64(counts[k]), k)
		}
	}
	if pools != nil {
		for _, p := range pools() {
			gauge(s.poolSize, float64(p.TotalBytes), p.Name)
			gauge(s.poolFree, float64(p.FreeBytes), p.Name)
			gauge(s.poolCache, float64(p.CacheBytes), p.Name)
			gauge(s.poolIngest, float64(p.IngestBytes), p.Name)
			gauge(s.img, float64(p.Images), p.Name)
		}
	}
	if connected != nil {
		v := 0.0
		if connected() {
			v = 1
		}
		gauge(s.connDesc, v)
	}
	if lastHB != nil {
		if t := lastHB(); !t.IsZero() {
			gauge(s.hbAgeDesc, max(s.now().Sub(t).Seconds(), 0))
		}
	}
}
