// Package config is the agent's one configuration file: YAML, every key
// documented in docs/config.md with its default. Unknown keys and bad
// values are errors that name the key and the line.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// DefaultPath is where the agent looks for its config file.
const DefaultPath = "/etc/otherix/agent.yaml"

// Config is the whole configuration.
type Config struct {
	// Standalone runs the agent with its in-process control plane and the
	// /v1 API, as --standalone does (the packaged unit needs no drop-in).
	Standalone   bool               `yaml:"standalone"`
	NodeName     string             `yaml:"node_name"`
	DataDir      string             `yaml:"data_dir"`
	RunDir       string             `yaml:"run_dir"`
	Pools        map[string]Pool    `yaml:"pools"`
	DefaultPool  string             `yaml:"default_pool"`
	Networks     map[string]Network `yaml:"networks"`
	ControlPlane ControlPlane       `yaml:"control_plane"`
	Cluster      Cluster            `yaml:"cluster"`
	Listen       Listen             `yaml:"listen"`
	QEMU         QEMU               `yaml:"qemu"`
	Images       Images             `yaml:"images"`
	Devices      Devices            `yaml:"devices"`
	Limits       Limits             `yaml:"limits"`
	Usage        Usage              `yaml:"usage"`
	Restart      Restart            `yaml:"restart"`
	Log          Log                `yaml:"log"`
}

// Restart tunes restart policies: restarts of a VM back off from
// BackoffBase doubling up to BackoffMax, and reset once it has run for
// Stable; CrashLoopCount crashes within CrashLoopWindow stop them.
type Restart struct {
	BackoffBase     time.Duration `yaml:"backoff_base"`
	BackoffMax      time.Duration `yaml:"backoff_max"`
	Stable          time.Duration `yaml:"stable"`
	CrashLoopCount  int           `yaml:"crash_loop_count"`
	CrashLoopWindow time.Duration `yaml:"crash_loop_window"`
}

// Pool is a storage pool: a directory holding an image cache and VM disks.
type Pool struct {
	Path string `yaml:"path"`
}

// Network is a host network VMs attach to.
type Network struct {
	UUID   string `yaml:"uuid"`
	Type   string `yaml:"type"`   // bridge or macvlan
	Bridge string `yaml:"bridge"` // type bridge
	Parent string `yaml:"parent"` // type macvlan
}

// ControlPlane is the connection to the control plane (not used with
// --standalone).
type ControlPlane struct {
	URL       string `yaml:"url"`
	TokenFile string `yaml:"token_file"`
	CAFile    string `yaml:"ca_file"`
	CertFile  string `yaml:"cert_file"`
	KeyFile   string `yaml:"key_file"`
}

// Cluster is cluster mode (docs/cluster.md): with etcd endpoints set, the
// agent runs its node agent and a stateless replica of the control plane
// (the /v1 API and the agent protocol) whose state lives in etcd.
type Cluster struct {
	Etcd Etcd `yaml:"etcd"`
	// HeartbeatInterval is how often this host's agent sends a heartbeat;
	// its node reads lost after three intervals without one.
	HeartbeatInterval time.Duration `yaml:"heartbeat_interval"`
}

// Etcd is the connection to the cluster's etcd.
type Etcd struct {
	// Endpoints are client URLs (https; http only on loopback).
	Endpoints []string `yaml:"endpoints"`
	// CAFile is the PEM CA of the members' certificates (system roots
	// when empty); CertFile and KeyFile a client certificate.
	CAFile   string `yaml:"ca_file"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// Prefix is the key prefix of the cluster's state.
	Prefix string `yaml:"prefix"`
}

// ClusterMode reports whether the config asks for cluster mode.
func (c *Config) ClusterMode() bool { return len(c.Cluster.Etcd.Endpoints) > 0 }

// Listen holds the agent's own listeners.
type Listen struct {
	API     string `yaml:"api"`     // standalone API, host:port
	Socket  string `yaml:"socket"`  // standalone API unix socket
	Metrics string `yaml:"metrics"` // Prometheus /metrics, host:port; empty = off
	// Forwards is the host address PROXY devices listen on (default all).
	Forwards string `yaml:"forwards"`
	// VNC is the host address VNC consoles listen on.
	VNC string `yaml:"vnc"`
	// TLSCert and TLSKey (PEM) serve the standalone API over TLS;
	// TokenFile holds the bearer token it then asks for. All three are
	// required when listen.api is not a loopback address.
	TLSCert   string `yaml:"tls_cert"`
	TLSKey    string `yaml:"tls_key"`
	TokenFile string `yaml:"token_file"`
}

// QEMU configures how VMs run.
type QEMU struct {
	User string `yaml:"user"` // unprivileged user QEMU runs as without uid_range; empty = root (not recommended)
	// UIDRange is "FIRST-LAST": each VM's QEMU and swtpm run as a uid and
	// gid of this block that no user has, one per VM. Empty: every QEMU
	// runs as User.
	UIDRange    string        `yaml:"uid_range"`
	Accel       string        `yaml:"accel"` // auto, kvm, tcg
	StopTimeout time.Duration `yaml:"stop_timeout"`
	// RootDiskBus is the default root disk bus: NVME, VIRTIO-BLK or
	// VIRTIO-SCSI (seed 000's names).
	RootDiskBus string `yaml:"root_disk_bus"`
	X86_64      string `yaml:"binary_amd64"`
	AArch64     string `yaml:"binary_arm64"`
}

// Images configures the image cache.
type Images struct {
	AllowFileURLs bool `yaml:"allow_file_urls"`
}

// Devices configures what DISK and CDROM devices may name on the host.
type Devices struct {
	// AllowedPaths are directories whose files and block devices a DISK
	// or CDROM source may name (after resolving symlinks).
	AllowedPaths []string `yaml:"allowed_paths"`
}

// Limits are the agent's resource limits.
type Limits struct {
	ConcurrentCreates   int   `yaml:"concurrent_creates"`
	ConcurrentDownloads int   `yaml:"concurrent_downloads"`
	CacheMaxBytes       int64 `yaml:"cache_max_bytes"`
	MinFreeBytes        int64 `yaml:"min_free_bytes"`
	MaxImageBytes       int64 `yaml:"max_image_bytes"`
	MaxUserDataBytes    int   `yaml:"max_user_data_bytes"`
	// Each VM's systemd scope (docs/config.md, "VM limits"): memory capped
	// at the guest's memory plus VMMemoryOverheadMB for QEMU itself, an IO
	// weight and a tasks limit.
	VMMemoryOverheadMB int `yaml:"vm_memory_overhead_mb"`
	VMIOWeight         int `yaml:"vm_io_weight"`
	VMTasksMax         int `yaml:"vm_tasks_max"`
}

// Defaults of the VM limits.
const (
	DefaultVMMemoryOverheadMB = 512
	DefaultVMIOWeight         = 100
	DefaultVMTasksMax         = 1024
)

// Usage configures the sampling of per-VM usage (the VM view, the stats
// API, heartbeats, /metrics).
type Usage struct {
	// Interval between samples; 0 turns collection off.
	Interval time.Duration `yaml:"interval"`
}

// Log configures logging.
type Log struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // auto, json, console
}

// Default returns the configuration used when no file is given. dataDir
// overrides the data directory (and the default pool under it).
func Default(dataDir string) *Config {
	if dataDir == "" {
		dataDir = "/var/lib/otherix"
	}
	host, _ := os.Hostname()
	return &Config{
		NodeName:    host,
		DataDir:     dataDir,
		RunDir:      "/run/otherix",
		Pools:       map[string]Pool{"default": {Path: filepath.Join(dataDir, "pools", "default")}},
		DefaultPool: "default",
		Networks:    map[string]Network{},
		Listen:      Listen{VNC: "127.0.0.1", API: "127.0.0.1:7480", Socket: "/run/otherix/api.sock", Metrics: "127.0.0.1:9480"},
		QEMU:        QEMU{User: "otherix-qemu", UIDRange: DefaultUIDRange, Accel: "auto", RootDiskBus: "VIRTIO-BLK", StopTimeout: 60 * time.Second, X86_64: "qemu-system-x86_64", AArch64: "qemu-system-aarch64"},
		Limits: Limits{
			ConcurrentCreates:   2,
			ConcurrentDownloads: 2,
			MinFreeBytes:        1 << 30,
			MaxImageBytes:       64 << 30,
			MaxUserDataBytes:    64 << 10,
			VMMemoryOverheadMB:  DefaultVMMemoryOverheadMB,
			VMIOWeight:          DefaultVMIOWeight,
			VMTasksMax:          DefaultVMTasksMax,
		},
		Usage:   Usage{Interval: 10 * time.Second},
		Log:     Log{Level: "info", Format: "auto"},
		Cluster: Cluster{Etcd: Etcd{Prefix: "/otherix/"}, HeartbeatInterval: 10 * time.Second},
		Restart: Restart{BackoffBase: 10 * time.Second, BackoffMax: 10 * time.Minute, Stable: 5 * time.Minute,
			CrashLoopCount: 5, CrashLoopWindow: 10 * time.Minute},
	}
}

// Load reads path over the defaults. A missing pools section keeps the
// default pool; a given one replaces it.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(b, path)
}

// Parse decodes YAML over the defaults and validates the result.
func Parse(b []byte, name string) (*Config, error) {
	c := Default("")
	var probe struct {
		DataDir string         `yaml:"data_dir"`
		Pools   map[string]any `yaml:"pools"`
	}
	_ = yaml.Unmarshal(b, &probe)
	if probe.DataDir != "" {
		c = Default(probe.DataDir)
	}
	if probe.Pools != nil {
		c.Pools = nil
		c.DefaultPool = ""
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(c); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%s: %w", name, cleanYAMLError(err))
	}
	var root yaml.Node
	_ = yaml.Unmarshal(b, &root) // it decoded above
	if err := c.validate(func(key string) int { return lineOf(&root, key) }); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return c, nil
}

// lineOf is the line of key ("a.b", "a.list[2]") in the file's tree, or of
// the deepest part of it the file has (the line of "networks.lan" for a
// missing "networks.lan.bridge"); 0 when the file has none of it (a
// default).
func lineOf(root *yaml.Node, key string) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) == 1 {
		n = n.Content[0]
	}
	line := 0
	for part := range strings.SplitSeq(key, ".") {
		name, idx := part, -1
		if i := strings.IndexByte(part, '['); i > 0 && strings.HasSuffix(part, "]") {
			if v, err := strconv.Atoi(part[i+1 : len(part)-1]); err == nil {
				name, idx = part[:i], v
			}
		}
		if n.Kind != yaml.MappingNode {
			return line
		}
		var next *yaml.Node
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == name {
				line, next = n.Content[i].Line, n.Content[i+1]
			}
		}
		if next == nil {
			return line
		}
		if idx >= 0 {
			if next.Kind != yaml.SequenceNode || idx >= len(next.Content) {
				return line
			}
			next = next.Content[idx]
			line = next.Line
		}
		n = next
	}
	return line
}

// cleanYAMLError keeps yaml.v3's "line N: field x not found in type ..."
// readable: it names the key and the line.
func cleanYAMLError(err error) error {
	s := err.Error()
	s = strings.TrimPrefix(s, "yaml: unmarshal errors:\n")
	s = regexp.MustCompile(`field (\S+) not found in type \S+`).ReplaceAllString(s, "unknown key $1")
	return errors.New(strings.TrimSpace(s))
}

var (
	nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
)

// Validate checks values; errors name the key.
func (c *Config) Validate() error { return c.validate(nil) }

// validate is Validate; with lineOf, an error names the key's line in the
// file too.
func (c *Config) validate(lineOf func(key string) int) error {
	var errs []string
	bad := func(key, format string, args ...any) {
		where := key
		if lineOf != nil {
			if n := lineOf(key); n > 0 {
				where = fmt.Sprintf("line %d: %s", n, key)
			}
		}
		errs = append(errs, where+": "+fmt.Sprintf(format, args...))
	}
	if c.NodeName == "" {
		bad("node_name", "must not be empty")
	}
	for key, p := range map[string]string{"data_dir": c.DataDir, "run_dir": c.RunDir} {
		if !filepath.IsAbs(p) {
			bad(key, "%q must be an absolute path", p)
		}
	}
	if len(c.RunDir) > 60 {
		bad("run_dir", "%q is too long for unix socket paths (max 60 bytes)", c.RunDir)
	}
	for i, p := range c.Devices.AllowedPaths {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p {
			bad(fmt.Sprintf("devices.allowed_paths[%d]", i), "%q must be a clean absolute path", p)
		}
	}
	if len(c.Pools) == 0 {
		bad("pools", "at least one pool is required")
	}
	for _, name := range sortedKeys(c.Pools) {
		if !nameRE.MatchString(name) {
			bad("pools."+name, "invalid pool name")
		}
		if p := c.Pools[name].Path; !filepath.IsAbs(p) {
			bad("pools."+name+".path", "%q must be an absolute path", p)
		}
	}
	if c.DefaultPool != "" {
		if _, ok := c.Pools[c.DefaultPool]; !ok {
			bad("default_pool", "%q is not a configured pool", c.DefaultPool)
		}
	}
	for _, name := range sortedKeys(c.Networks) {
		n := c.Networks[name]
		if !nameRE.MatchString(name) {
			bad("networks."+name, "invalid network name")
		}
		switch n.Type {
		case "bridge":
			if n.Bridge == "" {
				bad("networks."+name+".bridge", "required for type bridge")
			}
		case "macvlan":
			if n.Parent == "" {
				bad("networks."+name+".parent", "required for type macvlan")
			}
		default:
			bad("networks."+name+".type", "%q: use bridge or macvlan", n.Type)
		}
		if n.UUID != "" && !uuidRE.MatchString(n.UUID) {
			bad("networks."+name+".uuid", "%q is not a lowercase UUID", n.UUID)
		}
	}
	if a := c.Listen.VNC; net.ParseIP(a) == nil {
		bad("listen.vnc", "%q is not an IP address", a)
	}
	if a := c.Listen.Forwards; a != "" && net.ParseIP(a) == nil {
		bad("listen.forwards", "%q is not an IP address", a)
	}
	for key, a := range map[string]string{"listen.api": c.Listen.API, "listen.metrics": c.Listen.Metrics} {
		if a == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			bad(key, "%q: %v", a, err)
		}
	}
	switch c.QEMU.Accel {
	case "auto", "kvm", "tcg":
	default:
		bad("qemu.accel", "%q: use auto, kvm or tcg", c.QEMU.Accel)
	}
	if c.QEMU.UIDRange != "" {
		if _, _, err := ParseUIDRange(c.QEMU.UIDRange); err != nil {
			bad("qemu.uid_range", "%v", err)
		}
	}
	switch c.QEMU.RootDiskBus {
	case "NVME", "VIRTIO-BLK", "VIRTIO-SCSI":
	default:
		bad("qemu.root_disk_bus", "%q: use NVME, VIRTIO-BLK or VIRTIO-SCSI", c.QEMU.RootDiskBus)
	}
	if c.QEMU.StopTimeout <= 0 {
		bad("qemu.stop_timeout", "must be positive")
	}
	if c.Limits.ConcurrentCreates < 1 {
		bad("limits.concurrent_creates", "must be at least 1")
	}
	for _, k := range []struct {
		key string
		d   time.Duration
	}{{"restart.backoff_base", c.Restart.BackoffBase}, {"restart.backoff_max", c.Restart.BackoffMax},
		{"restart.stable", c.Restart.Stable}, {"restart.crash_loop_window", c.Restart.CrashLoopWindow}} {
		if k.d <= 0 {
			bad(k.key, "must be positive")
		}
	}
	if c.Restart.BackoffMax < c.Restart.BackoffBase {
		bad("restart.backoff_max", "must be at least restart.backoff_base")
	}
	if c.Restart.CrashLoopCount < 1 {
		bad("restart.crash_loop_count", "must be at least 1")
	}
	if c.Limits.ConcurrentDownloads < 1 {
		bad("limits.concurrent_downloads", "must be at least 1")
	}
	if c.Limits.MaxUserDataBytes < 1 || c.Limits.MaxUserDataBytes > 16<<20 {
		bad("limits.max_user_data_bytes", "must be 1..16777216")
	}
	if c.Limits.VMMemoryOverheadMB < 0 || c.Limits.VMMemoryOverheadMB > 1<<20 {
		bad("limits.vm_memory_overhead_mb", "must be 0..1048576 (0: no memory cap)")
	}
	if c.Limits.VMIOWeight < 1 || c.Limits.VMIOWeight > 10000 {
		bad("limits.vm_io_weight", "must be 1..10000")
	}
	if c.Usage.Interval != 0 && c.Usage.Interval < time.Second {
		bad("usage.interval", "must be 0 (off) or at least 1s")
	}
	if c.Limits.VMTasksMax < 0 {
		bad("limits.vm_tasks_max", "must be 0 (no limit) or more")
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q: use debug, info, warn or error", c.Log.Level)
	}
	switch c.Log.Format {
	case "auto", "json", "console":
	default:
		bad("log.format", "%q: use auto, json or console", c.Log.Format)
	}
	if c.Standalone && c.ControlPlane.URL != "" {
		bad("standalone", "a standalone agent is its own control plane: remove control_plane.url or standalone")
	}
	if c.ControlPlane.URL != "" && c.ControlPlane.TokenFile == "" {
		bad("control_plane.token_file", "required with control_plane.url")
	}
	c.validateCluster(bad)
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

// validateCluster checks cluster.etcd.
func (c *Config) validateCluster(bad func(key, format string, args ...any)) {
	e := c.Cluster.Etcd
	if !strings.HasPrefix(e.Prefix, "/") || !strings.HasSuffix(e.Prefix, "/") {
		bad("cluster.etcd.prefix", "%q must start and end with /", e.Prefix)
	}
	// Not below 5 s: a heartbeat answered cluster_unavailable (an etcd
	// election) waits the control plane's Retry-After of 5 s, and two
	// such waits must fit in the node's three intervals.
	if h := c.Cluster.HeartbeatInterval; h < 5*time.Second || h > 10*time.Minute || h%time.Second != 0 {
		bad("cluster.heartbeat_interval", "%s must be whole seconds, 5s..10m", h)
	}
	if !c.ClusterMode() {
		if e.CAFile != "" || e.CertFile != "" || e.KeyFile != "" {
			bad("cluster.etcd.endpoints", "required with cluster.etcd's files")
		}
		return
	}
	if c.Standalone {
		bad("standalone", "cluster mode serves the API on every host: remove standalone or cluster.etcd")
	}
	if c.ControlPlane.URL != "" {
		bad("cluster.etcd", "a cluster agent is its own control plane: remove control_plane.url or cluster.etcd")
	}
	for i, ep := range e.Endpoints {
		key := fmt.Sprintf("cluster.etcd.endpoints[%d]", i)
		u, err := url.Parse(ep)
		if err != nil || u.Host == "" || u.Path != "" && u.Path != "/" || u.RawQuery != "" || u.User != nil {
			bad(key, "%q is not a client URL (https://host:port)", ep)
			continue
		}
		switch u.Scheme {
		case "https":
		case "http":
			if ip := net.ParseIP(u.Hostname()); u.Hostname() != "localhost" && (ip == nil || !ip.IsLoopback()) {
				bad(key, "%q: plain http only on loopback (the cluster's state holds task specs): use https", ep)
			}
		default:
			bad(key, "%q: use https (or http on loopback)", ep)
		}
	}
	if (e.CertFile == "") != (e.KeyFile == "") {
		bad("cluster.etcd.cert_file", "cert_file and key_file go together")
	}
	for key, p := range map[string]string{"cluster.etcd.ca_file": e.CAFile, "cluster.etcd.cert_file": e.CertFile, "cluster.etcd.key_file": e.KeyFile} {
		if p != "" && !filepath.IsAbs(p) {
			bad(key, "%q must be an absolute path", p)
		}
	}
}

// Redacted returns the config as YAML with secrets replaced. The config
// holds paths to secrets, not secrets, but the rule is kept here so a
// future inline secret cannot leak through `config show`.
func (c *Config) Redacted() ([]byte, error) {
	return yaml.Marshal(c)
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Diff lists the top-level keys whose values differ between a and b.
func Diff(a, b *Config) []string {
	am, bm := map[string]any{}, map[string]any{}
	ya, _ := yaml.Marshal(a)
	yb, _ := yaml.Marshal(b)
	_ = yaml.Unmarshal(ya, &am)
	_ = yaml.Unmarshal(yb, &bm)
	var out []string
	for _, k := range sortedKeys(am) {
		x, _ := yaml.Marshal(am[k])
		y, _ := yaml.Marshal(bm[k])
		if string(x) != string(y) {
			out = append(out, k)
		}
	}
	return out
}

// DefaultUIDRange is the block of ids VMs' QEMUs run as by default: 65536
// ids from 2000000000, above the ranges systemd and useradd hand out to
// users and containers (below 1879048192) and below systemd's own (from
// 2147352576).
const DefaultUIDRange = "2000000000-2000065535"

// ParseUIDRange parses qemu.uid_range, "FIRST-LAST" (inclusive), and
// returns its first id and size. The block must lie above 65535 (system
// users, nobody) and below 2^31 (ids some tools read as signed).
func ParseUIDRange(s string) (first, count uint32, err error) {
	a, b, ok := strings.Cut(s, "-")
	lo, err1 := strconv.ParseUint(strings.TrimSpace(a), 10, 32)
	hi, err2 := strconv.ParseUint(strings.TrimSpace(b), 10, 32)
	switch {
	case !ok || err1 != nil || err2 != nil:
		return 0, 0, fmt.Errorf("%q: use FIRST-LAST, e.g. %s", s, DefaultUIDRange)
	case hi < lo:
		return 0, 0, fmt.Errorf("%q: LAST is below FIRST", s)
	case lo <= 65535:
		return 0, 0, fmt.Errorf("%q: starts at or under 65535, among system users and nobody", s)
	case hi >= 1<<31:
		return 0, 0, fmt.Errorf("%q: ends at or over 2^31", s)
	}
	return uint32(lo), uint32(hi - lo + 1), nil
}
