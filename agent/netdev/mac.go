package netdev

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net"
	"strings"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// MACPrefix is the OUI of generated MACs: QEMU's 52:54:00, whose first
// byte has the locally administered bit set and the multicast bit clear.
const MACPrefix = "52:54:00"

// GenerateMAC derives a MAC under [MACPrefix] from the VM's uuid and the
// NIC's index: the same inputs always give the same MAC, different ones a
// different MAC unless the 24-bit hashes collide (which [AssignMAC]
// resolves).
func GenerateMAC(uuid string, index int) string {
	return generateMAC(uuid, index, 0)
}

// generateMAC is GenerateMAC with a retry counter mixed into the hash;
// round 0 is GenerateMAC.
func generateMAC(uuid string, index, round int) string {
	h := sha256.New()
	fmt.Fprintf(h, "otherix-mac\x00%s\x00%d", strings.ToLower(uuid), index)
	if round > 0 {
		fmt.Fprintf(h, "\x00%d", round)
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return fmt.Sprintf("%s:%02x:%02x:%02x", MACPrefix, sum[0], sum[1], sum[2])
}

// NormalizeMAC parses a unicast Ethernet MAC written as six pairs of hex
// digits separated by colons (or dashes), in any case, and returns it in
// lowercase with colons. Malformed, multicast (including broadcast) and
// all-zero addresses give errcode.ValidationFailed.
func NormalizeMAC(s string) (string, error) {
	hw, err := net.ParseMAC(s)
	if err != nil || len(hw) != 6 || len(s) != 17 {
		return "", errcode.New(errcode.ValidationFailed, "mac %q is not a MAC address: write six pairs of hex digits separated by colons", s)
	}
	if hw[0]&1 != 0 {
		return "", errcode.New(errcode.ValidationFailed, "mac %q is a multicast address: a NIC needs a unicast one", s)
	}
	if binary.BigEndian.Uint32(hw[0:4])|uint32(binary.BigEndian.Uint16(hw[4:6])) == 0 {
		return "", errcode.New(errcode.ValidationFailed, "mac %q is all zeros", s)
	}
	return hw.String(), nil
}

// ValidateMAC checks s with [NormalizeMAC].
func ValidateMAC(s string) error {
	_, err := NormalizeMAC(s)
	return err
}

// hostSideMAC is the MAC of the host end of a tap: the guest's with the
// first byte 0xfe, so that a bridge, which takes the lowest MAC of its
// ports, does not change its own MAC as taps come and go.
func hostSideMAC(guest net.HardwareAddr) net.HardwareAddr {
	hw := append(net.HardwareAddr(nil), guest...)
	hw[0] = 0xfe
	return hw
}

// Holder says which NIC holds a MAC (normalized): the owner (a VM's
// uuid) and the NIC's index, ok false when none does. The engine answers
// it from its VMs' specs and the creates in progress.
type Holder func(mac string) (owner string, index int, ok bool)

// maxRounds bounds the search for a free generated MAC.
const maxRounds = 64

// AssignMAC picks the MAC of NIC index of owner, given held (which NIC
// holds a MAC now), and returns it normalized; it records nothing. With
// mac empty, the MAC is generated ([GenerateMAC]; if another NIC holds
// that one, further hash rounds, so the result is still stable for a
// given set of VMs). A given mac must be valid ([NormalizeMAC]); one held
// by another NIC gives errcode.Conflict. A MAC the same NIC already
// holds is its own.
func AssignMAC(owner string, index int, mac string, held Holder) (string, error) {
	free := func(m string) bool {
		o, i, ok := held(m)
		return !ok || (o == owner && i == index)
	}
	if mac != "" {
		m, err := NormalizeMAC(mac)
		if err != nil {
			return "", err
		}
		if !free(m) {
			o, i, _ := held(m)
			return "", errcode.New(errcode.Conflict, "mac %s is already used by nic %d of vm %s", m, i, o)
		}
		return m, nil
	}
	for round := 0; round < maxRounds; round++ {
		if m := generateMAC(owner, index, round); free(m) {
			return m, nil
		}
	}
	return "", errcode.New(errcode.Conflict, "no free mac for nic %d of vm %s after %d tries", index, owner, maxRounds)
}
