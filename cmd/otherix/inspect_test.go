package main

import (
	"encoding/json"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/otherix/otherix-agent/agent/api"
)

// threeVMs stores the VMs the listing tests show.
func threeVMs(f *fakeAPI) {
	f.AddVM(api.VM{Name: "web-1", UUID: "11111111-1111-4111-8111-111111111111", Status: "running", Arch: "arm64", Node: "node-1", Pool: "default", VCPUs: 2, MemoryMB: 2048})
	f.AddVM(api.VM{Name: "db-1", UUID: "22222222-2222-4222-8222-222222222222", Status: "stopped", Arch: "amd64", Node: "node-2", Pool: "fast", Network: "br0"})
	f.AddVM(api.VM{Name: "app-10", UUID: "33333333-3333-4333-8333-333333333333", Status: "paused", Arch: "amd64", Node: "node-1", Pool: "default"})
}

func TestVMListTable(t *testing.T) {
	h := newHarness(t)
	threeVMs(h.api)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"vm", "list"}, "" +
			"NAME    STATUS   ARCH   NODE    POOL     NETWORK\n" +
			"app-10  paused   amd64  node-1  default  -\n" +
			"db-1    stopped  amd64  node-2  fast     br0\n" +
			"web-1   running  arm64  node-1  default  -\n"},
		{[]string{"vm", "list", "--show-ids", "-o", "table"}, "" +
			"NAME    UUID                                  STATUS   ARCH   NODE    POOL     NETWORK\n" +
			"app-10  33333333-3333-4333-8333-333333333333  paused   amd64  node-1  default  -\n" +
			"db-1    22222222-2222-4222-8222-222222222222  stopped  amd64  node-2  fast     br0\n" +
			"web-1   11111111-1111-4111-8111-111111111111  running  arm64  node-1  default  -\n"},
		{[]string{"vm", "list", "--status", "nothing-has-this"}, "NAME  STATUS  ARCH  NODE  POOL  NETWORK\n"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			r := h.must(tc.args...)
			if r.stdout != tc.want || r.stderr != "" {
				t.Errorf("stdout:\n%s\nstderr %q\nwant stdout:\n%s", r.stdout, r.stderr, tc.want)
			}
		})
	}
}

func TestVMListJSONAndYAML(t *testing.T) {
	h := newHarness(t)
	threeVMs(h.api)
	r := h.must("vm", "list", "-o", "json", "--limit", "2")
	var page struct {
		VMs        []api.VM `json:"vms"`
		NextCursor string   `json:"next_cursor"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &page); err != nil {
		t.Fatalf("stdout is not JSON: %v\n%s", err, r.stdout)
	}
	if len(page.VMs) != 2 || page.VMs[0].Name != "app-10" || page.NextCursor != "db-1" {
		t.Errorf("page = %+v", page)
	}
	if r.stderr != "next cursor: db-1\n" {
		t.Errorf("stderr = %q, want the next cursor", r.stderr)
	}

	r = h.must("vm", "list", "--output=yaml")
	var doc struct {
		VMs []map[string]any `yaml:"vms"`
	}
	if err := yaml.Unmarshal([]byte(r.stdout), &doc); err != nil {
		t.Fatalf("stdout is not YAML: %v\n%s", err, r.stdout)
	}
	if len(doc.VMs) != 3 || doc.VMs[1]["name"] != "db-1" || doc.VMs[1]["network"] != "br0" || doc.VMs[1]["memory_mb"] != 0 {
		t.Errorf("yaml vms = %v", doc.VMs)
	}
	// Block style, snake_case keys in the server's order, JSON's quoting gone.
	if !strings.Contains(r.stdout, "vms:\n  - name: app-10\n    uuid: 33333333-3333-4333-8333-333333333333\n    status: paused\n") {
		t.Errorf("yaml is not block style in server order:\n%s", r.stdout)
	}
	if !strings.Contains(r.stdout, "created_at: \"0001-01-01T00:00:00Z\"") {
		t.Errorf("a string that reads as a timestamp must stay quoted:\n%s", r.stdout)
	}
}

func TestVMListPassesPageAndFilters(t *testing.T) {
	h := newHarness(t)
	threeVMs(h.api)
	r := h.must("vm", "list", "--limit", "1", "--cursor", "app-10", "--pool", "default", "--node", "node-1", "--status", "running")
	if want := "NAME   STATUS   ARCH   NODE    POOL     NETWORK\nweb-1  running  arm64  node-1  default  -\n"; r.stdout != want {
		t.Errorf("stdout:\n%s\nwant:\n%s", r.stdout, want)
	}
	reqs := h.api.Requests(true)
	if len(reqs) != 1 {
		t.Fatalf("requests = %+v", reqs)
	}
	got, _ := url.ParseQuery(reqs[0].Query)
	want := url.Values{"limit": {"1"}, "cursor": {"app-10"}, "pool": {"default"}, "node": {"node-1"}, "status": {"running"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("query = %v, want %v", got, want)
	}

	// Walk all pages with the cursor the CLI prints.
	var names []string
	cursor := ""
	for range 5 {
		r := h.must("vm", "list", "--limit", "1", "--cursor", cursor)
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		for _, l := range lines[1:] {
			names = append(names, strings.Fields(l)[0])
		}
		next, ok := strings.CutPrefix(r.stderr, "next cursor: ")
		if !ok {
			break
		}
		cursor = strings.TrimSpace(next)
	}
	if want := []string{"app-10", "db-1", "web-1"}; !reflect.DeepEqual(names, want) {
		t.Errorf("paged names = %v, want %v", names, want)
	}
}

func testVM() api.VM {
	return api.VM{
		Name: "web-1", UUID: "11111111-1111-4111-8111-111111111111", Status: "running", DesiredPhase: "running",
		RestartPolicy: "on-failure", RestartCount: 2, Arch: "arm64", VCPUs: 2, MemoryMB: 2048, Pool: "default", Node: "node-1",
		ImageURL: imageURL, ImageSHA256: strings.Repeat("ab", 32), DiskGiB: 8, QEMUPID: 4242, CloudInit: true,
		IPAddresses: []string{"10.0.2.15", "fe80::1"},
		CreatedAt:   time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC),
		LastTask:    &api.TaskRef{ID: "task-9", Type: "vm.start", Status: "success"},
	}
}

func TestVMGet(t *testing.T) {
	h := newHarness(t)
	h.api.AddVM(testVM())
	r := h.must("vm", "get", "web-1")
	want := `name: web-1
uuid: 11111111-1111-4111-8111-111111111111
status: running
status_reason: -
desired_phase: running
restart_policy: on-failure
restart_count: 2
crash_loop: false
autostart: false
arch: arm64
vcpus: 2
memory_mb: 2048
disk_gib: 8
pool: default
node: node-1
network: -
image_url: https://cloud-images.example/noble-arm64.img
image_sha256: abababababababababababababababababababababababababababababababab
cloud_init: true
qemu_pid: 4242
ip_addresses: 10.0.2.15,fe80::1
created_at: 2025-01-02T03:04:05Z
last_task: vm.start task-9 success
vnc_enabled: false
`
	if r.stdout != want {
		t.Errorf("stdout:\n%s\nwant:\n%s", r.stdout, want)
	}

	r = h.must("vm", "get", "-o", "json", "web-1")
	var got api.VM
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil || !reflect.DeepEqual(got, testVM()) {
		t.Errorf("json = %s (err %v), want the VM", r.stdout, err)
	}
	// The raw answer, byte for byte (the fake ends it with a newline).
	raw, _ := json.Marshal(testVM())
	if r.stdout != string(raw)+"\n" {
		t.Errorf("json = %q, want the raw server answer %q", r.stdout, raw)
	}

	r = h.run("", "vm", "get", "nope")
	if want := "error: not_found: vm \"nope\" not found\n"; r.code != 1 || r.stderr != want {
		t.Errorf("exit %d stderr %q, want exit 1 stderr %q", r.code, r.stderr, want)
	}
}

func TestVMGetYAMLManifest(t *testing.T) {
	h := newHarness(t)
	v := testVM()
	v.Network = "br0"
	h.api.AddVM(v)
	r := h.must("vm", "get", "web-1", "--output", "yaml")
	want := `name: web-1
image_url: https://cloud-images.example/noble-arm64.img
arch: arm64
image_sha256: abababababababababababababababababababababababababababababababab
disk_gib: 8
pool: default
network: br0
vcpus: 2
memory_mb: 2048
`
	if r.stdout != want {
		t.Errorf("stdout:\n%s\nwant:\n%s", r.stdout, want)
	}
	spec, err := parseManifest([]byte(r.stdout), "test")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(spec, manifestOf(&v)) {
		t.Errorf("parsed manifest = %+v, want %+v", spec, manifestOf(&v))
	}
}

// TestVMGetYAMLDevices: the seed-000 devices of the view (DISK, CDROM,
// host devices) come out in the manifest as asked, and parse back.
func TestVMGetYAMLDevices(t *testing.T) {
	h := newHarness(t)
	v := testVM()
	prio := 0
	v.VNCEnabled, v.VNCPort = true, 5903
	v.Devices = []api.Device{
		{DevType: api.DevDisk, Source: "data-1", StoragePool: "default", Readonly: true, IOBus: "VIRTIO-BLK"},
		{DevType: api.DevCDROM, Source: "https://isos.example/tools.iso", SHA256: strings.Repeat("cd", 32), BootPriority: &prio},
		{DevType: api.DevGPU, GPUType: "SRIOV", PCI: "0000:03:00.0"},
		{DevType: api.DevUSB, VendorID: "0781", ProductID: "5583"},
		{DevType: api.DevTPM, Path: "/dev/tpm0"},
	}
	h.api.AddVM(v)
	r := h.must("vm", "get", "web-1", "-o", "yaml")
	for _, want := range []string{
		"  - dev_type: DISK\n    source: data-1\n    storage_pool: default\n    readonly: true\n    io_bus: VIRTIO-BLK\n",
		"  - dev_type: GPU\n    gpu_type: SRIOV\n    pci: \"0000:03:00.0\"\n",
		"  - dev_type: USB\n    vendor_id: \"0781\"\n    product_id: \"5583\"\n",
		"  - dev_type: TPM\n    path: /dev/tpm0\n",
		"    boot_priority: 0\n",
		"vnc_enabled: true\n",
		"# vnc_password: the VM's VNC password is a secret and not shown; set it here (at most 8 characters)\n",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("manifest lacks %q:\n%s", want, r.stdout)
		}
	}
	spec, err := parseManifest([]byte(r.stdout), "test")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(spec.Devices, v.Devices) {
		t.Errorf("devices parsed back = %+v, want %+v", spec.Devices, v.Devices)
	}
	if !spec.VNCEnabled || spec.VNCPort != nil || spec.VNCPassword != "" || strings.Contains(r.stdout, "5903") {
		t.Errorf("vnc in the manifest: enabled %v port %v password %q", spec.VNCEnabled, spec.VNCPort, spec.VNCPassword)
	}
}

func TestVMConsole(t *testing.T) {
	h := newHarness(t)
	h.api.AddVM(testVM())
	const log = "[    0.000000] Linux version 6.8\nUbuntu 24.04 web-1 ttyS0\n\nweb-1 login: "
	h.api.SetConsole("web-1", log)
	if r := h.must("vm", "console", "web-1"); r.stdout != log {
		t.Errorf("console = %q, want %q", r.stdout, log)
	}
	if r := h.must("vm", "console", "--tail", "13", "web-1"); r.stdout != "web-1 login: " {
		t.Errorf("console --tail 13 = %q", r.stdout)
	}
	if r := h.run("", "vm", "console", "web-1", "--tail", "-1"); r.code != 1 || r.stderr != "error: --tail must not be negative\n" {
		t.Errorf("--tail -1: exit %d stderr %q", r.code, r.stderr)
	}
	if r := h.run("", "vm", "console", "nope"); r.code != 1 || r.stderr != "error: not_found: vm \"nope\" not found\n" {
		t.Errorf("console nope: exit %d stderr %q", r.code, r.stderr)
	}
}

// TestVMGetPending shows the VNC console and what vm set changed on a
// running VM, which applies at its next start.
func TestVMGetPending(t *testing.T) {
	h := newHarness(t)
	vm := testVM()
	vm.Autostart, vm.VNCEnabled, vm.VNCPort = true, true, 5901
	on := false
	vm.PendingChanges = &api.PendingChanges{VCPUs: 4, MemoryMB: 4096, VNCEnabled: &on}
	h.api.AddVM(vm)
	r := h.must("vm", "get", "web-1")
	for _, want := range []string{"\nautostart: true\n", "\nvnc_enabled: true\nvnc_port: 5901\n",
		"\npending_changes: vcpus=4 memory_mb=4096 vnc_enabled=false (at the next start)\n"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("stdout:\n%s\nwant it to hold %q", r.stdout, want)
		}
	}
}
