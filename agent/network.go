package agent

import (
	"strconv"
	"strings"

	"github.com/google/uuid"

	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/cloudinit"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// networkNS derives stable network uuids from names.
var networkNS = uuid.MustParse("6f1d2a8e-4c2b-4f6e-9a51-0d7c3e2b9f10")

// NetworkUUID is a configured network's uuid: the configured one, or one
// derived from its name (stable across restarts and hosts).
func NetworkUUID(name string, n config.Network) string {
	if n.UUID != "" {
		return n.UUID
	}
	return uuid.NewSHA1(networkNS, []byte("otherix-network:"+name)).String()
}

// network resolves a network by name or uuid.
func (h *Host) network(ref string) (string, config.Network, error) {
	for name, n := range h.cfg.Networks {
		if ref == name || strings.EqualFold(ref, NetworkUUID(name, n)) {
			return name, n, nil
		}
	}
	return "", config.Network{}, errcode.New(errcode.NetworkNotFound, "network %q not found", ref)
}

// generatedNetworkConfig matches each bridged or macvlan NIC by MAC with
// DHCP, for a create that gives no network-config.
func generatedNetworkConfig(nics []vm.NIC) []byte {
	var ns []cloudinit.NIC
	for i, n := range nics {
		if n.Type == vm.NICBridge || n.Type == vm.NICMACVLAN {
			ns = append(ns, cloudinit.NIC{Name: "eth" + strconv.Itoa(i), MAC: n.MAC})
		}
	}
	if len(ns) == 0 {
		return nil
	}
	return cloudinit.GenerateNetworkConfig(ns)
}
