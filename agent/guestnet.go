package agent

import (
	"context"
	"net/netip"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/guestagent"
	"github.com/otherix/otherix-agent/agent/netdev"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// The guest's addresses and the forwards proxy of a bridged VM are
// runtime state of its running QEMU, kept by the engine with it
// (vm.Engine.Attach, SetGuestInterfaces) and dropped when QEMU exits.

// Keys of what the host attaches to a running QEMU.
const (
	attachGuestAgent = "guest-agent" // the poller of the guest agent
	attachProxy      = "proxy"       // the forwards proxy of a bridged VM
)

// closerFunc makes a function an io.Closer.
type closerFunc func()

func (f closerFunc) Close() error { f(); return nil }

// onGuestAgent starts or stops following a VM's guest agent.
func (h *Host) onGuestAgent(v vm.View, up bool) {
	id := v.Spec.UUID
	if old := h.engine.Detach(id, attachGuestAgent); old != nil {
		old.Close()
	}
	if !up {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	if !h.engine.Attach(id, attachGuestAgent, closerFunc(cancel)) {
		cancel() // QEMU is gone, or another poller won
		return
	}
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
		changed, err := h.engine.SetGuestInterfaces(v.Spec.UUID, ifs)
		if err != nil {
			return // the VM is gone
		}
		if changed {
			log.Info("guest addresses", zap.Strings("ip_addresses", vm.GuestIPs(ifs)))
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
func (h *Host) guestIPv4(id string) (netip.Addr, error) {
	v, err := h.engine.GetByUUID(id)
	if err != nil {
		return netip.Addr{}, err
	}
	for _, i := range v.Guest {
		for _, n := range v.Spec.NICs {
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

// proxyOf is the forwards proxy of a VM's running QEMU, or nil.
func (h *Host) proxyOf(id string) *portfwd.Proxy {
	p, _ := h.engine.Attached(id, attachProxy).(*portfwd.Proxy)
	return p
}

// syncNetState follows status changes: a running VM with forwards on a
// bridged NIC gets its proxy (the engine closes it when QEMU exits).
func (h *Host) syncNetState(v vm.View) {
	id := v.Spec.UUID
	running := v.Status == api.StatusRunning || v.Status == api.StatusPaused
	if !running || len(v.Record.Forwards) == 0 || h.proxyOf(id) != nil {
		return
	}
	p := portfwd.NewProxy(func(ctx context.Context) (netip.Addr, error) { return h.guestIPv4(id) }, portfwd.ProxyOptions{Log: h.log.Named("proxy")})
	if !h.engine.Attach(id, attachProxy, p) {
		p.Close() // QEMU is gone, or another status change made it
		return
	}
	if err := p.Add(context.Background(), v.Record.Forwards...); err != nil {
		h.log.Warn("port forwards", zap.String("vm", v.Spec.Name), zap.Error(err))
	}
}

// nicViews describes a VM's NICs.
func (h *Host) nicViews(v vm.View) []api.NICView {
	var out []api.NICView
	for i, n := range v.Spec.NICs {
		nv := api.NICView{Network: n.Network, Type: n.Type, MAC: n.MAC}
		if n.Type != vm.NICUser {
			nv.Link, _ = netdev.LinkName(n.Type, vm.ShortID(v.Spec.UUID), i)
		}
		for _, gi := range v.Guest {
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
