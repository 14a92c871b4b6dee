// Package etcdtest runs a real etcd cluster for tests: Debian's
// etcd-server (/usr/bin/etcd, installed by scripts/deps.sh --test), three
// members by default, each on its own loopback ports and temp data dir,
// killed when the test ends, pass or fail.
//
// The members are child processes of the test binary with Pdeathsig set,
// so a test binary that dies takes them along; a package using this calls
// leakcheck.Main from its TestMain so a member left running fails the run.
package etcdtest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
)

// Binary is the etcd server the harness runs.
const Binary = "/usr/bin/etcd"

// Cluster is a running etcd cluster.
type Cluster struct {
	Members []*Member
	// Token names the cluster (unique per test: members of two tests
	// never join each other).
	Token string
	// TLS, when set, is what clients use: the members serve https and
	// require a client certificate.
	TLS *TLSFiles
}

// Member is one etcd server of a Cluster.
type Member struct {
	Name      string
	ClientURL string
	PeerURL   string
	DataDir   string

	args []string
	log  string

	http *http.Client // health and metrics

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// Start runs an n-member cluster and waits until it has a leader. The
// members are killed by t.Cleanup.
func Start(tb testing.TB, n int) *Cluster {
	tb.Helper()
	return start1(tb, n, false)
}

// StartTLS is Start with members that serve https and require a client
// certificate (Cluster.TLS).
func StartTLS(tb testing.TB, n int) *Cluster {
	tb.Helper()
	return start1(tb, n, true)
}

func start1(tb testing.TB, n int, withTLS bool) *Cluster {
	tb.Helper()
	c, err := newCluster(tb.TempDir(), n, withTLS)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(c.Stop)
	return c
}

// New is Start for a TestMain: the cluster keeps its data under dir and
// runs until Stop.
func New(dir string, n int) (*Cluster, error) { return newCluster(dir, n, false) }

func newCluster(dir string, n int, withTLS bool) (*Cluster, error) {
	if _, err := os.Stat(Binary); err != nil {
		return nil, fmt.Errorf("etcd server missing (%w): run scripts/deps.sh --test", err)
	}
	// A port picked free may be taken by another test before etcd binds
	// it: a member that exits at start makes a new cluster on new ports.
	var last error
	for i := range 3 {
		c, err := start(filepath.Join(dir, fmt.Sprint(i)), n, withTLS)
		if err == nil {
			return c, nil
		}
		last = err
	}
	return nil, fmt.Errorf("etcd cluster: %w", last)
}

func start(dir string, n int, withTLS bool) (*Cluster, error) {
	c := &Cluster{Token: fmt.Sprintf("otherix-test-%d-%d", os.Getpid(), time.Now().UnixNano())}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	scheme, hc := "http", http.DefaultClient
	if withTLS {
		f, err := makeTLS(dir)
		if err != nil {
			return nil, err
		}
		tc, err := f.clientTLS()
		if err != nil {
			return nil, err
		}
		c.TLS, scheme = f, "https"
		hc = &http.Client{Transport: &http.Transport{TLSClientConfig: tc}}
	}
	var initial []string
	for i := range n {
		cport, err := netdevtest.Port()
		if err != nil {
			return nil, err
		}
		pport, err := netdevtest.Port()
		if err != nil {
			return nil, err
		}
		m := &Member{
			Name:      fmt.Sprintf("m%d", i),
			ClientURL: fmt.Sprintf("%s://127.0.0.1:%d", scheme, cport),
			PeerURL:   fmt.Sprintf("http://127.0.0.1:%d", pport),
			http:      hc,
		}
		m.DataDir = filepath.Join(dir, m.Name)
		m.log = filepath.Join(dir, m.Name+".log")
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	for _, m := range c.Members {
		m.args = []string{
			"--name", m.Name,
			"--data-dir", m.DataDir,
			"--listen-client-urls", m.ClientURL,
			"--advertise-client-urls", m.ClientURL,
			"--listen-peer-urls", m.PeerURL,
			"--initial-advertise-peer-urls", m.PeerURL,
			"--initial-cluster", strings.Join(initial, ","),
			"--initial-cluster-token", c.Token,
			"--initial-cluster-state", "new",
			// The CPU is shared with QEMU under TCG: a slower beat
			// keeps a loaded host from calling needless elections.
			"--heartbeat-interval", "200",
			"--election-timeout", "2000",
			"--logger", "zap",
		}
		if c.TLS != nil {
			m.args = append(m.args, "--cert-file", c.TLS.ServerCert, "--key-file", c.TLS.ServerKey,
				"--trusted-ca-file", c.TLS.CA, "--client-cert-auth")
		}
		if err := m.run(); err != nil {
			c.Stop()
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := c.WaitHealthy(ctx); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

// run starts the member's process.
func (m *Member) run() error {
	f, err := os.OpenFile(m.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	cmd := exec.Command(Binary, m.args...)
	// An explicit environment: no ETCD_* setting of the caller's leaks in.
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	m.mu.Lock()
	m.cmd, m.done = cmd, done
	m.mu.Unlock()
	return nil
}

// Endpoints returns the members' client URLs.
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, m := range c.Members {
		out = append(out, m.ClientURL)
	}
	return out
}

// WaitHealthy waits until every running member answers healthy (the
// cluster has a leader and serves). A member that exits fails it.
func (c *Cluster) WaitHealthy(ctx context.Context) error {
	for _, m := range c.Members {
		if !m.Running() {
			continue
		}
		if err := m.waitHealthy(ctx); err != nil {
			return err
		}
	}
	return nil
}

func (m *Member) waitHealthy(ctx context.Context) error {
	m.mu.Lock()
	done := m.done
	m.mu.Unlock()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if m.Healthy(ctx) {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("etcd member %s exited at start:\n%s", m.Name, m.LogTail(4096))
		case <-ctx.Done():
			return fmt.Errorf("etcd member %s not healthy: %w\n%s", m.Name, ctx.Err(), m.LogTail(4096))
		case <-tick.C:
		}
	}
}

// Healthy reports whether the member answers /health with true: it is up
// and the cluster it sees has a leader.
func (m *Member) Healthy(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", m.ClientURL+"/health", nil)
	resp, err := m.http.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var h struct {
		Health string `json:"health"`
	}
	return json.NewDecoder(resp.Body).Decode(&h) == nil && h.Health == "true"
}

// HasLeader reports whether the member knows of a leader (its
// etcd_server_has_leader metric): a member cut from quorum says no once its
// election timeout passed, and from then refuses what needs a leader.
func (m *Member) HasLeader(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", m.ClientURL+"/metrics", nil)
	resp, err := m.http.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return false, err
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "etcd_server_has_leader "); ok {
			return strings.TrimSpace(v) == "1", nil
		}
	}
	return false, fmt.Errorf("etcd member %s: no etcd_server_has_leader metric", m.Name)
}

// Running reports whether the member's process runs.
func (m *Member) Running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.done == nil {
		return false
	}
	select {
	case <-m.done:
		return false
	default:
		return true
	}
}

// Kill ends the member as a crash would (SIGKILL) and waits for it.
func (m *Member) Kill() {
	m.mu.Lock()
	cmd, done := m.cmd, m.done
	m.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Kill()
	<-done
}

// Restart starts a killed member again on its data dir and ports; it
// rejoins the cluster (with the data it had).
func (m *Member) Restart() error {
	if m.Running() {
		return fmt.Errorf("etcd member %s still runs", m.Name)
	}
	for i := 0; i+1 < len(m.args); i++ {
		if m.args[i] == "--initial-cluster-state" {
			m.args[i+1] = "existing"
		}
	}
	return m.run()
}

// LogTail returns the last n bytes of the member's log.
func (m *Member) LogTail(n int64) string {
	f, err := os.Open(m.log)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > n {
		f.Seek(-n, io.SeekEnd)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// Stop kills every member.
func (c *Cluster) Stop() {
	for _, m := range c.Members {
		m.Kill()
	}
}

// KillQuorum kills members until fewer than a majority run, and returns
// the killed ones (restart them to restore quorum).
func (c *Cluster) KillQuorum() []*Member {
	var killed []*Member
	running := 0
	for _, m := range c.Members {
		if m.Running() {
			running++
		}
	}
	for _, m := range c.Members {
		if running <= len(c.Members)/2 {
			break
		}
		if m.Running() {
			m.Kill()
			killed = append(killed, m)
			running--
		}
	}
	return killed
}
