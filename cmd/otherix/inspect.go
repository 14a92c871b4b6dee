package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/cmd/otherix/internal/client"
)

// vmList is "otherix vm list".
func (c *cli) vmList(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "table", "json", "yaml")
	showIDs := fs.Bool("show-ids", false, "add the UUID column to the table")
	var q client.ListQuery
	fs.IntVar(&q.Limit, "limit", 0, "page size (default: the server's)")
	fs.StringVar(&q.Cursor, "cursor", "", "resume after this `cursor` (printed on stderr by the previous page)")
	fs.StringVar(&q.Pool, "pool", "", "only VMs on this `pool`")
	fs.StringVar(&q.Node, "node", "", "only VMs currently on this `node`")
	fs.StringVar(&q.Status, "status", "", "only VMs with this `status` (running, stopped, ...)")
	_, cl, err := c.open(fs, args, "", check)
	if err != nil {
		return err
	}
	page, raw, err := cl.ListVMs(ctx, q)
	if err != nil {
		return err
	}
	switch *out {
	case "json":
		err = c.writeRaw(raw)
	case "yaml":
		err = c.writeJSONAsYAML(raw)
	default:
		c.writeTable(page.VMs, *showIDs)
	}
	if err != nil {
		return err
	}
	if page.NextCursor != "" {
		fmt.Fprintf(c.stderr, "next cursor: %s\n", page.NextCursor)
	}
	return nil
}

// writeTable prints the seed-004 table: NAME STATUS ARCH NODE POOL NETWORK,
// with UUID after NAME when showIDs; "-" stands for an empty cell.
func (c *cli) writeTable(vms []api.VM, showIDs bool) {
	tw := tabwriter.NewWriter(c.stdout, 0, 8, 2, ' ', 0)
	row := func(cells ...string) {
		for i, s := range cells {
			if s == "" {
				cells[i] = "-"
			}
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	if showIDs {
		row("NAME", "UUID", "STATUS", "ARCH", "NODE", "POOL", "NETWORK")
	} else {
		row("NAME", "STATUS", "ARCH", "NODE", "POOL", "NETWORK")
	}
	for _, v := range vms {
		node := v.Node
		if v.NodeState == api.NodeLost {
			node += " (lost)" // cluster mode: its status is its last reported
		}
		if showIDs {
			row(v.Name, v.UUID, v.Status, v.Arch, node, v.Pool, v.Network)
		} else {
			row(v.Name, v.Status, v.Arch, node, v.Pool, v.Network)
		}
	}
	tw.Flush()
}

// vmGet is "otherix vm get NAME".
func (c *cli) vmGet(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "text", "json", "yaml")
	name, cl, err := c.open(fs, args, "VM name", check)
	if err != nil {
		return err
	}
	vm, raw, err := cl.GetVM(ctx, name)
	if err != nil {
		return err
	}
	switch *out {
	case "json":
		return c.writeRaw(raw)
	case "yaml":
		m := manifestOf(vm)
		if err := c.writeYAML(m); err != nil {
			return err
		}
		if m.VNCEnabled {
			// Secrets are never shown: the manifest needs one put back.
			fmt.Fprintln(c.stdout, "# vnc_password: the VM's VNC password is a secret and not shown; set it here (at most 8 characters)")
		}
		return nil
	}
	c.writeText(vm)
	return nil
}

// manifestOf projects a VM onto the declarative CreateVM that re-creates
// it with 'otherix create -f'. Runtime fields (status, node, uuid, ...) are
// left out, and so are create-time inputs the VM view does not carry
// (firmware, format, user-data, network-config). image_sha256 pins the
// image the VM was built from.
func manifestOf(vm *api.VM) api.CreateVM {
	m := api.CreateVM{
		Name:          vm.Name,
		ImageURL:      vm.ImageURL,
		Arch:          vm.Arch,
		ImageSHA256:   vm.ImageSHA256,
		DiskGiB:       vm.DiskGiB,
		Pool:          vm.Pool,
		VCPUs:         vm.VCPUs,
		MemoryMB:      vm.MemoryMB,
		CPULimit:      vm.CPULimit,
		NoCloudInit:   !vm.CloudInit,
		RootDiskIOBus: vm.RootDiskIOBus,
	}
	if !vm.Autostart && vm.InstanceStatus != "" {
		off := false
		m.Autostart = &off
	}
	if vm.RestartPolicy != api.RestartOnFailure {
		m.RestartPolicy = vm.RestartPolicy
	}
	// NICs: one bridged NIC is seed 004's --network; anything else is a
	// list of seed-000 NIC devices. MACs are not copied: they are unique
	// per host, so a copy would conflict.
	var nics []api.NICView
	for _, n := range vm.NICs {
		if n.Type != "user" {
			nics = append(nics, n)
		}
	}
	switch {
	case len(nics) == 1 && nics[0].Type == "bridge":
		m.Network = nics[0].Network
	case len(nics) > 0:
		for _, n := range nics {
			t := map[string]string{"bridge": "BRIDGED", "macvlan": "MACVLAN"}[n.Type]
			m.Devices = append(m.Devices, api.Device{DevType: api.DevNIC, Network: n.Network, NICType: t})
		}
	case len(vm.NICs) == 0:
		m.Network = vm.Network // an older server without the NIC list
	}
	m.Devices = append(m.Devices, vm.Forwards...)
	m.Devices = append(m.Devices, vm.Devices...)
	if vm.TPM {
		m.Devices = append(m.Devices, api.Device{DevType: api.DevTPM})
	}
	// VNC: the port is not copied (a host's ports are its own, like MACs)
	// and the password is a secret (see the comment vm get writes).
	m.VNCEnabled = vm.VNCEnabled
	if vm.Firmware != "" && vm.Firmware != "bios" || vm.Arch == "arm64" && vm.Firmware != "uefi" {
		m.Firmware = vm.Firmware
	}
	return m
}

// writeText prints the multi-line "key: value" view of a VM.
func (c *cli) writeText(vm *api.VM) {
	num := func(n int) string {
		if n == 0 {
			return ""
		}
		return strconv.Itoa(n)
	}
	created := ""
	if !vm.CreatedAt.IsZero() {
		created = vm.CreatedAt.Format("2006-01-02T15:04:05Z07:00")
	}
	lastTask := ""
	if t := vm.LastTask; t != nil {
		lastTask = fmt.Sprintf("%s %s %s", t.Type, t.ID, t.Status)
	}
	lines := [][2]string{
		{"name", vm.Name},
		{"uuid", vm.UUID},
		{"status", vm.Status},
		{"status_reason", vm.StatusReason},
		{"desired_phase", vm.DesiredPhase},
		{"restart_policy", vm.RestartPolicy},
		{"restart_count", num(vm.RestartCount)},
		{"crash_loop", strconv.FormatBool(vm.CrashLoop)},
		{"autostart", strconv.FormatBool(vm.Autostart)},
		{"arch", vm.Arch},
		{"vcpus", num(vm.VCPUs)},
		{"memory_mb", num(vm.MemoryMB)},
		{"disk_gib", num(vm.DiskGiB)},
		{"pool", vm.Pool},
		{"node", vm.Node},
		{"network", vm.Network},
		{"image_url", vm.ImageURL},
		{"image_sha256", vm.ImageSHA256},
		{"cloud_init", strconv.FormatBool(vm.CloudInit)},
		{"qemu_pid", num(vm.QEMUPID)},
		{"ip_addresses", strings.Join(vm.IPAddresses, ",")},
		{"created_at", created},
		{"last_task", lastTask},
	}
	if vm.Placement != nil || vm.NodeState != "" { // cluster mode, after node
		i := slices.IndexFunc(lines, func(l [2]string) bool { return l[0] == "node" })
		var more [][2]string
		if vm.NodeState != "" {
			more = append(more, [2]string{"node_state", vm.NodeState})
		}
		if p := vm.Placement; p != nil {
			more = append(more, [2]string{"placement", fmt.Sprintf("node=%s pool=%s reason=%s", p.Node, p.Pool, p.Reason)})
		}
		lines = slices.Insert(lines, i+1, more...)
	}
	if vm.CPULimit > 0 { // after memory_mb
		i := slices.IndexFunc(lines, func(l [2]string) bool { return l[0] == "memory_mb" })
		lines = slices.Insert(lines, i+1, [2]string{"cpu_limit", cpuLimit(vm.CPULimit)})
	}
	// The VNC console and what `vm set` changed on a running VM.
	lines = append(lines, [2]string{"vnc_enabled", strconv.FormatBool(vm.VNCEnabled)})
	if vm.VNCEnabled && vm.VNCPort > 0 {
		lines = append(lines, [2]string{"vnc_port", strconv.Itoa(vm.VNCPort)})
	}
	if p := vm.PendingChanges; p != nil {
		lines = append(lines, [2]string{"pending_changes", pendingText(p) + " (at the next start)"})
	}
	for _, l := range lines {
		v := l[1]
		if v == "" {
			v = "-"
		}
		fmt.Fprintf(c.stdout, "%s: %s\n", l[0], v)
	}
}

// vmEvents is "otherix vm events NAME": the VM's history, oldest first.
func (c *cli) vmEvents(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "table", "json")
	name, cl, err := c.open(fs, args, "VM name", check)
	if err != nil {
		return err
	}
	evs, raw, err := cl.Events(ctx, name)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tTYPE\tMESSAGE\tTASK")
	for _, e := range evs {
		msg, task := e.Message, e.TaskID
		if msg == "" {
			msg = "-"
		}
		if task == "" {
			task = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", e.Time.UTC().Format(time.RFC3339), e.Type, msg, task)
	}
	return tw.Flush()
}

// vmConsole is "otherix vm console NAME".
func (c *cli) vmConsole(ctx context.Context, fs *flag.FlagSet, args []string) error {
	tail := fs.Int64("tail", 0, "print only the last `N` bytes")
	name, cl, err := c.open(fs, args, "VM name", func() error {
		if *tail < 0 {
			return &usageError{msg: "--tail must not be negative"}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return cl.Console(ctx, name, *tail, c.stdout)
}

// writeRaw echoes a server answer, ending it with a newline.
func (c *cli) writeRaw(raw []byte) error {
	if _, err := c.stdout.Write(raw); err != nil {
		return err
	}
	if len(raw) == 0 || raw[len(raw)-1] != '\n' {
		_, err := c.stdout.Write([]byte{'\n'})
		return err
	}
	return nil
}

func (c *cli) writeYAML(v any) error {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("encode yaml: %w", err)
	}
	if err := enc.Close(); err != nil {
		return fmt.Errorf("encode yaml: %w", err)
	}
	_, err := c.stdout.Write(b.Bytes())
	return err
}

// writeJSONAsYAML prints a JSON answer as block YAML, keeping its keys
// (snake_case) and their order.
func (c *cli) writeJSONAsYAML(raw []byte) error {
	var n yaml.Node
	if err := yaml.Unmarshal(raw, &n); err != nil { // JSON is YAML
		return fmt.Errorf("convert answer to yaml: %w", err)
	}
	blockStyle(&n)
	return c.writeYAML(&n)
}

// blockStyle clears the flow and quoting styles the JSON syntax left on n,
// so the encoder picks block style and quotes only where needed.
func blockStyle(n *yaml.Node) {
	n.Style = 0
	for _, k := range n.Content {
		blockStyle(k)
	}
}

// firmwareList is "firmware list": the node's firmware catalogue.
func (c *cli) firmwareList(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "table", "json")
	arch := fs.String("arch", "", "only this arch")
	_, cl, err := c.open(fs, args, "", check)
	if err != nil {
		return err
	}
	var list api.FirmwareList
	raw, err := cl.GetJSON(ctx, "/v1/firmwares", &list)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tARCH\tSECURE BOOT\tUUID")
	for _, f := range list.Firmwares {
		if *arch != "" && f.Arch != *arch {
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%t\t%s\n", f.Name, f.Arch, f.SecureBoot, f.UUID)
	}
	return tw.Flush()
}

// vmScreenshot is "vm screenshot NAME FILE.png".
func (c *cli) vmScreenshot(ctx context.Context, fs *flag.FlagSet, args []string) error {
	pos, err := c.parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return &usageError{msg: "vm screenshot takes NAME and FILE.png", synopsis: "otherix vm screenshot NAME FILE.png"}
	}
	cl, err := c.client()
	if err != nil {
		return err
	}
	png, err := cl.GetRaw(ctx, "/v1/vms/"+url.PathEscape(pos[0])+"/screenshot")
	if err != nil {
		return err
	}
	if err := os.WriteFile(pos[1], png, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "screenshot of vm %s: %s (%d bytes)\n", pos[0], pos[1], len(png))
	return nil
}

// cpuLimit shows a CPU cap; none shows as empty.
func cpuLimit(l float64) string {
	if l <= 0 {
		return ""
	}
	return strconv.FormatFloat(l, 'g', -1, 64)
}
