package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"reflect"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Seed 004 defaults of vm create.
const (
	defaultVCPUs    = 2
	defaultMemoryMB = 2048
)

// vmCreate is "otherix vm create NAME --image-url URL --arch ARCH ...".
func (c *cli) vmCreate(ctx context.Context, fs *flag.FlagSet, args []string) error {
	var spec api.CreateVM
	fs.StringVar(&spec.ImageURL, "image-url", "", "source image `URL` to download and boot from (required)")
	fs.StringVar(&spec.Arch, "arch", "", "`arch`itecture: amd64 or arm64 (required)")
	fs.StringVar(&spec.ImageSHA256, "image-sha256", "", "expected sha256 of the image, verified after download")
	fs.StringVar(&spec.Firmware, "firmware", "", "firmware `name` (exclusive with --firmware-id)")
	fs.StringVar(&spec.FirmwareID, "firmware-id", "", "firmware `uuid` (exclusive with --firmware)")
	fs.StringVar(&spec.Format, "format", "", "disk `format`, e.g. qcow2 or raw (default: server's)")
	fs.IntVar(&spec.DiskGiB, "disk-gib", 0, "root disk size in `GiB` (default: the image's virtual size)")
	fs.StringVar(&spec.Pool, "pool", "", "storage `pool` name or uuid (default: the cluster default pool)")
	fs.StringVar(&spec.Node, "node", "", "placement hint: `node` name or uuid (default: the scheduler picks)")
	fs.StringVar(&spec.Network, "network", "", "bridge `network` name or uuid for one NIC (default: no NIC, SLIRP)")
	fs.IntVar(&spec.VCPUs, "vcpus", defaultVCPUs, "vCPU count (1..128)")
	fs.IntVar(&spec.MemoryMB, "memory-mb", defaultMemoryMB, "memory in `MiB` (128..524288)")
	fs.Float64Var(&spec.CPULimit, "cpu-limit", 0, "cap the VM's CPU time at this many `CPUs`, e.g. 0.5 (default: no cap)")
	userData := fs.String("user-data", "", "`path` to a #cloud-config user-data YAML, or - for stdin")
	netConfig := fs.String("network-config", "", "`path` to a cloud-init network-config YAML, or - for stdin")
	fs.BoolVar(&spec.NoCloudInit, "no-cloud-init", false, "disable cloud-init (exclusive with --user-data and --network-config)")
	fs.StringVar(&spec.RestartPolicy, "restart-policy", "", "what to do when the VM ends on its own: on-failure (default: restart after a crash), always (after a guest power-off too) or never")
	w := waitFlags(fs)
	name, err := c.name(fs, args)
	if err != nil {
		return err
	}
	spec.Name = name
	if err := c.checkWait(w); err != nil {
		return err
	}
	set := map[string]bool{"name": true}
	fs.Visit(func(f *flag.Flag) { set[strings.ReplaceAll(f.Name, "-", "_")] = true })
	if spec.ImageURL == "" {
		delete(set, "image_url")
	}
	if spec.Arch == "" {
		delete(set, "arch")
	}
	if err := checkSpec(func(k string) bool { return set[k] }, flagName, ""); err != nil {
		return err
	}
	if *userData == "-" && *netConfig == "-" {
		return errcode.New(errcode.ValidationFailed, "--user-data and --network-config cannot both read stdin")
	}
	if spec.UserData, err = c.readInput(*userData, "--user-data"); err != nil {
		return err
	}
	if spec.NetworkConfig, err = c.readInput(*netConfig, "--network-config"); err != nil {
		return err
	}
	return c.submitCreate(ctx, spec, w)
}

// flagName maps a manifest key to its vm create flag.
func flagName(key string) string {
	if key == "name" {
		return "NAME"
	}
	return "--" + strings.ReplaceAll(key, "_", "-")
}

// checkSpec does the client-side checks of a create: the required fields
// and the mutually exclusive ones. has reports whether a key (an
// api.CreateVM yaml key) is set; show names it for the user; where prefixes
// messages.
func checkSpec(has func(key string) bool, show func(key string) string, where string) error {
	for _, k := range []string{"name", "image_url", "arch"} {
		if !has(k) {
			return errcode.New(errcode.ValidationFailed, "%s%s is required", where, show(k))
		}
	}
	for _, p := range [][2]string{
		{"firmware", "firmware_id"},
		{"no_cloud_init", "user_data"},
		{"no_cloud_init", "network_config"},
	} {
		if has(p[0]) && has(p[1]) {
			return errcode.New(errcode.ValidationFailed, "%s%s and %s are mutually exclusive", where, show(p[0]), show(p[1]))
		}
	}
	return nil
}

// readInput returns the content of path, or of stdin when path is "-".
func (c *cli) readInput(path, what string) (string, error) {
	var (
		b   []byte
		err error
	)
	switch path {
	case "":
		return "", nil
	case "-":
		b, err = io.ReadAll(c.stdin)
	default:
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return "", fmt.Errorf("read %s: %w", what, err)
	}
	return string(b), nil
}

// createManifest is "otherix create -f FILE".
func (c *cli) createManifest(ctx context.Context, fs *flag.FlagSet, args []string) error {
	file := fs.String("f", "", "manifest `file` (YAML with the keys of the POST /v1/vms body), - for stdin")
	fs.StringVar(file, "filename", "", "same as -f")
	w := waitFlags(fs)
	if err := c.none(fs, args); err != nil {
		return err
	}
	if *file == "" {
		return c.usageErr(fs, "missing -f FILE")
	}
	if err := c.checkWait(w); err != nil {
		return err
	}
	data, err := c.readInput(*file, "manifest")
	if err != nil {
		return err
	}
	where := *file
	if where == "-" {
		where = "stdin"
	}
	spec, err := parseManifest([]byte(data), where)
	if err != nil {
		return err
	}
	return c.submitCreate(ctx, spec, w)
}

// manifestKeys are the keys a manifest may hold: api.CreateVM's yaml tags.
func manifestKeys() map[string]bool {
	keys := map[string]bool{}
	t := reflect.TypeFor[api.CreateVM]()
	for i := range t.NumField() {
		if k, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ","); k != "" && k != "-" {
			keys[k] = true
		}
	}
	return keys
}

// parseManifest decodes a single-document YAML manifest into a CreateVM.
// Unknown keys are an error naming each of them with its line.
func parseManifest(data []byte, where string) (api.CreateVM, error) {
	var spec api.CreateVM
	bad := func(format string, args ...any) error {
		return errcode.New(errcode.ValidationFailed, "%s: %s", where, fmt.Sprintf(format, args...))
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return spec, bad("manifest is empty")
		}
		return spec, bad("%s", yamlErr(err))
	}
	var more yaml.Node
	if err := dec.Decode(&more); !errors.Is(err, io.EOF) {
		return spec, bad("a manifest holds one document (found a second one or bad YAML after the first)")
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	if root.Kind != yaml.MappingNode {
		return spec, bad("manifest must be a mapping of keys to values")
	}
	known := manifestKeys()
	var unknown []string
	for i := 0; i+1 < len(root.Content); i += 2 {
		if k := root.Content[i]; !known[k.Value] {
			unknown = append(unknown, fmt.Sprintf("%s (line %d)", k.Value, k.Line))
		}
	}
	if len(unknown) > 0 {
		allowed := make([]string, 0, len(known))
		for k := range known {
			allowed = append(allowed, k)
		}
		sort.Strings(allowed)
		return spec, bad("unknown keys: %s (allowed: %s)", strings.Join(unknown, ", "), strings.Join(allowed, ", "))
	}
	strict := yaml.NewDecoder(bytes.NewReader(data))
	strict.KnownFields(true)
	if err := strict.Decode(&spec); err != nil {
		return spec, bad("%s", yamlErr(err))
	}
	has := func(k string) bool {
		switch k {
		case "name":
			return spec.Name != ""
		case "image_url":
			return spec.ImageURL != ""
		case "arch":
			return spec.Arch != ""
		case "firmware":
			return spec.Firmware != ""
		case "firmware_id":
			return spec.FirmwareID != ""
		case "no_cloud_init":
			return spec.NoCloudInit
		case "user_data":
			return spec.UserData != ""
		case "network_config":
			return spec.NetworkConfig != ""
		}
		return false
	}
	if err := checkSpec(has, func(k string) string { return k }, where+": "); err != nil {
		return spec, err
	}
	return spec, nil
}

// yamlErr flattens a yaml.v3 error to one line.
func yamlErr(err error) string {
	var te *yaml.TypeError
	if errors.As(err, &te) {
		return strings.Join(te.Errors, "; ")
	}
	return strings.TrimPrefix(err.Error(), "yaml: ")
}

// submitCreate posts spec and, with --wait, waits for the VM to run.
func (c *cli) submitCreate(ctx context.Context, spec api.CreateVM, w *waitOpts) error {
	cl, err := c.client()
	if err != nil {
		return err
	}
	t, err := cl.CreateVM(ctx, spec)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "created task=%s status=%s\n", t.ID, t.Status)
	if !w.wait {
		return nil
	}
	return c.waitTask(ctx, cl, t, "running", w.timeout)
}
