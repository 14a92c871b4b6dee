// Package portfwd forwards host ports to ports of a guest.
//
// A SLIRP (user-mode) NIC forwards inside QEMU: [HostFwdOptions] gives the
// `hostfwd=` options of its -netdev at start, and [AddHostFwd] /
// [RemoveHostFwd] change them at run time through HMP (QEMU 7.2 has no QMP
// command for it), with QEMU's text answer parsed into an error.
//
// A bridged or macvlan NIC has a real address on the host's network: a
// [Proxy] in the agent listens on the host port and relays to the guest's
// address (TCP: both directions spliced, half-close passed on; UDP: a
// session per peer that ends after an idle timeout).
//
// Either way a host port in use, by anything, gives errcode.PortInUse and
// nothing set up; a bad rule gives errcode.ValidationFailed.
package portfwd

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Protocols.
const (
	TCP = "tcp"
	UDP = "udp"
)

// Rule forwards HostAddr:HostPort on the host to GuestPort in the guest.
type Rule struct {
	// Proto is the source protocol, "tcp" or "udp" (any case).
	Proto string `json:"source_proto"`
	// DestProto is the destination protocol; empty means Proto. It must
	// equal Proto: the agent does not translate TCP to UDP.
	DestProto string `json:"dest_proto,omitempty"`
	// HostAddr is the IP literal to listen on; empty means every IPv4
	// address (0.0.0.0).
	HostAddr  string `json:"host_addr,omitempty"`
	HostPort  int    `json:"source_port"`
	GuestPort int    `json:"dest_port"`
}

// String is "tcp 0.0.0.0:8080->80".
func (r Rule) String() string {
	return fmt.Sprintf("%s %s->%d", r.Proto, r.hostAddrPort(), r.GuestPort)
}

func (r Rule) hostIP() string {
	if r.HostAddr == "" {
		return "0.0.0.0"
	}
	return r.HostAddr
}

func (r Rule) hostAddrPort() string {
	return netip.AddrPortFrom(netip.MustParseAddr(r.hostIP()), uint16(r.HostPort)).String()
}

// Normalize checks r and returns it in canonical form: protocols in lower
// case, DestProto filled in, HostAddr a canonical IP literal (or empty).
func (r Rule) Normalize() (Rule, error) {
	r.Proto = strings.ToLower(r.Proto)
	r.DestProto = strings.ToLower(r.DestProto)
	if r.Proto != TCP && r.Proto != UDP {
		return Rule{}, errcode.New(errcode.ValidationFailed, "source_proto %q: use tcp or udp", r.Proto)
	}
	if r.DestProto == "" {
		r.DestProto = r.Proto
	}
	if r.DestProto != TCP && r.DestProto != UDP {
		return Rule{}, errcode.New(errcode.ValidationFailed, "dest_proto %q: use tcp or udp", r.DestProto)
	}
	if r.DestProto != r.Proto {
		return Rule{}, errcode.New(errcode.ValidationFailed, "source_proto %s and dest_proto %s differ: a forward keeps its protocol", r.Proto, r.DestProto)
	}
	if r.HostPort < 1 || r.HostPort > 65535 {
		return Rule{}, errcode.New(errcode.ValidationFailed, "source_port %d out of range 1..65535", r.HostPort)
	}
	if r.GuestPort < 1 || r.GuestPort > 65535 {
		return Rule{}, errcode.New(errcode.ValidationFailed, "dest_port %d out of range 1..65535", r.GuestPort)
	}
	if r.HostAddr != "" {
		a, err := netip.ParseAddr(r.HostAddr)
		if err != nil || a.Zone() != "" {
			return Rule{}, errcode.New(errcode.ValidationFailed, "host_addr %q is not an IP address", r.HostAddr)
		}
		if a.Is4In6() {
			a = a.Unmap()
		}
		r.HostAddr = a.String()
		if r.HostAddr == "0.0.0.0" {
			r.HostAddr = ""
		}
	}
	return r, nil
}

// overlaps reports whether a and b (normalized) would listen on the same
// host socket: same protocol and port, and the same address or one of
// them the wildcard of its family (0.0.0.0 also takes IPv4 addresses; :: is
// taken to overlap everything, as with Linux's default bindv6only=0).
func overlaps(a, b Rule) bool {
	if a.Proto != b.Proto || a.HostPort != b.HostPort {
		return false
	}
	aa, ba := netip.MustParseAddr(a.hostIP()), netip.MustParseAddr(b.hostIP())
	if aa == ba || aa.IsUnspecified() && aa.Is6() || ba.IsUnspecified() && ba.Is6() {
		return true
	}
	if aa.Is4() && ba.Is4() && (aa.IsUnspecified() || ba.IsUnspecified()) {
		return true
	}
	return false
}

// Validate normalizes rules and checks that no two of them (nor one of
// them and one of existing, already normalized, e.g. the VM's current
// forwards) listen on the same host port: errcode.ValidationFailed.
func Validate(existing, rules []Rule) ([]Rule, error) {
	out := make([]Rule, 0, len(rules))
	for i, r := range rules {
		n, err := r.Normalize()
		if err != nil {
			return nil, errcode.Wrap(errcode.ValidationFailed, err, "forward %d", i)
		}
		for _, o := range slices.Concat(existing, out) {
			if overlaps(n, o) {
				return nil, errcode.New(errcode.ValidationFailed, "forward %d (%s) and %s use the same host port", i, n, o)
			}
		}
		out = append(out, n)
	}
	return out, nil
}

// HostFwd is the SLIRP hostfwd rule text of r (normalized):
// "tcp:ADDR:HPORT-:GPORT". An IPv6 host address cannot be written there in
// QEMU 7.2: it gives errcode.ValidationFailed.
func HostFwd(r Rule) (string, error) {
	if a := netip.MustParseAddr(r.hostIP()); !a.Is4() {
		return "", errcode.New(errcode.ValidationFailed, "forward %s: a user-mode NIC forwards only IPv4 host addresses", r)
	}
	return r.Proto + ":" + r.HostAddr + ":" + strconv.Itoa(r.HostPort) + "-:" + strconv.Itoa(r.GuestPort), nil
}

// HostFwdOptions returns the "hostfwd=..." options of a user netdev for
// rules (validated with Validate), to join with commas after
// "user,id=net0".
func HostFwdOptions(rules []Rule) ([]string, error) {
	var out []string
	for _, r := range rules {
		s, err := HostFwd(r)
		if err != nil {
			return nil, err
		}
		out = append(out, "hostfwd="+s)
	}
	return out, nil
}
