package agent

import (
	"context"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/errcode"
	"github.com/otherix/otherix-agent/agent/guestagent"
	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/agent/vm"
)

// netState is the per-VM runtime network state the host keeps: guest IPs
// from the guest agent and the agent-side proxy of bridged VMs' forwards.
type netState struct {
	mu      sync.Mutex
	ips     map[string][]string // vm uuid -> addresses
	ifaces  map[string][]guestagent.Interface
	pollers map[string]context.CancelFunc
	proxies map[string]*portfwd.Proxy
}

func newNetState() *netState {
	return &netState{ips: map[string][]string{}, ifaces: map[string][]guestagent.Interface{},
		pollers: map[string]context.CancelFunc{}, proxies: map[string]*portfwd.Proxy{}}
}

// onGuestAgent starts or stops following a VM's guest agent.
func (h *Host) onGuestAgent(v vm.View, up bool) {
	ns := h.net
	ns.mu.Lock()
	if cancel := ns.pollers[v.Spec.UUID]; cancel != nil {
		cancel()
		delete(ns.pollers, v.Spec.UUID)
	}
	if !up {
		ns.mu.Unlock()
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	ns.pollers[v.Spec.UUID] = cancel
	ns.mu.Unlock()
	go h.pollGuestAgent(ctx, v)
}

// pollGuestAgent refreshes a VM's IPs from its guest agent: at once, then
// every 10 s while the channel is open.
func (h *Host) pollGuestAgent(ctx context.Context, v vm.View) {
	c := guestagent.New(v.QGASocket)
	defer c.Close()
	log := h.log.With(zap.String("vm", v.Spec.Name), zap.String("vm_uuid", v.Spec.UUID))
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		ifs, err := c.Interfaces(qctx)
		cancel()
		if err != nil {
			log.Debug("guest agent", zap.Error(err))
			c.Reset()
			t.Reset(2 * time.Second)
			continue
		}
		var ips []string
		for _, i := range ifs {
			for _, a := range i.Addrs {
				ips = append(ips, a.Addr().String())
			}
		}
		sort.Strings(ips)
		h.net.mu.Lock()
		changed := strings.Join(h.net.ips[v.Spec.UUID], ",") != strings.Join(ips, ",")
		h.net.ips[v.Spec.UUID] = ips
		h.net.ifaces[v.Spec.UUID] = ifs
		h.net.mu.Unlock()
		if changed {
			log.Info("guest addresses", zap.Strings("ip_addresses", ips))
			if h.onChange != nil {
				if nv, err := h.engine.GetByUUID(v.Spec.UUID); err == nil {
					h.onChange(h.toAPI(nv))
				}
			}
		}
		t.Reset(10 * time.Second)
	}
}

// guestIPv4 is the first IPv4 the guest agent reported on a bridged or
// macvlan NIC of the VM: where the proxy sends forwards.
func (h *Host) guestIPv4(id string, nics []vm.NIC) (netip.Addr, error) {
	h.net.mu.Lock()
	defer h.net.mu.Unlock()
	for _, i := range h.net.ifaces[id] {
		for _, n := range nics {
			if n.Type != vm.NICUser && strings.EqualFold(i.MAC, n.MAC) {
				for _, a := range i.Addrs {
					if a.Addr().Is4() {
						return a.Addr(), nil
					}
				}
			}
		}
	}
	return netip.Addr{}, errcode.New(errcode.NetworkUnavailable, "the guest agent has not reported an address yet")
}

// syncNetState follows status changes: a running VM with forwards on a
// bridged NIC gets its proxy; a VM that stops loses proxy, IPs and poller.
func (h *Host) syncNetState(v vm.View) {
	m := v.Record
	id := v.Spec.UUID
	running := v.Status == api.StatusRunning || v.Status == api.StatusPaused
	ns := h.net
	ns.mu.Lock()
	p := ns.proxies[id]
	if !running {
		delete(ns.proxies, id)
		delete(ns.ips, id)
		delete(ns.ifaces, id)
		if cancel := ns.pollers[id]; cancel != nil {
			cancel()
			delete(ns.pollers, id)
		}
		ns.mu.Unlock()
		if p != nil {
			p.Close()
		}
		return
	}
	if p != nil || len(m.Forwards) == 0 {
		ns.mu.Unlock()
		return
	}
	nics := v.Spec.NICs
	p = portfwd.NewProxy(func(ctx context.Context) (netip.Addr, error) { return h.guestIPv4(id, nics) }, portfwd.ProxyOptions{Log: h.log.Named("proxy")})
	ns.proxies[id] = p
	ns.mu.Unlock()
	if err := p.Add(context.Background(), m.Forwards...); err != nil {
		h.log.Warn("port forwards", zap.String("vm", v.Spec.Name), zap.Error(err))
	}
}

// ips returns the guest addresses known for a VM.
func (h *Host) ips(id string) []string {
	h.net.mu.Lock()
	defer h.net.mu.Unlock()
	return append([]string(nil), h.net.ips[id]...)
}

// nicViews describes a VM's NICs.
func (h *Host) nicViews(v vm.View) []api.NICView {
	h.net.mu.Lock()
	ifs := h.net.ifaces[v.Spec.UUID]
	h.net.mu.Unlock()
	var out []api.NICView
	for i, n := range v.Spec.NICs {
		nv := api.NICView{Network: n.Network, Type: n.Type, MAC: n.MAC}
		if n.Type != vm.NICUser {
			nv.Link, _ = netdev.LinkName(n.Type, vm.ShortID(v.Spec.UUID), i)
		}
		for _, gi := range ifs {
			if strings.EqualFold(gi.MAC, n.MAC) {
				for _, a := range gi.Addrs {
					nv.IPs = append(nv.IPs, a.Addr().String())
				}
			}
		}
		out = append(out, nv)
	}
	return out
}
