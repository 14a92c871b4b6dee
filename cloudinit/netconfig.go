package cloudinit

import (
	"fmt"
	"net"
	"regexp"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// netplanV2Devices are the device sections of a netplan v2 document; each
// maps a device id to its definition (netplan(5), "Top-level configuration
// structure").
var netplanV2Devices = map[string]bool{
	"bonds":             true,
	"bridges":           true,
	"dummy-devices":     true,
	"ethernets":         true,
	"modems":            true,
	"nm-devices":        true,
	"tunnels":           true,
	"virtual-ethernets": true,
	"vlans":             true,
	"vrfs":              true,
	"wifis":             true,
}

// networkV1Types are the entry types cloud-init's version 1 parser handles;
// any other type makes it fail (cloudinit/net/network_state.py).
var networkV1Types = map[string]bool{
	"bond":       true,
	"bridge":     true,
	"infiniband": true,
	"nameserver": true,
	"physical":   true,
	"route":      true,
	"vlan":       true,
}

// yaml11Sexagesimal matches what YAML 1.1 reads as a base-60 integer. A MAC
// address made only of digits ("52:54:00:12:34:56") is one, so cloud-init's
// PyYAML turns an unquoted one into a number.
var yaml11Sexagesimal = regexp.MustCompile(`^[-+]?[1-9][0-9_]*(:[0-5]?[0-9])+$`)

// ValidateNetworkConfig checks that b is a cloud-init network-config:
// a YAML mapping, optionally under a top-level "network:" key (cloud-init
// accepts both), holding
//
//   - version: 2 (netplan): only netplan's top-level keys; device sections
//     (ethernets, bonds, bridges, vlans, wifis, ...) map ids to mappings;
//     renderer is a string; a match.macaddress is a MAC address;
//   - version: 1: a config list of mappings, each with a known type;
//   - or config: disabled, which turns cloud-init's networking off.
//
// The document is passed to the guest unchanged. Errors carry
// errcode.ValidationFailed with "line L, column C".
func ValidateNetworkConfig(b []byte) error {
	const what = "network-config"
	if len(b) > MaxNetworkConfig {
		return invalid(what, "%d bytes is over the limit of %d bytes", len(b), MaxNetworkConfig)
	}
	n, err := parseYAML(what, b)
	if err != nil {
		return err
	}
	if n == nil {
		return invalid(what, "empty document")
	}
	if n.Kind != yaml.MappingNode {
		return invalidAt(what, nodePos(n), "must be a YAML mapping, got %s", kindName(n))
	}
	if k, v := lookup(n, "network"); k != nil {
		for _, kv := range mapPairs(n) {
			if kv[0] != k {
				return invalidAt(what, nodePos(kv[0]), "key %q next to network: belongs inside it (check the indentation)", kv[0].Value)
			}
		}
		if v.Kind != yaml.MappingNode {
			return invalidAt(what, nodePos(v), "network must be a mapping, got %s", kindName(v))
		}
		n = v
	}
	if _, v := lookup(n, "config"); v != nil && v.Kind == yaml.ScalarNode && v.Value == "disabled" {
		return nil
	}
	vk, v := lookup(n, "version")
	if vk == nil {
		return invalidAt(what, nodePos(n), "has no version (2 for netplan, or 1)")
	}
	switch {
	case v.Kind == yaml.ScalarNode && v.ShortTag() == "!!int" && v.Value == "2":
		return checkNetplanV2(what, n)
	case v.Kind == yaml.ScalarNode && v.ShortTag() == "!!int" && v.Value == "1":
		return checkNetworkV1(what, n)
	}
	return invalidAt(what, nodePos(v), "version must be 2 (netplan) or 1")
}

func checkNetplanV2(what string, n *yaml.Node) error {
	for _, kv := range mapPairs(n) {
		k, v := kv[0], kv[1]
		switch {
		case k.Value == "version":
		case k.Value == "renderer":
			if v.Kind != yaml.ScalarNode || v.ShortTag() != "!!str" {
				return invalidAt(what, nodePos(v), "renderer must be a string (networkd or NetworkManager), got %s", kindName(v))
			}
		case netplanV2Devices[k.Value]:
			if err := checkDevices(what, k.Value, v); err != nil {
				return err
			}
		default:
			return invalidAt(what, nodePos(k), "unknown netplan key %q; expected version, renderer or %s",
				k.Value, strings.Join(sortedKeys(netplanV2Devices), ", "))
		}
	}
	return nil
}

func checkDevices(what, section string, v *yaml.Node) error {
	if v.Kind != yaml.MappingNode {
		return invalidAt(what, nodePos(v), "%s must be a mapping of device ids to settings, got %s", section, kindName(v))
	}
	for _, kv := range mapPairs(v) {
		id, dev := kv[0], kv[1]
		if dev.Kind != yaml.MappingNode {
			return invalidAt(what, nodePos(dev), "%s.%s must be a mapping, got %s", section, id.Value, kindName(dev))
		}
		_, m := lookup(dev, "match")
		if m == nil {
			continue
		}
		if m.Kind != yaml.MappingNode {
			return invalidAt(what, nodePos(m), "%s.%s.match must be a mapping, got %s", section, id.Value, kindName(m))
		}
		if _, mac := lookup(m, "macaddress"); mac != nil {
			if err := checkMAC(what, mac); err != nil {
				return err
			}
		}
	}
	return nil
}

func checkMAC(what string, n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return invalidAt(what, nodePos(n), "macaddress must be a string, got %s", kindName(n))
	}
	hw, err := net.ParseMAC(n.Value)
	if err != nil || (len(hw) != 6 && len(hw) != 20) {
		return invalidAt(what, nodePos(n), "macaddress %q is not a MAC address", n.Value)
	}
	if n.Style == 0 && yaml11Sexagesimal.MatchString(n.Value) {
		return invalidAt(what, nodePos(n), "quote macaddress %q: cloud-init's YAML 1.1 parser reads it as a base-60 number", n.Value)
	}
	return nil
}

func checkNetworkV1(what string, n *yaml.Node) error {
	ck, cfg := lookup(n, "config")
	if ck == nil {
		return invalidAt(what, nodePos(n), "version 1 needs a config list")
	}
	if cfg.Kind != yaml.SequenceNode {
		return invalidAt(what, nodePos(cfg), "config must be a list, got %s", kindName(cfg))
	}
	for i, item := range cfg.Content {
		item = deref(item)
		if item.Kind != yaml.MappingNode {
			return invalidAt(what, nodePos(item), "config entry %d must be a mapping, got %s", i+1, kindName(item))
		}
		tk, t := lookup(item, "type")
		if tk == nil {
			return invalidAt(what, nodePos(item), "config entry %d has no type", i+1)
		}
		if t.Kind != yaml.ScalarNode || !networkV1Types[t.Value] {
			return invalidAt(what, nodePos(t), "config entry %d: type must be one of %s", i+1, strings.Join(sortedKeys(networkV1Types), ", "))
		}
	}
	return nil
}

func sortedKeys(m map[string]bool) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// NIC is one network interface of a VM, as GenerateNetworkConfig sees it.
type NIC struct {
	Name string // interface name to set in the guest, e.g. "eth0"; "" keeps the guest's name
	MAC  string // MAC address QEMU gives the NIC, e.g. "52:54:00:12:34:56"
}

// GenerateNetworkConfig returns a netplan version 2 network-config that
// matches each NIC by MAC address, names it (set-name) and configures it by
// DHCPv4 (dhcp6 off; router advertisements still work). Output is
// deterministic: NICs in the order given, two-space indentation, MACs
// lower-cased and double-quoted (an all-digit MAC is a number to YAML 1.1).
//
// The document has no top-level "network:" key: every cloud-init version
// reads that form. Each NIC's id is its Name; a NIC without a usable Name
// (empty, over 15 bytes, with '/', ':' or whitespace, or repeating an
// earlier one) gets no set-name, so it keeps the guest's interface name,
// and the id "nic<index>". The caller supplies valid MACs; the result of
// an invalid one fails ValidateNetworkConfig.
func GenerateNetworkConfig(nics []NIC) []byte {
	str := func(v string) *yaml.Node { return &yaml.Node{Kind: yaml.ScalarNode, Value: v} }
	quoted := func(v string) *yaml.Node {
		return &yaml.Node{Kind: yaml.ScalarNode, Style: yaml.DoubleQuotedStyle, Value: v}
	}
	boolean := func(v bool) *yaml.Node {
		return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!bool", Value: fmt.Sprint(v)}
	}
	mapping := func(kv ...*yaml.Node) *yaml.Node { return &yaml.Node{Kind: yaml.MappingNode, Content: kv} }

	root := mapping(str("version"), &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!int", Value: "2"})
	if len(nics) == 0 {
		return encodeYAML(root)
	}
	eths := mapping()
	ids, names := map[string]bool{}, map[string]bool{}
	for i, nic := range nics {
		mac := strings.ToLower(nic.MAC)
		if hw, err := net.ParseMAC(nic.MAC); err == nil {
			mac = hw.String()
		}
		dev := mapping(str("match"), mapping(str("macaddress"), quoted(mac)))
		name := nic.Name
		if validIfName(name) && !names[name] {
			names[name] = true
			dev.Content = append(dev.Content, str("set-name"), quoted(name))
		} else {
			name = ""
		}
		id := name
		if id == "" || ids[id] {
			base := fmt.Sprintf("nic%d", i)
			id = base
			for k := 1; ids[id]; k++ {
				id = fmt.Sprintf("%s-%d", base, k)
			}
		}
		ids[id] = true
		dev.Content = append(dev.Content, str("dhcp4"), boolean(true), str("dhcp6"), boolean(false))
		eths.Content = append(eths.Content, quoted(id), dev)
	}
	root.Content = append(root.Content, str("ethernets"), eths)
	return encodeYAML(root)
}

// validIfName reports whether s is a Linux interface name (IFNAMSIZ-1
// bytes, no '/', ':' or whitespace, not "." or "..").
func validIfName(s string) bool {
	if s == "" || len(s) > 15 || s == "." || s == ".." {
		return false
	}
	for _, r := range s {
		if r <= ' ' || r == '/' || r == ':' || r == 0x7f || r > '~' {
			return false
		}
	}
	return true
}
