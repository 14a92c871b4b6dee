// Package doctor checks that a host can run the agent: QEMU and its tools,
// KVM, firmware, the pools, networks and directories of the config,
// systemd, the QEMU user and the control plane. Each check gives OK, WARN
// or FAIL and, when not OK, a one-line fix.
//
// Checks are functions of the config and an Env: the fixed system paths
// they read sit under Env.Root and the lookups they make are Env's
// functions, so tests run them over a fake root. Checks only read: the
// one write is a temporary file that proves a directory writable.
package doctor

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/systemd"
)

// Status is a check's verdict.
type Status string

// Verdicts, from best to worst.
const (
	OK   Status = "OK"
	Warn Status = "WARN"
	Fail Status = "FAIL"
)

func (s Status) rank() int {
	switch s {
	case OK:
		return 0
	case Warn:
		return 1
	}
	return 2
}

// Result is one check's outcome.
type Result struct {
	Check  string `json:"check"`         // e.g. "qemu amd64", "pool default"
	Status Status `json:"status"`        // OK, WARN or FAIL
	Detail string `json:"detail"`        // what was found
	Fix    string `json:"fix,omitempty"` // one line; empty when OK
}

// Env is what the checks read the host through. Zero fields take the
// real host's (see Host).
type Env struct {
	// Root prefixes the fixed system paths the checks read (/dev, /sys,
	// /run, /proc, /usr/share). Empty is the real root. Paths from the
	// config (pools, data_dir, run_dir, binaries) are used as they are.
	Root string
	// LookPath finds a binary (default exec.LookPath).
	LookPath func(file string) (string, error)
	// Output runs a command and returns its standard output (default
	// exec.CommandContext(...).Output).
	Output func(ctx context.Context, name string, args ...string) ([]byte, error)
	// LookupUser returns the user's uid, or an error when it does not
	// exist (default os/user).
	LookupUser func(name string) (uid string, err error)
	// Accel is "kvm" when KVM really runs guests, else "tcg" (default
	// vm.DetectAccel, which the engine uses).
	Accel func() string
	// FreeBytes returns the bytes available to the agent on path's file
	// system (default statfs).
	FreeBytes func(path string) (int64, error)
	// Systemd probes systemd's D-Bus API (default: what the agent does at
	// start, systemd.NewScopePlacer). Called only when PID 1 is systemd.
	Systemd func(ctx context.Context) error
	// HTTPClient, when set, is used for the control-plane check instead of
	// a client built from the config's CA and client certificate.
	HTTPClient *http.Client
}

// Host returns the Env of this machine.
func Host() Env { return Env{}.withDefaults() }

func (e Env) withDefaults() Env {
	if e.LookPath == nil {
		e.LookPath = exec.LookPath
	}
	if e.Output == nil {
		e.Output = func(ctx context.Context, name string, args ...string) ([]byte, error) {
			cmd := exec.CommandContext(ctx, name, args...)
			cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C"}
			return cmd.Output()
		}
	}
	if e.LookupUser == nil {
		e.LookupUser = func(name string) (string, error) {
			u, err := user.Lookup(name)
			if err != nil {
				return "", err
			}
			return u.Uid, nil
		}
	}
	if e.Accel == nil {
		e.Accel = vm.DetectAccel
	}
	if e.FreeBytes == nil {
		e.FreeBytes = func(path string) (int64, error) {
			var st unix.Statfs_t
			if err := unix.Statfs(path, &st); err != nil {
				return 0, err
			}
			return int64(st.Bavail) * st.Bsize, nil
		}
	}
	if e.Systemd == nil {
		e.Systemd = func(ctx context.Context) error {
			p, err := systemd.NewScopePlacer(ctx, nil)
			if err != nil {
				return err
			}
			return p.Close()
		}
	}
	return e
}

// path returns a fixed system path under Root.
func (e Env) path(p string) string {
	if e.Root == "" {
		return p
	}
	return filepath.Join(e.Root, p)
}

// Run runs every check against cfg, in a fixed order.
func Run(ctx context.Context, cfg *config.Config, env Env) []Result {
	env = env.withDefaults()
	var out []Result
	out = append(out, checkQEMU(ctx, cfg, env)...)
	out = append(out, checkKVM(cfg, env))
	out = append(out, checkQemuImg(ctx, env))
	out = append(out, checkFirmware(env)...)
	out = append(out, checkSwtpm(env))
	out = append(out, checkPassthrough(env))
	out = append(out, checkDir(env, "data_dir", cfg.DataDir))
	out = append(out, checkDir(env, "run_dir", cfg.RunDir))
	out = append(out, checkSocketPath(cfg))
	out = append(out, checkPools(cfg, env)...)
	out = append(out, checkNetworks(cfg, env)...)
	out = append(out, checkTun(cfg, env))
	out = append(out, checkSystemd(ctx, env))
	out = append(out, checkQEMUUser(cfg, env))
	out = append(out, checkControlPlane(ctx, cfg, env))
	return out
}

// Worst returns the worst status of rs (OK for none).
func Worst(rs []Result) Status {
	w := OK
	for _, r := range rs {
		if r.Status.rank() > w.rank() {
			w = r.Status
		}
	}
	return w
}

// WriteTable prints rs as an aligned table (STATUS CHECK DETAIL FIX) and
// a summary line.
func WriteTable(w io.Writer, rs []Result) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "STATUS\tCHECK\tDETAIL\tFIX")
	counts := map[Status]int{}
	for _, r := range rs {
		counts[r.Status]++
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r.Status, r.Check, oneLine(r.Detail), oneLine(r.Fix))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "\n%d ok, %d warn, %d fail\n", counts[OK], counts[Warn], counts[Fail])
	return err
}

// Report is the JSON form of a run.
type Report struct {
	Status Status   `json:"status"` // the worst
	Checks []Result `json:"checks"`
}

// WriteJSON prints rs as an indented Report.
func WriteJSON(w io.Writer, rs []Result) error {
	if rs == nil {
		rs = []Result{}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(Report{Status: Worst(rs), Checks: rs})
}

// oneLine keeps a table cell on one line (tabs would break the columns).
func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if s == "" {
		return "-"
	}
	return s
}

// exists reports whether p exists (following symlinks).
func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
