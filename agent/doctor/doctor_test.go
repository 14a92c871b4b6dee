package doctor

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/config"
)

// fakeRoot builds a host under a temp dir: files maps root-relative
// paths to contents ("" makes an empty file; a trailing / a directory).
func fakeRoot(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		if strings.HasSuffix(p, "/") {
			if err := os.MkdirAll(full, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

const ovmfDescriptor = `{"interface-types":["uefi"],"mapping":{"device":"flash","executable":{"filename":"/usr/share/OVMF/OVMF_CODE_4M.fd"}},"targets":[{"architecture":"x86_64","machines":["pc-q35-*"]}]}`
const aavmfDescriptor = `{"interface-types":["uefi"],"mapping":{"device":"flash","executable":{"filename":"/usr/share/AAVMF/AAVMF_CODE.fd"}},"targets":[{"architecture":"aarch64","machines":["virt-*"]}]}`

// goodHost is a fake host where every check passes.
func goodHost(t *testing.T) (Env, *config.Config) {
	t.Helper()
	root := fakeRoot(t, map[string]string{
		"dev/kvm":                              "",
		"dev/net/tun":                          "",
		"proc/cpuinfo":                         "processor\t: 0\nflags\t\t: fpu vme vmx sse\n",
		"usr/share/seabios/bios-256k.bin":      "bios",
		"usr/share/qemu/firmware/60-x86.json":  ovmfDescriptor,
		"usr/share/qemu/firmware/60-arm.json":  aavmfDescriptor,
		"usr/share/qemu/firmware/README":       "not json",
		"usr/share/OVMF/OVMF_CODE_4M.fd":       "code",
		"usr/share/AAVMF/AAVMF_CODE.fd":        "code",
		"sys/class/net/br0/bridge/":            "",
		"sys/class/net/br0/flags":              "0x1003\n",
		"sys/class/net/br0/operstate":          "up\n",
		"sys/class/net/eth0/flags":             "0x1003\n",
		"sys/class/net/eth0/operstate":         "up\n",
		"run/systemd/system/":                  "",
		"sys/kernel/iommu_groups/12/devices/":  "",
		"sys/bus/pci/drivers/vfio-pci/":        "",
		"var/lib/otherix/pools/fast/":          "",
		"var/lib/otherix/pools/fast/images/x/": "",
	})
	cfg := config.Default(filepath.Join(root, "var/lib/otherix"))
	cfg.RunDir = filepath.Join(root, "run/otherix")
	cfg.Pools["fast"] = config.Pool{Path: filepath.Join(root, "var/lib/otherix/pools/fast")}
	cfg.Networks = map[string]config.Network{
		"lan": {Type: "bridge", Bridge: "br0"},
		"mv":  {Type: "macvlan", Parent: "eth0"},
	}
	cfg.QEMU.User = "otherix-qemu"
	bins := map[string]string{
		"qemu-system-x86_64":  "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022\n",
		"qemu-system-aarch64": "QEMU emulator version 8.1.0\n",
		"qemu-img":            "qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\n",
		"swtpm":               "",
	}
	env := Env{
		Root: root,
		LookPath: func(f string) (string, error) {
			if _, ok := bins[f]; ok {
				return "/usr/bin/" + f, nil
			}
			return "", exec.ErrNotFound
		},
		Output: func(ctx context.Context, name string, args ...string) ([]byte, error) {
			out, ok := bins[filepath.Base(name)]
			if !ok || len(args) != 1 || args[0] != "--version" {
				return nil, fmt.Errorf("unexpected command %s %v", name, args)
			}
			return []byte(out), nil
		},
		LookupUser: func(name string) (string, error) {
			if name == "otherix-qemu" {
				return "995", nil
			}
			if name == "root" {
				return "0", nil
			}
			return "", errors.New("unknown user")
		},
		Accel:     func() string { return "kvm" },
		FreeBytes: func(string) (int64, error) { return 100 << 30, nil },
		Systemd:   func(context.Context) error { return nil },
	}
	return env, cfg
}

// byCheck indexes results by check name, failing on duplicates.
func byCheck(t *testing.T, rs []Result) map[string]Result {
	t.Helper()
	m := map[string]Result{}
	for _, r := range rs {
		if _, dup := m[r.Check]; dup {
			t.Errorf("check %q reported twice", r.Check)
		}
		m[r.Check] = r
		if r.Status != OK && r.Fix == "" {
			t.Errorf("%s: %s without a fix: %s", r.Check, r.Status, r.Detail)
		}
		if r.Status == OK && r.Fix != "" {
			t.Errorf("%s: OK with a fix %q", r.Check, r.Fix)
		}
	}
	return m
}

var allChecks = []string{
	"qemu amd64", "qemu arm64", "kvm", "qemu-img", "firmware bios", "firmware uefi amd64", "firmware uefi arm64",
	"swtpm", "passthrough", "data_dir", "run_dir", "socket path", "pool default", "pool fast", "network lan", "network mv",
	"/dev/net/tun", "systemd", "qemu user", "control plane",
}

func TestAllGood(t *testing.T) {
	env, cfg := goodHost(t)
	rs := Run(t.Context(), cfg, env)
	got := byCheck(t, rs)
	if len(rs) != len(allChecks) {
		t.Errorf("got %d results, want %d", len(rs), len(allChecks))
	}
	for i, name := range allChecks {
		if i < len(rs) && rs[i].Check != name {
			t.Errorf("result %d is %q, want %q", i, rs[i].Check, name)
		}
		r := got[name]
		want := OK
		if name == "control plane" {
			want = Warn // not configured
		}
		if r.Status != want {
			t.Errorf("%s: %s %q (fix %q), want %s", name, r.Status, r.Detail, r.Fix, want)
		}
	}
	for name, detail := range map[string]string{
		"qemu amd64":          "/usr/bin/qemu-system-x86_64: QEMU 7.2.22",
		"qemu arm64":          "/usr/bin/qemu-system-aarch64: QEMU 8.1.0",
		"qemu-img":            "/usr/bin/qemu-img: 7.2.22",
		"firmware uefi amd64": "1 descriptors in /usr/share/qemu/firmware (60-x86.json)",
		"network lan":         "bridge br0 is up",
		"network mv":          "parent interface eth0 is up",
		"qemu user":           "a uid of its own per VM: 2000000000-2000065535 (65536 ids, none in /etc/passwd or /etc/group)",
	} {
		if got[name].Detail != detail {
			t.Errorf("%s detail = %q, want %q", name, got[name].Detail, detail)
		}
	}
	if d := got["pool default"].Detail; !strings.Contains(d, "absent; the agent creates it") || !strings.HasSuffix(d, "100.0 GiB free") {
		t.Errorf("pool default detail = %q", d)
	}
	if Worst(rs) != Warn {
		t.Errorf("Worst = %s, want WARN", Worst(rs))
	}
	// The writability probe leaves nothing behind.
	ents, _ := os.ReadDir(cfg.Pools["fast"].Path)
	if len(ents) != 1 || ents[0].Name() != "images" {
		t.Errorf("pool dir holds %v after the check, want only images/", ents)
	}
}

// TestProblems breaks one thing at a time and checks the verdict and fix.
func TestProblems(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(t *testing.T, env *Env, cfg *config.Config)
		check  string
		status Status
		detail string // substring
		fix    string // substring
	}{
		{"no amd64 qemu", func(t *testing.T, e *Env, c *config.Config) { c.QEMU.X86_64 = "qemu-missing" }, "qemu amd64",
			map[bool]Status{true: Fail, false: Warn}[runtime.GOARCH == "amd64"], "qemu-missing not found", "apt-get install qemu-system-x86"},
		{"no arm64 qemu", func(t *testing.T, e *Env, c *config.Config) { c.QEMU.AArch64 = "nope" }, "qemu arm64",
			map[bool]Status{true: Fail, false: Warn}[runtime.GOARCH == "arm64"], "nope not found", "qemu-system-arm"},
		{"old qemu", func(t *testing.T, e *Env, c *config.Config) {
			out := e.Output
			e.Output = func(ctx context.Context, n string, a ...string) ([]byte, error) {
				if strings.HasSuffix(n, "x86_64") {
					return []byte("QEMU emulator version 5.2.0\n"), nil
				}
				return out(ctx, n, a...)
			}
		}, "qemu amd64", Warn, "QEMU 5.2.0 is older than 7.0", "upgrade"},
		{"qemu fails", func(t *testing.T, e *Env, c *config.Config) {
			e.Output = func(context.Context, string, ...string) ([]byte, error) { return nil, errors.New("exit status 1") }
		}, "qemu-img", Fail, "--version failed: exit status 1", "reinstall"},
		{"no /dev/kvm", func(t *testing.T, e *Env, c *config.Config) {
			e.Accel = func() string { return "tcg" }
			os.Remove(filepath.Join(e.Root, "dev/kvm"))
		}, "kvm", Warn, "/dev/kvm does not exist: VMs run under TCG", "modprobe kvm_intel"},
		{"kvm without vmx", func(t *testing.T, e *Env, c *config.Config) {
			if runtime.GOARCH != "amd64" {
				t.Skip("vmx/svm is an x86 flag")
			}
			e.Accel = func() string { return "tcg" }
			os.WriteFile(filepath.Join(e.Root, "proc/cpuinfo"), []byte("flags\t: fpu sse\n"), 0o644)
		}, "kvm", Warn, "no vmx/svm flag", "nested virtualization"},
		{"kvm forced but unusable", func(t *testing.T, e *Env, c *config.Config) {
			e.Accel = func() string { return "tcg" }
			c.QEMU.Accel = "kvm"
			os.Remove(filepath.Join(e.Root, "dev/kvm"))
		}, "kvm", Fail, "qemu.accel is kvm but /dev/kvm does not exist: VMs will not start", "qemu.accel: auto"},
		{"tcg configured", func(t *testing.T, e *Env, c *config.Config) {
			e.Accel = func() string { return "tcg" }
			c.QEMU.Accel = "tcg"
		}, "kvm", OK, "qemu.accel is tcg", ""},
		{"no qemu-img", func(t *testing.T, e *Env, c *config.Config) {
			look := e.LookPath
			e.LookPath = func(f string) (string, error) {
				if f == "qemu-img" {
					return "", exec.ErrNotFound
				}
				return look(f)
			}
		}, "qemu-img", Fail, "qemu-img not found", "qemu-utils"},
		{"no seabios", func(t *testing.T, e *Env, c *config.Config) {
			os.Remove(filepath.Join(e.Root, "usr/share/seabios/bios-256k.bin"))
		}, "firmware bios", Fail, "bios-256k.bin missing", "apt-get install seabios"},
		{"uefi code file missing", func(t *testing.T, e *Env, c *config.Config) {
			os.Remove(filepath.Join(e.Root, "usr/share/AAVMF/AAVMF_CODE.fd"))
		}, "firmware uefi arm64", Warn, "no UEFI firmware for aarch64 in /usr/share/qemu/firmware: arm64 guests cannot boot (unusable: 60-arm.json)", "qemu-efi-aarch64"},
		{"no descriptor dir", func(t *testing.T, e *Env, c *config.Config) {
			os.RemoveAll(filepath.Join(e.Root, "usr/share/qemu/firmware"))
		}, "firmware uefi amd64", Warn, "cannot read /usr/share/qemu/firmware", "apt-get install ovmf"},
		{"no swtpm", func(t *testing.T, e *Env, c *config.Config) {
			look := e.LookPath
			e.LookPath = func(f string) (string, error) {
				if f == "swtpm" {
					return "", exec.ErrNotFound
				}
				return look(f)
			}
		}, "swtpm", Warn, "VMs cannot have a TPM", "apt-get install swtpm"},
		{"no iommu", func(t *testing.T, e *Env, c *config.Config) {
			os.RemoveAll(filepath.Join(e.Root, "sys/kernel/iommu_groups/12"))
		}, "passthrough", Warn, "no IOMMU groups: PCI and GPU passthrough unavailable", "intel_iommu=on"},
		{"no vfio-pci", func(t *testing.T, e *Env, c *config.Config) {
			os.RemoveAll(filepath.Join(e.Root, "sys/bus/pci/drivers/vfio-pci"))
		}, "passthrough", Warn, "1 IOMMU groups, vfio-pci not loaded", "modprobe vfio-pci"},
		{"pool not writable", func(t *testing.T, e *Env, c *config.Config) {
			if os.Geteuid() == 0 {
				// root writes through modes: make the path a file instead.
				p := filepath.Join(t.TempDir(), "file")
				os.WriteFile(p, nil, 0o644)
				c.Pools["fast"] = config.Pool{Path: filepath.Join(p, "pool")}
				return
			}
			os.Chmod(c.Pools["fast"].Path, 0o555)
		}, "pool fast", Fail, "", "pools.fast.path"},
		{"pool is a file", func(t *testing.T, e *Env, c *config.Config) {
			p := filepath.Join(t.TempDir(), "file")
			os.WriteFile(p, nil, 0o644)
			c.Pools["fast"] = config.Pool{Path: p}
		}, "pool fast", Fail, "exists and is not a directory", "pools.fast.path"},
		{"pool short of space", func(t *testing.T, e *Env, c *config.Config) {
			e.FreeBytes = func(string) (int64, error) { return 512 << 20, nil }
		}, "pool fast", Warn, "only 512.0 MiB free, under limits.min_free_bytes 1.0 GiB", "lower limits.min_free_bytes"},
		{"no min free", func(t *testing.T, e *Env, c *config.Config) {
			e.FreeBytes = func(string) (int64, error) { return 1, nil }
			c.Limits.MinFreeBytes = -1
		}, "pool fast", OK, "1 B free", ""},
		{"data_dir under a file", func(t *testing.T, e *Env, c *config.Config) {
			p := filepath.Join(t.TempDir(), "file")
			os.WriteFile(p, nil, 0o644)
			c.DataDir = filepath.Join(p, "a", "b")
		}, "data_dir", Fail, "is not a directory", ""},
		{"long run_dir", func(t *testing.T, e *Env, c *config.Config) {
			c.RunDir = "/" + strings.Repeat("r", 90)
		}, "socket path", Fail, "makes 113-byte socket paths; the limit is 107", "short path"},
		{"bridge missing", func(t *testing.T, e *Env, c *config.Config) {
			c.Networks["lan"] = config.Network{Type: "bridge", Bridge: "br9"}
		}, "network lan", Fail, "bridge br9 does not exist", "ip link add br9 type bridge"},
		{"not a bridge", func(t *testing.T, e *Env, c *config.Config) {
			c.Networks["lan"] = config.Network{Type: "bridge", Bridge: "eth0"}
		}, "network lan", Fail, "eth0 exists but is not a bridge", "Linux bridge"},
		{"bridge down", func(t *testing.T, e *Env, c *config.Config) {
			os.WriteFile(filepath.Join(e.Root, "sys/class/net/br0/flags"), []byte("0x1002\n"), 0o644)
			os.WriteFile(filepath.Join(e.Root, "sys/class/net/br0/operstate"), []byte("down\n"), 0o644)
		}, "network lan", Fail, "bridge br0 is down", "ip link set br0 up"},
		{"bridge without carrier", func(t *testing.T, e *Env, c *config.Config) {
			os.WriteFile(filepath.Join(e.Root, "sys/class/net/br0/operstate"), []byte("down\n"), 0o644)
		}, "network lan", Warn, "no carrier (operstate down)", "uplink"},
		{"bad interface name", func(t *testing.T, e *Env, c *config.Config) {
			c.Networks["lan"] = config.Network{Type: "bridge", Bridge: "../../etc"}
		}, "network lan", Fail, "is not an interface name", "networks.lan"},
		{"macvlan parent missing", func(t *testing.T, e *Env, c *config.Config) {
			c.Networks["mv"] = config.Network{Type: "macvlan", Parent: "eth9"}
		}, "network mv", Fail, "parent interface eth9 does not exist", "networks.mv.parent"},
		{"no tun with bridges", func(t *testing.T, e *Env, c *config.Config) {
			os.Remove(filepath.Join(e.Root, "dev/net/tun"))
		}, "/dev/net/tun", Fail, "bridge networks cannot get a tap", "modprobe tun"},
		{"no tun without bridges", func(t *testing.T, e *Env, c *config.Config) {
			os.Remove(filepath.Join(e.Root, "dev/net/tun"))
			delete(c.Networks, "lan")
		}, "/dev/net/tun", Warn, "SLIRP", "modprobe tun"},
		{"not systemd", func(t *testing.T, e *Env, c *config.Config) {
			os.RemoveAll(filepath.Join(e.Root, "run/systemd"))
			e.Systemd = func(context.Context) error { t.Error("probed D-Bus without systemd"); return nil }
		}, "systemd", Warn, "PID 1 is not systemd: VMs stay in the agent's cgroup (process groups only); VM limits (memory cap, CPU weight and cpu_limit, IO weight, tasks) are not enforced", "systemd service"},
		{"systemd bus down", func(t *testing.T, e *Env, c *config.Config) {
			e.Systemd = func(context.Context) error { return errors.New("dial unix: no such file") }
		}, "systemd", Warn, "D-Bus API does not answer (dial unix: no such file)", "systemctl start dbus"},
		{"qemu user missing", func(t *testing.T, e *Env, c *config.Config) { c.QEMU.UIDRange, c.QEMU.User = "", "ghost" }, "qemu user", Fail,
			`qemu.user "ghost" does not exist`, "useradd --system --no-create-home --shell /usr/sbin/nologin ghost"},
		{"qemu user root", func(t *testing.T, e *Env, c *config.Config) { c.QEMU.UIDRange, c.QEMU.User = "", "root" }, "qemu user", Fail, "is root", "unprivileged"},
		{"qemu user unset", func(t *testing.T, e *Env, c *config.Config) { c.QEMU.UIDRange, c.QEMU.User = "", "" }, "qemu user", Warn, "QEMU runs as root", "qemu.user"},
		{"qemu user without a range", func(t *testing.T, e *Env, c *config.Config) { c.QEMU.UIDRange = "" }, "qemu user", OK, "otherix-qemu (uid 995)", ""},
		{"user inside the uid range", func(t *testing.T, e *Env, c *config.Config) {
			os.MkdirAll(filepath.Join(e.Root, "etc"), 0o755)
			os.WriteFile(filepath.Join(e.Root, "etc/passwd"), []byte("root:x:0:0::/root:/bin/sh\nsquatter:x:2000000007:100::/:/bin/false\n"), 0o644)
		}, "qemu user", Fail, `"squatter" with id 2000000007, inside qemu.uid_range`, "choose a qemu.uid_range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env, cfg := goodHost(t)
			tc.break_(t, &env, cfg)
			got := byCheck(t, Run(t.Context(), cfg, env))
			r, ok := got[tc.check]
			if !ok {
				t.Fatalf("no %q result", tc.check)
			}
			if r.Status != tc.status || !strings.Contains(r.Detail, tc.detail) || !strings.Contains(r.Fix, tc.fix) {
				t.Errorf("%s = %s %q fix %q\nwant %s with detail ~%q fix ~%q", tc.check, r.Status, r.Detail, r.Fix, tc.status, tc.detail, tc.fix)
			}
		})
	}
}

// tlsControlPlane is an HTTPS server that wants token; it returns its
// URL and the path of its CA certificate.
func tlsControlPlane(t *testing.T, token string) (string, string) {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+token {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		http.NotFound(w, r)
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the untrusted case fails handshakes
	srv.StartTLS()
	t.Cleanup(srv.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(ca, pemBytes, 0o644); err != nil {
		t.Fatal(err)
	}
	return srv.URL, ca
}

func writeToken(t *testing.T, token string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(token+"\n"), mode); err != nil {
		t.Fatal(err)
	}
	os.Chmod(p, mode)
	return p
}

func TestControlPlane(t *testing.T) {
	url, ca := tlsControlPlane(t, "s3cret")
	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL := strings.Replace(closed.URL, "http://", "https://", 1)
	closed.Close()
	for _, tc := range []struct {
		name   string
		cp     config.ControlPlane
		status Status
		detail string
		fix    string
	}{
		{"reachable", config.ControlPlane{URL: url, TokenFile: writeToken(t, "s3cret", 0o600), CAFile: ca}, OK, "answers (HTTP 404) and accepts the token", ""},
		{"bad token", config.ControlPlane{URL: url, TokenFile: writeToken(t, "wrong", 0o600), CAFile: ca}, Fail, "refused the token: HTTP 401", "current token"},
		{"untrusted", config.ControlPlane{URL: url, TokenFile: writeToken(t, "s3cret", 0o600)}, Fail, "certificate not trusted", "control_plane.ca_file"},
		{"unreachable", config.ControlPlane{URL: closedURL, TokenFile: writeToken(t, "s3cret", 0o600), CAFile: ca}, Fail, "unreachable", "firewalls"},
		{"token readable by others", config.ControlPlane{URL: url, TokenFile: writeToken(t, "s3cret", 0o644), CAFile: ca}, Fail, "accessible to group or others", "0600"},
		{"no token file", config.ControlPlane{URL: url, TokenFile: "/nonexistent/token", CAFile: ca}, Fail, "token file", ""},
		{"plain http", config.ControlPlane{URL: "http://cp.example:80", TokenFile: writeToken(t, "s3cret", 0o600)}, Fail, "use https", ""},
		{"not configured", config.ControlPlane{}, Warn, "--standalone", "control_plane.url"},
		{"standalone", config.ControlPlane{}, OK, "standalone: true", ""},
		{"cluster", config.ControlPlane{}, OK, "cluster mode: the agent is a control-plane replica on etcd http://127.0.0.1:2379", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config.Default(t.TempDir())
			cfg.ControlPlane = tc.cp
			// A standalone or cluster agent is its own control plane.
			cfg.Standalone = tc.name == "standalone"
			if tc.name == "cluster" {
				cfg.Cluster.Etcd.Endpoints = []string{"http://127.0.0.1:2379"}
			}
			r := checkControlPlane(t.Context(), cfg, Env{}.withDefaults())
			if r.Status != tc.status || !strings.Contains(r.Detail, tc.detail) || !strings.Contains(r.Fix, tc.fix) {
				t.Errorf("got %s %q fix %q\nwant %s ~%q fix ~%q", r.Status, r.Detail, r.Fix, tc.status, tc.detail, tc.fix)
			}
			if strings.Contains(r.Detail+r.Fix, "s3cret") {
				t.Error("the token leaked into the result")
			}
		})
	}
}

func TestOutput(t *testing.T) {
	rs := []Result{
		{Check: "qemu amd64", Status: OK, Detail: "/usr/bin/qemu-system-x86_64: QEMU 7.2.22"},
		{Check: "kvm", Status: Warn, Detail: "no /dev/kvm:\tTCG", Fix: "modprobe kvm_intel"},
		{Check: "qemu user", Status: Fail, Detail: "missing", Fix: "useradd x"},
	}
	var b bytes.Buffer
	if err := WriteTable(&b, rs); err != nil {
		t.Fatal(err)
	}
	want := `STATUS  CHECK       DETAIL                                    FIX
OK      qemu amd64  /usr/bin/qemu-system-x86_64: QEMU 7.2.22  -
WARN    kvm         no /dev/kvm: TCG                          modprobe kvm_intel
FAIL    qemu user   missing                                   useradd x

1 ok, 1 warn, 1 fail
`
	if b.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	if err := WriteJSON(&b, rs); err != nil {
		t.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(b.Bytes(), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Status != Fail || len(rep.Checks) != 3 || rep.Checks[1].Fix != "modprobe kvm_intel" || rep.Checks[0].Fix != "" {
		t.Errorf("json report = %+v", rep)
	}
	if strings.Contains(b.String(), `"fix": ""`) {
		t.Error("OK results carry an empty fix in JSON")
	}
}

func TestParseVersion(t *testing.T) {
	for in, want := range map[string]string{
		"QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright": "7.2.22",
		"qemu-img version 8.2.2 (Debian)":                                           "8.2.2",
		"QEMU emulator version 9.0\n":                                               "9.0",
		"something else":                                                            "",
		"\nQEMU emulator version 7.2.0 on two":                                      "",
	} {
		got, _, _, _ := parseVersion([]byte(in))
		if got != want {
			t.Errorf("parseVersion(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestThisHost runs the checks against this machine: QEMU and qemu-img
// are installed here (deps.sh), so those checks must pass.
func TestThisHost(t *testing.T) {
	cfg := config.Default(t.TempDir())
	cfg.RunDir = t.TempDir()
	cfg.QEMU.User = ""
	got := byCheck(t, Run(t.Context(), cfg, Host()))
	for _, name := range []string{"qemu amd64", "qemu arm64", "qemu-img", "data_dir", "run_dir", "socket path", "pool default"} {
		if r := got[name]; r.Status != OK {
			t.Errorf("%s: %s %q (fix %q), want OK", name, r.Status, r.Detail, r.Fix)
		}
	}
	if r := got["kvm"]; r.Status == Fail {
		t.Errorf("kvm: FAIL with qemu.accel auto: %q", r.Detail)
	}
}
