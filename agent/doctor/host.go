package doctor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/otherix/otherix-agent/agent/config"
)

// dirState is what checkWritable found.
type dirState struct {
	status   Status
	detail   string
	fix      string
	existing string // dir itself, or its nearest existing ancestor
}

// checkWritable checks that dir is a writable directory, or that its
// nearest existing ancestor is, so the agent can create it at start. It
// proves writability by creating and removing a temporary file.
func checkWritable(key, dir string) dirState {
	if !filepath.IsAbs(dir) {
		return dirState{status: Fail, detail: fmt.Sprintf("%q is not an absolute path", dir), fix: "set " + key + " to an absolute path"}
	}
	fi, err := os.Stat(dir)
	switch {
	case err == nil && !fi.IsDir():
		return dirState{status: Fail, detail: dir + " exists and is not a directory", fix: "remove " + dir + " or point " + key + " elsewhere"}
	case err == nil:
		if err := probeWrite(dir); err != nil {
			return dirState{status: Fail, detail: fmt.Sprintf("%s is not writable: %v", dir, err), fix: "make " + dir + " writable by the agent (owner, mode, or a read-write mount)", existing: dir}
		}
		return dirState{status: OK, detail: dir + ": writable", existing: dir}
	case !notExist(err):
		return dirState{status: Fail, detail: fmt.Sprintf("cannot stat %s: %v", dir, unwrapPath(err)), fix: "make " + dir + " reachable by the agent"}
	}
	anc := filepath.Dir(dir)
	for {
		fi, err := os.Stat(anc)
		if err == nil {
			if !fi.IsDir() {
				return dirState{status: Fail, detail: anc + " is not a directory", fix: "point " + key + " elsewhere"}
			}
			break
		}
		if !notExist(err) || anc == "/" {
			return dirState{status: Fail, detail: fmt.Sprintf("cannot stat %s: %v", anc, unwrapPath(err)), fix: "make " + anc + " reachable by the agent"}
		}
		anc = filepath.Dir(anc)
	}
	if err := probeWrite(anc); err != nil {
		return dirState{status: Fail, detail: fmt.Sprintf("%s does not exist and %s is not writable: %v", dir, anc, err), fix: "mkdir -p " + dir + " and make it writable by the agent", existing: anc}
	}
	return dirState{status: OK, detail: fmt.Sprintf("%s: absent; the agent creates it (under writable %s)", dir, anc), existing: anc}
}

// notExist is true for a missing path, or one under a file.
func notExist(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR)
}

// probeWrite creates and removes a temporary file in dir.
func probeWrite(dir string) error {
	f, err := os.CreateTemp(dir, ".otherix-doctor-*")
	if err != nil {
		return unwrapPath(err)
	}
	name := f.Name()
	f.Close()
	return os.Remove(name)
}

// checkDir checks a directory of the config (data_dir, run_dir).
func checkDir(env Env, key, dir string) Result {
	s := checkWritable(key, dir)
	return Result{Check: key, Status: s.status, Detail: s.detail, Fix: s.fix}
}

// maxSocketPath is sun_path's size on Linux, including the NUL; the
// engine's sockets are <run_dir>/<12-char id>/qmp.sock.
const maxSocketPath = 108

// checkSocketPath checks the unix socket path budget of run_dir.
func checkSocketPath(cfg *config.Config) Result {
	r := Result{Check: "socket path"}
	n := len(filepath.Join(cfg.RunDir, "0123456789ab", "qmp.sock"))
	if n >= maxSocketPath {
		r.Status, r.Detail = Fail, fmt.Sprintf("run_dir %q makes %d-byte socket paths; the limit is %d", cfg.RunDir, n, maxSocketPath-1)
		r.Fix = "set run_dir to a short path such as /run/otherix"
		return r
	}
	r.Status, r.Detail = OK, fmt.Sprintf("%d-byte socket paths under run_dir (limit %d)", n, maxSocketPath-1)
	return r
}

// defaultMinFree is the image cache's free-space floor when
// limits.min_free_bytes is 0.
const defaultMinFree = 1 << 30

// checkPools checks each pool: its directory writable (or creatable) and
// free space at least limits.min_free_bytes.
func checkPools(cfg *config.Config, env Env) []Result {
	names := make([]string, 0, len(cfg.Pools))
	for n := range cfg.Pools {
		names = append(names, n)
	}
	sort.Strings(names)
	minFree := cfg.Limits.MinFreeBytes
	if minFree == 0 {
		minFree = defaultMinFree
	}
	var out []Result
	for _, name := range names {
		key := "pools." + name + ".path"
		s := checkWritable(key, cfg.Pools[name].Path)
		r := Result{Check: "pool " + name, Status: s.status, Detail: s.detail, Fix: s.fix}
		if s.status == OK {
			free, err := env.FreeBytes(s.existing)
			switch {
			case err != nil:
				r.Status, r.Detail = Warn, fmt.Sprintf("%s; free space unknown: %v", s.detail, err)
				r.Fix = "check the file system of " + s.existing
			case minFree > 0 && free < minFree:
				r.Status = Warn
				r.Detail = fmt.Sprintf("%s; only %s free, under limits.min_free_bytes %s: downloads fail with disk_full", s.detail, fmtBytes(free), fmtBytes(minFree))
				r.Fix = "free space on that file system, or lower limits.min_free_bytes"
			default:
				r.Detail = fmt.Sprintf("%s; %s free", s.detail, fmtBytes(free))
			}
		}
		out = append(out, r)
	}
	return out
}

// IFF_UP in /sys/class/net/<if>/flags.
const iffUp = 0x1

// checkNetworks checks each network's bridge (or macvlan parent): it
// exists, is a bridge, is administratively up, and has a carrier.
func checkNetworks(cfg *config.Config, env Env) []Result {
	names := make([]string, 0, len(cfg.Networks))
	for n := range cfg.Networks {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []Result
	for _, name := range names {
		n := cfg.Networks[name]
		r := Result{Check: "network " + name}
		ifname, kind := n.Bridge, "bridge"
		if n.Type == "macvlan" {
			ifname, kind = n.Parent, "parent interface"
		}
		if ifname == "" || ifname == "." || ifname == ".." || strings.ContainsRune(ifname, '/') {
			r.Status, r.Detail, r.Fix = Fail, fmt.Sprintf("%s %q is not an interface name", kind, ifname), "fix networks."+name+" in the config"
			out = append(out, r)
			continue
		}
		sys := env.path("/sys/class/net/" + ifname)
		if !exists(sys) {
			r.Status, r.Detail = Fail, fmt.Sprintf("%s %s does not exist", kind, ifname)
			if n.Type == "macvlan" {
				r.Fix = "point networks." + name + ".parent at an existing interface"
			} else {
				r.Fix = "ip link add " + ifname + " type bridge && ip link set " + ifname + " up (and make it persistent)"
			}
			out = append(out, r)
			continue
		}
		if n.Type != "macvlan" && !exists(filepath.Join(sys, "bridge")) {
			r.Status, r.Detail, r.Fix = Fail, ifname+" exists but is not a bridge", "point networks."+name+".bridge at a Linux bridge"
			out = append(out, r)
			continue
		}
		if flags, err := readHex(filepath.Join(sys, "flags")); err == nil && flags&iffUp == 0 {
			r.Status, r.Detail, r.Fix = Fail, fmt.Sprintf("%s %s is down", kind, ifname), "ip link set "+ifname+" up"
			out = append(out, r)
			continue
		}
		state := readTrim(filepath.Join(sys, "operstate"))
		switch state {
		case "up", "unknown":
			r.Status, r.Detail = OK, fmt.Sprintf("%s %s is up", kind, ifname)
		default:
			r.Status = Warn
			r.Detail = fmt.Sprintf("%s %s is enabled but has no carrier (operstate %s)", kind, ifname, orDash(state))
			if n.Type == "macvlan" {
				r.Fix = "connect " + ifname + " (cable, link partner)"
			} else {
				r.Fix = "attach an uplink to " + ifname + " if VMs need the outside network (it comes up when a VM's tap joins)"
			}
		}
		out = append(out, r)
	}
	return out
}

func readTrim(p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func readHex(p string) (uint64, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(string(b)), "0x"), 16, 64)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// checkTun checks /dev/net/tun, which bridged VM NICs (taps) need.
func checkTun(cfg *config.Config, env Env) Result {
	r := Result{Check: "/dev/net/tun"}
	if exists(env.path("/dev/net/tun")) {
		r.Status, r.Detail = OK, "present"
		return r
	}
	r.Status, r.Detail, r.Fix = Warn, "missing: VMs can only use user-mode (SLIRP) networking", "modprobe tun"
	for _, n := range cfg.Networks {
		if n.Type == "bridge" {
			r.Status, r.Detail = Fail, "missing: VMs on bridge networks cannot get a tap"
			break
		}
	}
	return r
}

// checkSystemd checks whether the agent can put each VM in its own
// systemd scope: PID 1 is systemd and its D-Bus API answers.
func checkSystemd(ctx context.Context, env Env) Result {
	r := Result{Check: "systemd"}
	if fi, err := os.Lstat(env.path("/run/systemd/system")); err != nil || !fi.IsDir() {
		r.Status, r.Detail = Warn, "PID 1 is not systemd: VMs stay in the agent's cgroup (process groups only); VM limits (memory cap, CPU weight and cpu_limit, IO weight, tasks) are not enforced"
		r.Fix = "run the agent as a systemd service for one scope per VM"
		return r
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := env.Systemd(ctx); err != nil {
		r.Status, r.Detail = Warn, fmt.Sprintf("PID 1 is systemd but its D-Bus API does not answer (%v): VMs stay in the agent's cgroup; VM limits are not enforced", err)
		r.Fix = "run the agent as root (systemd's private socket) or start dbus (systemctl start dbus)"
		return r
	}
	r.Status, r.Detail = OK, "systemd D-Bus API answers: one scope per VM, with its limits"
	return r
}

// checkQEMUUser checks who QEMU runs as: with qemu.uid_range, that no
// user of /etc/passwd has an id of the range (a VM's QEMU would run as
// that user); without it, qemu.user: set, existing and not root.
func checkQEMUUser(cfg *config.Config, env Env) Result {
	r := Result{Check: "qemu user"}
	if rng := cfg.QEMU.UIDRange; rng != "" {
		first, count, err := config.ParseUIDRange(rng)
		if err != nil {
			r.Status, r.Detail, r.Fix = Fail, "qemu.uid_range "+err.Error(), "set qemu.uid_range to FIRST-LAST, e.g. "+config.DefaultUIDRange
			return r
		}
		for _, file := range []string{"/etc/passwd", "/etc/group"} {
			b, _ := os.ReadFile(env.path(file))
			for _, line := range strings.Split(string(b), "\n") {
				f := strings.Split(line, ":")
				if len(f) < 3 {
					continue
				}
				id, err := strconv.ParseUint(f[2], 10, 32)
				if err == nil && uint32(id) >= first && uint32(id)-first < count {
					r.Status, r.Detail = Fail, fmt.Sprintf("%s has %q with id %d, inside qemu.uid_range %s: a VM's QEMU would run as it", file, f[0], id, rng)
					r.Fix = "choose a qemu.uid_range no user or group has ids in"
					return r
				}
			}
		}
		r.Status, r.Detail = OK, fmt.Sprintf("a uid of its own per VM: %s (%d ids, none in /etc/passwd or /etc/group)", rng, count)
		return r
	}
	name := cfg.QEMU.User
	if name == "" {
		r.Status, r.Detail, r.Fix = Warn, "qemu.user is not set: QEMU runs as root", "create an unprivileged user and set qemu.user"
		return r
	}
	switch uid, err := env.LookupUser(name); {
	case err != nil:
		r.Status, r.Detail = Fail, fmt.Sprintf("qemu.user %q does not exist: %v", name, err)
		r.Fix = "useradd --system --no-create-home --shell /usr/sbin/nologin " + name
	case uid == "0":
		r.Status, r.Detail, r.Fix = Fail, fmt.Sprintf("qemu.user %q is root", name), "set qemu.user to an unprivileged user"
	default:
		r.Status, r.Detail = OK, fmt.Sprintf("%s (uid %s)", name, uid)
	}
	return r
}

// fmtBytes renders n in IEC units ("12.3 GiB").
func fmtBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
