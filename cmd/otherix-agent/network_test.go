package main

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/agent/testguest"
)

// TestBridgedNetworking runs the agent in a network namespace with a
// bridge and a DHCP server: a VM with --network gets a lease, answers
// pings, shows its address from the guest agent, serves HTTP through a
// PROXY forward; a MACVLAN NIC gets a lease too; bad input gets stable
// codes; stop, kill -9 of QEMU, and an agent crash leave no tap or
// macvtap behind.
func TestBridgedNetworking(t *testing.T) {
	t.Parallel()
	netdevtest.RequireRoot(t)
	ns := netdevtest.NewNetns(t)
	ns.Bridge(t, "br0", "10.77.0.1/24")
	ns.Veth(t, "mv0", "mv0p", "br0") // the macvlan parent: a veth whose peer is on the bridge
	ns.DHCP(t, "br0", "10.77.0.50", "10.77.0.99")
	a := startAgentIn(t, ns, `
networks:
  lan: {type: bridge, bridge: br0}
  mv: {type: macvlan, parent: mv0}
images: {allow_file_urls: true}
`)
	image := "file://" + filepath.Join(testguest.Dir(t), "guest.qcow2")
	ud := filepath.Join(t.TempDir(), "ud.yaml")
	os.WriteFile(ud, []byte("#cloud-config\n#otherix-run: mkdir -p /www && echo hello-over-the-bridge > /www/index.html && httpd -p 80 -h /www\n"), 0o600)

	// Bad input first: nothing may be created.
	a.fails(1, "network_not_found", "vm", "create", "x", "--image-url", image, "--arch", "amd64", "--network", "nope")
	a.fails(1, "validation_failed", "vm", "create", "x", "--image-url", image, "--arch", "amd64", "--network", "mv")
	for _, dev := range []string{
		`{dev_type: NIC, network: lan, mac: "01:00:5e:00:00:01"}`, // multicast
		`{dev_type: NIC, network: lan, mac: "52:54:00:zz:00:01"}`,
		`{dev_type: PROXY, source_proto: TCP, source_port: 0, dest_proto: TCP, dest_port: 80}`,
		`{dev_type: PROXY, source_proto: TCP, source_port: 70000, dest_proto: TCP, dest_port: 80}`,
		`{dev_type: PROXY, source_proto: TCP, source_port: 8080, dest_proto: UDP, dest_port: 80}`,
	} {
		a.fails(1, "validation_failed", "create", "-f", a.manifest(t, "x", image, "devices: ["+dev+"]"))
	}
	a.fails(1, "validation_failed", "create", "-f", a.manifest(t, "x", image,
		"devices: [{dev_type: PROXY, source_proto: TCP, source_port: 8080, dest_proto: TCP, dest_port: 80}, {dev_type: PROXY, source_proto: TCP, source_port: 8080, dest_proto: TCP, dest_port: 81}]"))

	port := netdevtest.FreePort(t)
	r := a.ok("create", "-f", a.manifest(t, "web", image, fmt.Sprintf(`network: lan
user_data: |
  #cloud-config
  #otherix-run: mkdir -p /www && echo hello-over-the-bridge > /www/index.html && httpd -p 80 -h /www
devices: [{dev_type: PROXY, source_proto: TCP, source_port: %d, dest_proto: TCP, dest_port: 80}]`, port)), "--wait")
	if !strings.Contains(r.stdout, "vm running") {
		t.Fatalf("create: %s %s", r.stdout, r.stderr)
	}
	con := a.console("web")
	line := waitConsole(t, con, "OTHERIX-GUEST ip eth0 10.77.0.")
	ip := strings.Fields(line)[3]
	waitConsole(t, con, "OTHERIX-GUEST run-exit 1 0")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := ns.Ping(ctx, ip); err != nil {
		t.Fatalf("ping %s: %v", ip, err)
	}
	// The guest agent reports the address into the VM view.
	var v api.VM
	for {
		v = a.getVM("web")
		if slices.Contains(v.IPAddresses, ip) {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("VM view never showed %s: %+v", ip, v)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if len(v.NICs) != 1 || v.NICs[0].Network != "lan" || v.NICs[0].Type != "bridge" || !strings.HasPrefix(v.NICs[0].Link, "oxt") || v.Network != "lan" {
		t.Fatalf("nic view: %+v", v.NICs)
	}
	if list := a.ok("vm", "list").stdout; !regexpLine(list, `^web\s+running\s+amd64\s+node-1\s+default\s+lan$`) {
		t.Fatalf("list:\n%s", list)
	}
	// The PROXY forward reaches the guest's httpd through the agent's proxy.
	body := httpGetIn(t, ns, fmt.Sprintf("http://127.0.0.1:%d/", port))
	if !strings.Contains(body, "hello-over-the-bridge") {
		t.Fatalf("forward answered %q", body)
	}
	// The host port is now taken: a second VM asking for it is refused.
	a.fails(1, "port_in_use", "create", "-f", a.manifest(t, "y", image, fmt.Sprintf("devices: [{dev_type: PROXY, source_proto: TCP, source_port: %d, dest_proto: TCP, dest_port: 80}]", port)), "--wait")
	// Duplicate MAC on the host.
	a.fails(1, "conflict", "create", "-f", a.manifest(t, "y", image, "devices: [{dev_type: NIC, network: lan, mac: \""+v.NICs[0].MAC+"\"}]"), "--wait")

	// A MACVLAN NIC gets a lease, and that VM reaches the bridged one.
	a.ok("create", "-f", a.manifest(t, "mac", image, fmt.Sprintf(`devices: [{dev_type: NIC, nic_type: MACVLAN, parent: mv0}]
user_data: |
  #cloud-config
  #otherix-run: ping -c 3 -W 5 %s`, ip)), "--wait")
	macCon := a.console("mac")
	waitConsole(t, macCon, "OTHERIX-GUEST ip eth0 10.77.0.")
	waitConsole(t, macCon, "OTHERIX-GUEST run-exit 1 0")
	links := oxLinks(t, ns)
	if len(links) != 2 {
		t.Fatalf("links while two VMs run: %v", links)
	}

	// kill -9 of the macvlan VM's QEMU: the agent deletes its macvtap at
	// once; then, the VM being desired running, reconcile starts it again.
	// The first restart follows the crash within milliseconds and makes a
	// macvtap of the same name, so the old one's end is told by its
	// ifindex (the kernel never hands a new link an index still in use).
	mv := a.getVM("mac")
	macvtap := mv.NICs[0].Link
	oldIndex := linkIndex(t, ns, macvtap)
	if oldIndex == 0 {
		t.Fatalf("macvtap %s missing: %v", macvtap, oxLinks(t, ns))
	}
	syscall.Kill(mv.QEMUPID, syscall.SIGKILL)
	waitLinkGone(t, ns, macvtap, oldIndex)
	mv2 := waitRunning(t, a, "mac", mv.QEMUPID)
	waitLink(t, ns, macvtap, true)

	// QEMU dies while the agent is down: its macvtap outlives both; the
	// restarted agent sweeps it (and reconcile then starts the VM again).
	webPID := a.getVM("web").QEMUPID
	a.kill()
	syscall.Kill(mv2.QEMUPID, syscall.SIGKILL)
	time.Sleep(200 * time.Millisecond)
	if !slices.Contains(oxLinks(t, ns), macvtap) {
		t.Fatalf("a macvtap should outlive its QEMU: %v", oxLinks(t, ns))
	}
	a.start()
	waitLog(t, a, "removed leftover network links")
	waitRunning(t, a, "mac", mv2.QEMUPID)
	if v := a.getVM("web"); v.Status != "running" || v.QEMUPID != webPID {
		t.Fatalf("bridged VM after agent restart: %+v", v)
	}

	a.ok("vm", "poweroff", "mac", "--wait")
	waitLink(t, ns, macvtap, false)
	a.ok("vm", "stop", "web", "--wait")
	waitLinks(t, ns, 0)
	a.ok("vm", "delete", "web", "--force", "--wait")
	a.ok("vm", "delete", "mac", "--force", "--wait")
	waitLinks(t, ns, 0)
}

// waitRunning waits for a VM to run with a QEMU other than oldPID.
func waitRunning(t *testing.T, a *standaloneAgent, name string, oldPID int) api.VM {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		v := a.getVM(name)
		if v.Status == "running" && v.QEMUPID != 0 && v.QEMUPID != oldPID {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not running again: %+v", name, v)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func waitLink(t *testing.T, ns *netdevtest.Netns, name string, present bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for slices.Contains(oxLinks(t, ns), name) != present {
		if time.Now().After(deadline) {
			t.Fatalf("link %s present=%v wanted %v: %v", name, !present, present, oxLinks(t, ns))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// linkIndex is the ifindex of the link called name, 0 when there is none.
func linkIndex(t *testing.T, ns *netdevtest.Netns, name string) int {
	t.Helper()
	for _, line := range strings.Split(ns.IP(t, "-o", "link", "show"), "\n") {
		// "3: name@peer: <...> ..."
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		if n, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@"); n != name {
			continue
		}
		i, err := strconv.Atoi(strings.TrimSuffix(f[0], ":"))
		if err != nil {
			t.Fatalf("ip link: %q: %v", line, err)
		}
		return i
	}
	return 0
}

// waitLinkGone waits until the link name with ifindex index is gone: no
// link of that name, or one made since (another index).
func waitLinkGone(t *testing.T, ns *netdevtest.Netns, name string, index int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for linkIndex(t, ns, name) == index {
		if time.Now().After(deadline) {
			t.Fatalf("link %s (ifindex %d) still present: %v", name, index, oxLinks(t, ns))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// manifest writes a create manifest with extra YAML and returns its path.
func (a *standaloneAgent) manifest(t *testing.T, name, image, extra string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name+".yaml")
	doc := fmt.Sprintf("name: %s\nimage_url: %s\narch: amd64\nvcpus: 1\nmemory_mb: 256\n%s\n", name, image, extra)
	if err := os.WriteFile(p, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func oxLinks(t *testing.T, ns *netdevtest.Netns) []string {
	var out []string
	for _, l := range ns.Links(t) {
		if strings.HasPrefix(l, "oxt") || strings.HasPrefix(l, "oxm") {
			out = append(out, l)
		}
	}
	return out
}

func waitLinks(t *testing.T, ns *netdevtest.Netns, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for len(oxLinks(t, ns)) != n {
		if time.Now().After(deadline) {
			t.Fatalf("links: %v, want %d", oxLinks(t, ns), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func httpGetIn(t *testing.T, ns *netdevtest.Netns, url string) string {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DialContext: ns.DialContext}, Timeout: 20 * time.Second}
	var last error
	for i := 0; i < 20; i++ {
		resp, err := c.Get(url)
		if err == nil {
			defer resp.Body.Close()
			var b strings.Builder
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				b.WriteString(sc.Text())
			}
			return b.String()
		}
		last = err
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("GET %s: %v", url, last)
	return ""
}
