package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/otherix/otherix-agent/agent"
	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/journal"
	"github.com/otherix/otherix-agent/agent/metrics"
	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver/etcdstore"
	"github.com/otherix/otherix-agent/agent/runner"
	"github.com/otherix/otherix-agent/agent/standalone"
	"github.com/otherix/otherix-agent/internal/buildinfo"
	"github.com/otherix/otherix-agent/systemd"
)

func newLogger(cfg *config.Config, stderr io.Writer) (*zap.Logger, zap.AtomicLevel) {
	lvl := zap.NewAtomicLevel()
	_ = lvl.UnmarshalText([]byte(cfg.Log.Level))
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.TimeKey = "ts"
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	format := cfg.Log.Format
	if format == "auto" {
		format = "json"
		if f, ok := stderr.(*os.File); ok {
			if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
				format = "console"
			}
		}
	}
	var enc zapcore.Encoder
	if format == "console" {
		encCfg.EncodeLevel = zapcore.CapitalLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	} else {
		enc = zapcore.NewJSONEncoder(encCfg)
	}
	core := zapcore.NewCore(enc, zapcore.AddSync(stderr), lvl)
	return zap.New(core), lvl
}

func runDaemon(ctx context.Context, cfg *config.Config, o daemonOptions, stderr io.Writer) error {
	// SIGHUP reloads the configuration. It is caught from the start: one
	// that arrives while the agent starts (its API may already answer) is
	// applied once it is ready, where Go's default would end the process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	if o.standalone && cfg.ClusterMode() {
		return errors.New("--standalone: cluster.etcd is set: a cluster agent serves the API on its own (drop --standalone)")
	}
	o.standalone = o.standalone || cfg.Standalone
	if o.standalone && cfg.ControlPlane.URL != "" {
		return errors.New("--standalone: a standalone agent is its own control plane: remove control_plane.url from the config")
	}
	log, level := newLogger(cfg, stderr)
	defer log.Sync()
	log.Info("otherix-agent starting", zap.String("version", versionString()), zap.Bool("standalone", o.standalone), zap.Bool("cluster", cfg.ClusterMode()),
		zap.String("data_dir", cfg.DataDir), zap.String("node", cfg.NodeName))
	agent.Version = buildinfo.Read().Version // a token: agent_version, User-Agent

	notifier := systemd.NewNotifier(log.Named("systemd"))
	for _, d := range []string{cfg.DataDir, cfg.RunDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	placer := systemd.DetectPlacer(ctx, log.Named("systemd"))
	var kick atomic.Pointer[runner.Runner]
	m := metrics.New(metrics.Options{})
	host, err := agent.NewHost(ctx, cfg, agent.Options{
		Logger:  log,
		Placer:  agent.ScopePlacer{P: placer, Limits: cfg.Limits, OOM: &agent.OOMTracker{}},
		Env:     systemd.ChildEnv(),
		Metrics: m,
		OnChange: func(v api.VM) {
			if v.Status == api.StatusDeleted {
				m.ForgetVM(v.Name)
			}
			if v.Status == api.StatusCrashed || v.Status == api.StatusStopped {
				if r := kick.Load(); r != nil {
					r.Kick() // the restart policy acts now, not at the next heartbeat
				}
			}
		},
	})
	if err != nil {
		return err
	}
	defer host.Close() // VMs keep running
	m.SetVMs(func() []api.VM { return host.VMs(context.Background()) })
	m.SetPools(host.Cache().Stats)
	if u := host.Usage(); u != nil {
		go u.Run(ctx)
		m.SetVMUsage(host.AllStats)
	}
	if cfg.Listen.Metrics != "" {
		ln, err := net.Listen("tcp", cfg.Listen.Metrics)
		if err != nil {
			return fmt.Errorf("listen.metrics %s: %w", cfg.Listen.Metrics, err)
		}
		go m.Serve(ctx, standalone.LimitListener(ln, 64, nil))
		log.Info("metrics listening", zap.String("addr", "http://"+ln.Addr().String()+"/metrics"))
	}

	client, srv, err := controlPlane(ctx, cfg, o, host, log, m)
	if err != nil {
		return err
	}
	j, err := journal.Open(filepath.Join(cfg.DataDir, "journal"), journal.Options{Logger: log.Named("journal")})
	if err != nil {
		return err
	}
	defer j.Close()
	stagger := time.Duration(0) // the runner's default: a fleet does not stampede
	if o.standalone || cfg.ClusterMode() {
		stagger = -1 // the control plane is in process: nothing to spread
	}
	r := runner.New(client, j, host, host, runner.Config{
		NodeName:          cfg.NodeName,
		CreateConcurrency: cfg.Limits.ConcurrentCreates,
		Logger:            log.Named("runner"),
		InitialStagger:    stagger,
		ObserveTask:       m.ObserveTask,
		RestartBase:       cfg.Restart.BackoffBase,
		RestartMax:        cfg.Restart.BackoffMax,
		RestartStable:     cfg.Restart.Stable,
	})
	kick.Store(r)
	m.SetControlPlane(r.Connected, r.LastHeartbeat)

	runErr := make(chan error, 1)
	go func() { runErr <- r.Run(ctx) }()

	status := func() string {
		running, total := 0, 0
		for _, v := range host.VMs(ctx) {
			total++
			if v.Status == api.StatusRunning {
				running++
			}
		}
		return systemd.StatusInfo{VMsRunning: running, VMsTotal: total, ControlPlane: r.Connected()}.String()
	}
	notifier.Ready(status())
	log.Info("ready", zap.String("placement", host.Engine().Placement()))
	go notifier.RunWatchdog(ctx, r.Healthy)
	go func() {
		t := time.NewTicker(10 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				notifier.Status(status())
			}
		}
	}()

	for {
		select {
		case err = <-runErr:
		case <-hup:
			notifier.Reloading()
			if c, rerr := loadConfig(o.configPath, o.dataDir, o.listen); rerr != nil {
				log.Error("reload: config rejected; keeping the running one", zap.Error(rerr))
			} else {
				reload(log, level, cfg, c)
			}
			notifier.Ready(status())
			continue
		}
		break
	}
	notifier.Stopping()
	log.Info("shutting down: VMs keep running")
	if srv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		srv.Shutdown(sctx)
		cancel()
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// controlPlane returns the protocol client: to the configured control
// plane over HTTP, or in standalone and cluster mode to the in-process
// one, served together with the /v1 API, called in process.
func controlPlane(ctx context.Context, cfg *config.Config, o daemonOptions, host *agent.Host, log *zap.Logger, m *metrics.Metrics) (runner.Client, *http.Server, error) {
	if !o.standalone && !cfg.ClusterMode() {
		if cfg.ControlPlane.URL == "" {
			return nil, nil, errors.New("no control plane configured: set control_plane.url in the config, or run with --standalone")
		}
		c, err := protocol.NewClient(protocol.ClientConfig{
			BaseURL: cfg.ControlPlane.URL, Node: cfg.NodeName, AgentVersion: agent.Version,
			TokenFile: cfg.ControlPlane.TokenFile, CAFile: cfg.ControlPlane.CAFile,
			CertFile: cfg.ControlPlane.CertFile, KeyFile: cfg.ControlPlane.KeyFile,
			Observe: m.ObserveControlPlane,
		})
		return c, nil, err
	}
	os.Remove(filepath.Join(cfg.DataDir, "standalone.addr"))
	// Beyond loopback the API needs TLS and a token.
	sec, err := standalone.CheckListen(cfg.Listen.API, cfg.Listen.TLSCert, cfg.Listen.TLSKey, cfg.Listen.TokenFile)
	if err != nil {
		return nil, nil, err
	}
	// On loopback too, TCP clients need a token: any local user can reach
	// 127.0.0.1, and this API starts VMs and attaches host files and
	// devices. Without listen.token_file the agent keeps one in
	// <data_dir>/api.token (0600), which root's otherix reads by default.
	// The unix socket needs none: its file mode (0660) guards it.
	if sec.Token == "" {
		if sec.Token, err = ensureToken(filepath.Join(cfg.DataDir, "api.token")); err != nil {
			return nil, nil, err
		}
	}
	tokenPath := filepath.Join(cfg.DataDir, "standalone.token")
	token, err := ensureToken(tokenPath)
	if err != nil {
		return nil, nil, err
	}
	cp, closeStore, peer, err := newControlPlane(cfg, token, log.Named("controlplane"))
	if err != nil {
		return nil, nil, err
	}
	if err := cp.SealSpecs(host.Secrets()); err != nil {
		log.Error("open sealed task specs", zap.Error(err))
	}
	apiH := standalone.NewAPI(host, cp, log.Named("api"))
	if peer != nil {
		apiH.SetCluster(&standalone.Cluster{Node: cfg.NodeName, PeerToken: peer})
	}
	mux := http.NewServeMux()
	mux.Handle("/v1/agent/", cp)
	mux.Handle("GET /metrics", m.Handler())
	mux.Handle("/", apiH.Handler())
	limits := standalone.DefaultLimits()
	// srv serves the TCP address; local serves the unix socket (its file
	// mode guards it). The agent's own protocol client calls the control
	// plane in process, so API clients can never take its connections.
	srv := standalone.NewServer(standalone.RequireTokens(mux, sec.Token, peer), limits, log.Named("http"))
	local := standalone.NewServer(mux, limits, log.Named("http"))
	srv.RegisterOnShutdown(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		local.Shutdown(sctx)
		closeStore()
	})
	fail := func(err error) (runner.Client, *http.Server, error) {
		srv.Close()
		local.Close()
		closeStore()
		return nil, nil, err
	}
	ln, err := net.Listen("tcp", cfg.Listen.API)
	if err != nil {
		closeStore()
		return nil, nil, fmt.Errorf("listen %s: %w", cfg.Listen.API, err)
	}
	go srv.Serve(standalone.LimitListener(ln, limits.MaxConns, sec.TLS))
	if cfg.Listen.Socket != "" {
		os.Remove(cfg.Listen.Socket)
		if err := os.MkdirAll(filepath.Dir(cfg.Listen.Socket), 0o755); err == nil {
			if uln, err := net.Listen("unix", cfg.Listen.Socket); err == nil {
				os.Chmod(cfg.Listen.Socket, 0o660)
				go local.Serve(standalone.LimitListener(uln, limits.MaxConns, nil))
			} else {
				log.Warn("unix socket", zap.Error(err))
			}
		}
	}
	addr := ln.Addr().String()
	// Scripts and tests listening on port 0 find the address here.
	if err := os.WriteFile(filepath.Join(cfg.DataDir, "standalone.addr"), []byte(addr+"\n"), 0o644); err != nil {
		return fail(err)
	}
	scheme := "http://"
	if sec.TLS != nil {
		scheme = "https://"
	}
	log.Info("standalone API listening", zap.String("addr", scheme+addr), zap.String("socket", cfg.Listen.Socket))
	if peer != nil {
		// The other hosts reach this one's API there (registration
		// carries it), pinning its certificate.
		host.SetAPI(scheme+advertised(addr), certSHA256(sec.TLS))
	}
	return cp.LocalClient(cfg.NodeName, m.ObserveControlPlane), srv, nil
}

// newControlPlane is the in-process control plane: over the state file
// (standalone), or a replica over etcd (cluster mode). closeStore ends
// its store's connection.
// In cluster mode peer returns the token the hosts present to one
// another's API (nil in standalone mode).
func newControlPlane(cfg *config.Config, token string, log *zap.Logger) (cp *standalone.ControlPlane, closeStore func(), peer func(context.Context) (string, error), err error) {
	if !cfg.ClusterMode() {
		cp, err := standalone.NewControlPlane(filepath.Join(cfg.DataDir, "standalone.json"), token, log)
		return cp, func() {}, nil, err
	}
	e := cfg.Cluster.Etcd
	cli, err := etcdstore.Dial(etcdstore.DialConfig{Endpoints: e.Endpoints, CAFile: e.CAFile, CertFile: e.CertFile, KeyFile: e.KeyFile, Log: log.Named("etcd")})
	if err != nil {
		return nil, nil, nil, err
	}
	// This host's agent heartbeats through this replica: its node stays
	// alive three intervals after the last one.
	hb := cfg.Cluster.HeartbeatInterval
	store := etcdstore.New(cli, etcdstore.Options{Prefix: e.Prefix, NodeTTL: 3 * hb})
	log.Info("cluster mode", zap.Strings("etcd", e.Endpoints), zap.String("prefix", e.Prefix), zap.Duration("heartbeat_interval", hb))
	var once sync.Once
	cp = standalone.NewClusterControlPlane(store, cfg.NodeName, token, log)
	cp.SetHeartbeatInterval(hb)
	return cp, func() {
		once.Do(func() {
			store.Close()
			cli.Close()
		})
	}, peerToken(store), nil
}

// peerToken reads the cluster's peer token from the store on first use
// (and again after a failure: etcd may be without quorum at start).
func peerToken(store *etcdstore.Store) func(context.Context) (string, error) {
	var mu sync.Mutex
	var tok string
	return func(ctx context.Context) (string, error) {
		mu.Lock()
		defer mu.Unlock()
		if tok != "" {
			return tok, nil
		}
		t, err := store.Secret(ctx, "peer-token")
		if err != nil {
			return "", err
		}
		tok = t
		return t, nil
	}
}

// advertised is the address the other hosts reach a listener on: addr,
// or this host's name with addr's port when it listens on every address.
func advertised(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		if name, err := os.Hostname(); err == nil {
			return net.JoinHostPort(name, port)
		}
	}
	return addr
}

// certSHA256 is the hex sha256 of a TLS config's certificate ("" for
// none).
func certSHA256(c *tls.Config) string {
	if c == nil || len(c.Certificates) == 0 || len(c.Certificates[0].Certificate) == 0 {
		return ""
	}
	sum := sha256.Sum256(c.Certificates[0].Certificate[0])
	return hex.EncodeToString(sum[:])
}

// ensureToken returns the standalone control plane's token, creating a
// random one (0600) on first start.
func ensureToken(path string) (string, error) {
	if b, err := os.ReadFile(path); err == nil {
		if t := strings.TrimSpace(string(b)); t != "" {
			return t, nil
		}
	}
	var buf [32]byte
	if _, err := rand.Read(buf[:]); err != nil {
		return "", err
	}
	t := hex.EncodeToString(buf[:])
	if err := os.WriteFile(path, []byte(t+"\n"), 0o600); err != nil {
		return "", err
	}
	return t, os.Chmod(path, 0o600)
}

// reload applies what can change at runtime (the log level) and reports
// what needs a restart. It never touches running VMs.
func reload(log *zap.Logger, level zap.AtomicLevel, old, c *config.Config) {
	if c.Log.Level != old.Log.Level {
		if err := level.UnmarshalText([]byte(c.Log.Level)); err == nil {
			log.Info("reload: log level changed", zap.String("from", old.Log.Level), zap.String("to", c.Log.Level))
			old.Log.Level = c.Log.Level
		}
	}
	if restart := config.Diff(old, c); len(restart) > 0 {
		log.Warn("reload: these changes take effect at the next restart", zap.Strings("keys", restart))
	} else {
		log.Info("reload: done")
	}
}
