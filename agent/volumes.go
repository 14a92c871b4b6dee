package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// Volumes are agent-managed qcow2 disks in a pool:
// <pool>/volumes/<name>.qcow2, attached to VMs as seed-000 DISK devices.

func (h *Host) volumePath(pool, name string) (string, error) {
	if err := vm.ValidateName(name); err != nil {
		return "", errcode.New(errcode.ValidationFailed, "volume name %q is invalid: use 1 to 63 letters, digits and dashes", name)
	}
	if pool == "" {
		p, err := h.cache.DefaultPool()
		if err != nil {
			return "", err
		}
		pool = p
	}
	dir, err := h.cache.PoolDir(pool)
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, "volumes", name+".qcow2"), nil
}

// CreateVolume makes an empty qcow2 volume of sizeGiB in a pool.
func (h *Host) CreateVolume(ctx context.Context, pool, name string, sizeGiB int) (api.Volume, error) {
	if sizeGiB < 1 || sizeGiB > 65536 {
		return api.Volume{}, errcode.New(errcode.ValidationFailed, "size_gib %d out of range 1..65536", sizeGiB)
	}
	path, err := h.volumePath(pool, name)
	if err != nil {
		return api.Volume{}, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return api.Volume{}, errcode.Wrap(errcode.Internal, err, "volumes dir")
	}
	if _, err := os.Stat(path); err == nil {
		return api.Volume{}, errcode.New(errcode.Conflict, "volume %q already exists", name)
	}
	tmp := path + ".creating"
	out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", tmp, fmt.Sprintf("%dG", sizeGiB)).CombinedOutput()
	if err != nil {
		os.Remove(tmp)
		code := errcode.Internal
		if strings.Contains(string(out), "No space left on device") || strings.Contains(string(out), "Disk quota exceeded") {
			code = errcode.DiskFull // qemu-img's strerror: the pool is full
		}
		return api.Volume{}, errcode.New(code, "qemu-img create %s: %s", tmp, strings.TrimSpace(string(out)))
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		os.Remove(tmp)
		return api.Volume{}, errcode.Wrap(errcode.Internal, err, "volume")
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return api.Volume{}, errcode.Wrap(errcode.Internal, err, "volume")
	}
	return h.volume(pool, name, path)
}

func (h *Host) volume(pool, name, path string) (api.Volume, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return api.Volume{}, errcode.New(errcode.NotFound, "volume %q not found", name)
	}
	if pool == "" {
		pool, _ = h.cache.DefaultPool()
	}
	return api.Volume{Name: name, Pool: pool, AttachedTo: h.attachedTo(path), Bytes: fi.Size()}, nil
}

// attachedTo lists the VMs whose disks use path.
func (h *Host) attachedTo(path string) []string {
	var out []string
	for _, v := range h.engine.List() {
		for _, d := range v.Spec.Disks {
			if d.Path == path {
				out = append(out, v.Spec.Name)
			}
		}
	}
	return out
}

// Volumes lists a pool's volumes.
func (h *Host) Volumes(pool string) ([]api.Volume, error) {
	p, err := h.volumePath(pool, "x")
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(filepath.Dir(p))
	if errors.Is(err, os.ErrNotExist) {
		return []api.Volume{}, nil
	}
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "volumes")
	}
	out := []api.Volume{}
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".qcow2")
		if !ok || e.IsDir() {
			continue
		}
		if v, err := h.volume(pool, name, filepath.Join(filepath.Dir(p), e.Name())); err == nil {
			out = append(out, v)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// DeleteVolume removes a volume no VM uses.
func (h *Host) DeleteVolume(pool, name string) error {
	path, err := h.volumePath(pool, name)
	if err != nil {
		return err
	}
	if _, err := os.Stat(path); err != nil {
		return errcode.New(errcode.NotFound, "volume %q not found", name)
	}
	if vms := h.attachedTo(path); len(vms) > 0 {
		return errcode.New(errcode.Conflict, "volume %q is attached to %s", name, strings.Join(vms, ", "))
	}
	return os.Remove(path)
}
