package agent

import (
	"context"
	"strings"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/agent/vm"
)

func (h *Host) toAPI(v vm.View) api.VM {
	m := v.Record
	return api.VM{
		Name:         v.Spec.Name,
		UUID:         v.Spec.UUID,
		Status:       v.Status,
		StatusReason: statusReason(v, m),
		DesiredPhase: m.DesiredPhase,
		Arch:         v.Spec.Arch,
		VCPUs:        v.Spec.VCPUs,
		MemoryMB:     v.Spec.MemoryMB,
		CPULimit:     v.Spec.CPULimit,
		Pool:         m.Pool,
		Node:         h.cfg.NodeName,
		Network:      m.Network,
		ImageURL:     m.ImageURL,
		ImageSHA256:  m.ImageSHA256,
		DiskGiB:      m.DiskGiB,
		QEMUPID:      v.PID,
		IPAddresses:  vm.GuestIPs(v.Guest),
		NICs:         h.nicViews(v),
		Forwards:     forwardViews(v, m),
		Devices:      m.Devices,
		CloudInit:    m.CloudInit,
		CreatedAt:    v.CreatedAt,
		StartedAt:    startedAt(v),
		LastTask:     m.LastTask,

		InstanceStatus: api.InstanceStatus(v.Status),
		Firmware:       firmwareName(v),
		SecureBoot:     v.Spec.Firmware != nil && v.Spec.Firmware.SecureBoot,
		TPM:            v.Spec.TPM != nil,
		VNCEnabled:     v.Spec.VNC != nil,
		VNCPort:        vncPort(v),
		RootDiskIOBus:  m.RootDiskIOBus,
		Autostart:      m.Autostart,
		RestartPolicy:  m.Policy(),
		RestartCount:   m.Restarts,
		CrashLoop:      m.CrashLoop,
		PendingChanges: pending(v),
		Usage:          h.usageOf(v).Summary(),
	}
}

// pending describes the spec changes a VM gets at its next start.
func pending(v vm.View) *api.PendingChanges {
	if v.Next == nil {
		return nil
	}
	p := &api.PendingChanges{}
	if v.Next.VCPUs != v.Spec.VCPUs {
		p.VCPUs = v.Next.VCPUs
	}
	if v.Next.MemoryMB != v.Spec.MemoryMB {
		p.MemoryMB = v.Next.MemoryMB
	}
	if v.Next.CPULimit != v.Spec.CPULimit {
		p.CPULimit = v.Next.CPULimit
	}
	if on := v.Next.VNC != nil; on != (v.Spec.VNC != nil) {
		p.VNCEnabled = &on
	}
	if n := v.Next.VNC; n != nil && (v.Spec.VNC == nil || n.Port != v.Spec.VNC.Port) {
		p.VNCPort = n.Port
	}
	if *p == (api.PendingChanges{}) {
		return nil
	}
	return p
}

// VMs reports every VM on this host, including ones being created.
func (h *Host) VMs(ctx context.Context) []api.VM {
	var out []api.VM
	seen := map[string]bool{}
	for _, v := range h.engine.List() {
		out = append(out, h.toAPI(v))
		seen[v.Spec.Name] = true
	}
	for _, p := range h.engine.Reserved() {
		if !seen[p.Name] {
			out = append(out, p)
		}
	}
	return out
}

// VM returns one VM's view.
func (h *Host) VM(name string) (api.VM, error) {
	v, err := h.engine.Get(name)
	if err == nil {
		return h.toAPI(v), nil
	}
	if p, ok := h.engine.ReservedView(name); ok {
		return p, nil
	}
	return api.VM{}, err
}

// forwardViews lists a VM's port forwards as seed-000 PROXY devices.
func forwardViews(v vm.View, m vm.Record) []api.Device {
	rules := append([]portfwd.Rule(nil), m.Forwards...)
	for _, n := range v.Spec.NICs {
		rules = append(rules, n.Forwards...)
	}
	var out []api.Device
	for _, r := range rules {
		out = append(out, api.Device{DevType: api.DevProxy, SourceProto: strings.ToUpper(r.Proto), SourcePort: r.HostPort,
			DestProto: strings.ToUpper(r.Proto), DestPort: r.GuestPort})
	}
	return out
}

func firmwareName(v vm.View) string {
	if v.Spec.Firmware != nil {
		return v.Spec.Firmware.Name
	}
	return "bios"
}

func vncPort(v vm.View) int {
	if v.Spec.VNC != nil {
		return v.Spec.VNC.Port
	}
	return 0
}

// startedAt is when the VM's QEMU started, zero while it has none.
func startedAt(v vm.View) time.Time {
	if v.PID == 0 {
		return time.Time{}
	}
	return v.StartedAt
}
