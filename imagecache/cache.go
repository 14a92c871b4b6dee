package imagecache

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/internal/flock"
)

// PoolConfig names a storage pool and its directory.
type PoolConfig struct {
	Name, Dir string
	Default   bool
}

// Options tune the cache. The zero value is usable.
type Options struct {
	// MaxConcurrentDownloads bounds downloads running at once, over all
	// pools. Default 2.
	MaxConcurrentDownloads int
	// MaxImageBytes is the largest image accepted. Default 64 GiB. A larger
	// image fails with image_download_failed.
	MaxImageBytes int64
	// MaxCacheBytes is the per-pool cache size (allocated bytes) above which
	// unpinned entries are evicted. 0 means unlimited.
	MaxCacheBytes int64
	// MinFreeBytes is the free-space floor of each pool: a download that
	// would go under it fails with disk_full, and eviction runs while free
	// space is under it. 0 means the default, 1 GiB; negative means none.
	MinFreeBytes int64
	// AllowFileURLs lets requests use file:// URLs (local use only).
	AllowFileURLs bool
	// HTTPClient is used for downloads. nil means a client that honours the
	// proxy environment variables, verifies TLS and follows at most 5
	// redirects (never from https to http). A client without CheckRedirect
	// gets that redirect policy too.
	HTTPClient *http.Client
	// QemuImg is the qemu-img binary. Default "qemu-img".
	QemuImg string
	// Observer, when set, is told about cache lookups, ingests and
	// evictions (metrics). Its methods must not block.
	Observer Observer
	// Logger receives structured logs. Default zap.NewNop().
	Logger *zap.Logger
	// PartialMaxAge is how long an interrupted download is kept for resume.
	// Default 24h.
	PartialMaxAge time.Duration

	// Knobs for tests (zero means the default).
	chunkSize       int           // bytes per pipeline buffer
	checkpointBytes int64         // resume sidecar interval
	retryBackoff    time.Duration // first retry delay
	idleTimeout     time.Duration // no body bytes for this long: retry
	joined          func()        // called when an Ensure joins a download
	noDirectIO      bool          // write through the page cache only
}

const (
	defaultMaxImageBytes   = 64 << 30
	defaultMinFreeBytes    = 1 << 30
	defaultChunkSize       = 4 << 20
	defaultCheckpointBytes = 256 << 20
	defaultRetryBackoff    = 250 * time.Millisecond
	defaultIdleTimeout     = 60 * time.Second
	defaultPartialMaxAge   = 24 * time.Hour
	maxRedirects           = 5
)

// Observer receives cache events; *metrics.Metrics implements it.
type Observer interface {
	ObserveImageLookup(pool string, hit bool)
	ObserveImageIngest(pool string, bytes int64, d time.Duration, err error)
	ObserveImageEviction(pool string, bytes int64)
}

type nopObserver struct{}

func (nopObserver) ObserveImageLookup(string, bool)                        {}
func (nopObserver) ObserveImageIngest(string, int64, time.Duration, error) {}
func (nopObserver) ObserveImageEviction(string, int64)                     {}

// PoolStats reports one pool.
type PoolStats struct {
	Name       string
	Dir        string
	Default    bool
	TotalBytes int64 // size of the pool's file system
	FreeBytes  int64 // bytes available on it
	CacheBytes int64 // allocated bytes of committed images
	Images     int   // committed images
	// IngestBytes is the allocated size of downloads in progress and of
	// interrupted, resumable ones.
	IngestBytes int64
}

// Cache is the image cache of all pools. It is safe for concurrent use.
type Cache struct {
	opts   Options
	log    *zap.Logger
	client *http.Client
	pools  map[string]*pool
	order  []string
	def    string
	sem    chan struct{}

	ctx    context.Context // cancelled by Close: ends downloads
	cancel context.CancelFunc
	wg     sync.WaitGroup // running downloads

	mu      sync.Mutex
	flights map[flightKey]*flight
	closed  bool
}

var poolNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Open prepares every pool (creating its directories), takes each pool's
// lock, sweeps leftovers of interrupted work and loads the index.
func Open(pools []PoolConfig, opts Options) (*Cache, error) {
	opts = opts.withDefaults()
	c := &Cache{
		opts:    opts,
		log:     opts.Logger,
		client:  httpClient(opts.HTTPClient),
		pools:   make(map[string]*pool),
		sem:     make(chan struct{}, opts.MaxConcurrentDownloads),
		flights: make(map[flightKey]*flight),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	ok := false
	defer func() {
		if !ok {
			c.releasePools()
		}
	}()
	for _, pc := range pools {
		if !poolNameRE.MatchString(pc.Name) {
			return nil, errcode.New(errcode.ValidationFailed, "invalid pool name %q", pc.Name)
		}
		if _, dup := c.pools[pc.Name]; dup {
			return nil, errcode.New(errcode.ValidationFailed, "pool %q configured twice", pc.Name)
		}
		if !filepath.IsAbs(pc.Dir) {
			return nil, errcode.New(errcode.ValidationFailed, "pool %q: directory %q is not absolute", pc.Name, pc.Dir)
		}
		if pc.Default {
			if c.def != "" {
				return nil, errcode.New(errcode.ValidationFailed, "pools %q and %q are both default", c.def, pc.Name)
			}
			c.def = pc.Name
		}
		if err := os.MkdirAll(pc.Dir, 0o755); err != nil {
			return nil, errcode.Wrap(errcode.ValidationFailed, err, "pool %q: create directory", pc.Name)
		}
		dir, err := filepath.EvalSymlinks(filepath.Clean(pc.Dir))
		if err != nil {
			return nil, errcode.Wrap(errcode.ValidationFailed, err, "pool %q: resolve directory", pc.Name)
		}
		for _, q := range c.pools {
			if within(q.dir, dir) || within(dir, q.dir) {
				return nil, errcode.New(errcode.ValidationFailed, "pools %q and %q overlap (%s, %s)", q.name, pc.Name, q.dir, dir)
			}
		}
		p, err := c.openPool(pc, dir)
		if err != nil {
			return nil, err
		}
		c.pools[p.name] = p
		c.order = append(c.order, p.name)
	}
	ok = true
	return c, nil
}

func (o Options) withDefaults() Options {
	if o.Observer == nil {
		o.Observer = nopObserver{}
	}
	if o.MaxConcurrentDownloads <= 0 {
		o.MaxConcurrentDownloads = 2
	}
	if o.MaxImageBytes <= 0 {
		o.MaxImageBytes = defaultMaxImageBytes
	}
	if o.MaxCacheBytes < 0 {
		o.MaxCacheBytes = 0
	}
	switch {
	case o.MinFreeBytes == 0:
		o.MinFreeBytes = defaultMinFreeBytes
	case o.MinFreeBytes < 0:
		o.MinFreeBytes = 0
	}
	if o.QemuImg == "" {
		o.QemuImg = "qemu-img"
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.PartialMaxAge <= 0 {
		o.PartialMaxAge = defaultPartialMaxAge
	}
	if o.chunkSize <= 0 {
		o.chunkSize = defaultChunkSize
	}
	if o.checkpointBytes <= 0 {
		o.checkpointBytes = defaultCheckpointBytes
	}
	if o.retryBackoff == 0 {
		o.retryBackoff = defaultRetryBackoff
	}
	if o.idleTimeout <= 0 {
		o.idleTimeout = defaultIdleTimeout
	}
	return o
}

// Close cancels running downloads (keeping resumable partials), waits for
// them to end and releases the pools' locks. The Cache must not be used
// afterwards.
func (c *Cache) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	c.releasePools()
	return nil
}

func (c *Cache) releasePools() {
	for _, p := range c.pools {
		p.release()
	}
}

// DefaultPool returns the name of the default pool.
func (c *Cache) DefaultPool() (string, error) {
	if c.def == "" {
		return "", errcode.New(errcode.DefaultPoolNotSet, "no default pool is configured")
	}
	return c.def, nil
}

// PoolDir returns the pool's directory. VM disks live under <dir>/vms/.
func (c *Cache) PoolDir(name string) (string, error) {
	p, err := c.pool(name)
	if err != nil {
		return "", err
	}
	return p.dir, nil
}

func (c *Cache) pool(name string) (*pool, error) {
	p, ok := c.pools[name]
	if !ok {
		return nil, errcode.New(errcode.PoolNotFound, "pool %q not found", name)
	}
	return p, nil
}

// Stats reports every pool, in configuration order. Figures that cannot
// be read are zero.
func (c *Cache) Stats() []PoolStats {
	out := make([]PoolStats, 0, len(c.order))
	for _, name := range c.order {
		p := c.pools[name]
		s := PoolStats{Name: p.name, Dir: p.dir, Default: p.def}
		if total, free, err := fsSpace(p.dir); err == nil {
			s.TotalBytes, s.FreeBytes = total, free
		}
		p.mu.Lock()
		s.CacheBytes = p.cacheBytes()
		s.Images = len(p.entries)
		p.mu.Unlock()
		s.IngestBytes = p.ingestBytes()
		out = append(out, s)
	}
	return out
}

// pool is one storage pool's cache. mu guards entries and byURL; the files
// of an entry change only under mu.
type pool struct {
	name, dir string
	def       bool
	images    string // <dir>/images
	data      string // <dir>/images/sha256
	index     string // <dir>/images/index
	ingest    string // <dir>/images/ingest
	vms       string // <dir>/vms
	lock      *os.File
	obs       Observer

	mu      sync.Mutex
	entries map[string]*record // by digest
	byURL   map[string]string  // URL → digest
	active  map[string]bool    // ingest keys being written
}

// openPool prepares the pool at dir (resolved, existing).
func (c *Cache) openPool(pc PoolConfig, dir string) (*pool, error) {
	p := &pool{
		obs:     c.opts.Observer,
		name:    pc.Name,
		dir:     dir,
		def:     pc.Default,
		images:  filepath.Join(dir, "images"),
		data:    filepath.Join(dir, "images", "sha256"),
		index:   filepath.Join(dir, "images", "index"),
		ingest:  filepath.Join(dir, "images", "ingest"),
		vms:     filepath.Join(dir, "vms"),
		entries: make(map[string]*record),
		byURL:   make(map[string]string),
		active:  make(map[string]bool),
	}
	for _, d := range []struct {
		path string
		mode os.FileMode
	}{{p.images, 0o755}, {p.data, 0o755}, {p.index, 0o700}, {p.ingest, 0o700}, {p.vms, 0o755}} {
		if err := os.Mkdir(d.path, d.mode); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, errcode.Wrap(errcode.Internal, err, "pool %q: create directory", pc.Name)
		}
		if fi, err := os.Lstat(d.path); err != nil || !fi.IsDir() {
			return nil, errcode.New(errcode.Internal, "pool %q: %s is not a directory", pc.Name, d.path)
		}
	}
	lock, err := os.OpenFile(filepath.Join(p.images, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "pool %q: open lock", pc.Name)
	}
	if err := flock.Exclusive(lock); err != nil {
		lock.Close()
		return nil, errcode.Wrap(errcode.Conflict, err, "pool %q: %s is in use by another process", pc.Name, dir)
	}
	p.lock = lock
	log := c.log.With(zap.String("pool", p.name))
	if err := c.sweepIngest(p, log); err != nil {
		p.release()
		return nil, err
	}
	if err := c.loadIndex(p, log); err != nil {
		p.release()
		return nil, err
	}
	return p, nil
}

func (p *pool) release() {
	if p.lock != nil {
		p.lock.Close() // closing drops the flock
		p.lock = nil
	}
}

// entryPath is the committed file of digest (a checked 64-hex string).
func (p *pool) entryPath(digest string) string { return filepath.Join(p.data, digest) }

func (p *pool) recordPath(digest string) string {
	return filepath.Join(p.index, digest+".json")
}

// cacheBytes sums the allocated bytes of committed entries; p.mu held.
func (p *pool) cacheBytes() int64 {
	var n int64
	for _, r := range p.entries {
		n += r.diskBytes
	}
	return n
}

func (p *pool) ingestBytes() int64 {
	ents, err := os.ReadDir(p.ingest)
	if err != nil {
		return 0
	}
	var n int64
	for _, e := range ents {
		if fi, err := e.Info(); err == nil {
			n += allocated(fi)
		}
	}
	return n
}

// within reports whether path is dir or lies below it (both clean).
func within(path, dir string) bool {
	return path == dir || strings.HasPrefix(path, dir+string(filepath.Separator)) || dir == "/"
}

var hexRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

func checkDigest(d string) error {
	if !hexRE.MatchString(d) {
		return errcode.New(errcode.ValidationFailed, "invalid image digest %q: want 64 lowercase hex digits", d)
	}
	return nil
}

// sortedStrings returns a sorted copy without duplicates.
func sortedStrings(in []string) []string {
	out := append([]string(nil), in...)
	sort.Strings(out)
	j := 0
	for i, s := range out {
		if i == 0 || s != out[j-1] {
			out[j] = s
			j++
		}
	}
	return out[:j]
}

func fmtBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	default:
		return fmt.Sprintf("%d bytes", n)
	}
}
