package hostdev

import (
	"strings"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Holders says which VM holds each host device: a Plan's keys
// ("pci:<addr>", "iommu_group:<n>", "mdev:<uuid>", "usb:<port>",
// "tpm:<path>") to the holding VM's uuid. This package keeps no such
// table: its caller derives one from what its VMs hold (the plans of
// their running QEMUs, the devices of creates in progress) each time it
// resolves, under the lock that makes the check and the claim one step.
// A nil Holders holds nothing.
type Holders map[string]string

// Add records that vm holds keys.
func (h Holders) Add(vm string, keys []string) {
	for _, k := range keys {
		h[k] = vm
	}
}

// Check returns device_busy, naming the device and the VM, when a VM other
// than vm holds one of keys.
func (h Holders) Check(vm string, keys []string) error {
	for _, k := range keys {
		if o := h[k]; o != "" && o != vm {
			kind, id, _ := strings.Cut(k, ":")
			return errcode.New(errcode.DeviceBusy, "%s %s is in use by VM %s", strings.ReplaceAll(kind, "_", " "), id, o)
		}
	}
	return nil
}

// heldByOther returns the VM other than vm holding key, or "".
func (h Holders) heldByOther(vm, key string) string {
	if o := h[key]; o != vm {
		return o
	}
	return ""
}
