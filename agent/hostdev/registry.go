package hostdev

import (
	"sort"
	"strings"
	"sync"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Registry records which VM holds which host device, so that one device
// never goes to two VMs of this host. Keys are a Plan's Keys ("pci:<addr>",
// "iommu_group:<n>", "mdev:<uuid>", "usb:<port>", "tpm:<path>"). It lives
// in memory: after a restart the agent claims again for the VMs it
// re-adopts, from their persisted Plans. The zero value is empty and ready.
type Registry struct {
	mu     sync.Mutex
	owners map[string]string   // key → VM uuid
	byVM   map[string][]string // VM uuid → its keys
}

// Claim gives every key to vm, or none: if another VM holds one, it
// returns device_busy naming the device and the VM. Claiming keys vm
// already holds is a no-op.
func (r *Registry) Claim(vm string, keys []string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.checkLocked(vm, keys); err != nil {
		return err
	}
	if r.owners == nil {
		r.owners = map[string]string{}
		r.byVM = map[string][]string{}
	}
	for _, k := range keys {
		if r.owners[k] == vm {
			continue
		}
		r.owners[k] = vm
		r.byVM[vm] = append(r.byVM[vm], k)
	}
	return nil
}

// Release frees every key vm holds.
func (r *Registry) Release(vm string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range r.byVM[vm] {
		if r.owners[k] == vm {
			delete(r.owners, k)
		}
	}
	delete(r.byVM, vm)
}

// Owner returns the VM holding key, or "".
func (r *Registry) Owner(key string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.owners[key]
}

// Held returns the keys vm holds, sorted.
func (r *Registry) Held(vm string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := append([]string(nil), r.byVM[vm]...)
	sort.Strings(out)
	return out
}

func (r *Registry) check(vm string, keys []string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.checkLocked(vm, keys)
}

func (r *Registry) checkLocked(vm string, keys []string) error {
	for _, k := range keys {
		if o := r.owners[k]; o != "" && o != vm {
			kind, id, _ := strings.Cut(k, ":")
			return errcode.New(errcode.DeviceBusy, "%s %s is in use by VM %s", strings.ReplaceAll(kind, "_", " "), id, o)
		}
	}
	return nil
}
