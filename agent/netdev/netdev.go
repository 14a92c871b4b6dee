// Package netdev creates and removes the per-VM network devices of bridged
// and macvlan NICs, and gives QEMU their file descriptors.
//
// Networks are host configuration: the agent never creates a bridge or
// touches a parent interface. For each NIC it makes one link:
//
//   - bridge: a tap (netlink Tuntap, NO_PI|VNET_HDR, not persistent) made
//     a port of the bridge and set up;
//   - macvlan: a macvtap link in mode bridge on the parent, whose MAC is the
//     guest NIC's, and its character device /dev/tap<ifindex> opened.
//
// Either way [Create] returns an open file that QEMU gets through
// exec.Cmd.ExtraFiles and `-netdev tap,fd=N,vhost=off` ([QEMUArgs]), so QEMU
// needs no CAP_NET_ADMIN and opens nothing itself.
//
// # File descriptor ownership
//
// [Attached.File] is the agent's copy of the descriptor. Put it in
// ExtraFiles, start QEMU, then Close it whether the start worked or not
// ([Attached.Close]): from then on QEMU holds the only copy.
//
//   - A tap is not persistent: it exists while some process holds it open.
//     It disappears when QEMU exits (quit, crash or kill -9), or when the
//     agent closes its copy and QEMU never started. Nothing to delete.
//   - A macvtap link outlives every descriptor: [Delete] it when the VM
//     stops, and [Sweep] at agent start-up removes those no VM owns.
//
// # Names
//
// Link names derive from the VM's short id (the first 12 hex digits of its
// uuid), never from its name: "oxt" (tap) or "oxm" (macvtap), the short
// id's first 10 digits, the NIC index: oxt52a3f01c9d0 is NIC 0 of VM
// 52a3f01c-9d…; at most 15 characters (IFNAMSIZ-1).
//
// # Network namespaces
//
// Links are made in the network namespace of the calling OS thread (the
// agent's). Tests that work in another one call Create, Delete and Sweep
// from a thread locked into it; QEMU itself may run anywhere, since the
// descriptor carries the link.
package netdev

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// NIC types.
const (
	TypeBridge  = "bridge"
	TypeMACVLAN = "macvlan"
)

// Link name prefixes; every link this package makes starts with one.
const (
	TapPrefix     = "oxt"
	MacvtapPrefix = "oxm"
)

// MaxNICs bounds a NIC index (0..MaxNICs-1): two digits in a link name.
const MaxNICs = 32

// NICRequest asks for the host side of one NIC.
type NICRequest struct {
	Index  int    // the NIC's index in the VM, 0..MaxNICs-1
	Type   string // TypeBridge or TypeMACVLAN
	Bridge string // TypeBridge: the host bridge to join
	Parent string // TypeMACVLAN: the host interface to stack on
	MAC    string // the guest NIC's MAC (required: see Registry.Assign)
}

// Attached is a NIC's host link, made by Create.
type Attached struct {
	Index int
	Type  string
	Name  string // the link: oxt… or oxm…
	MAC   string // the guest NIC's MAC, normalized
	// File is the agent's copy of the tap's descriptor: pass it to QEMU
	// (exec.Cmd.ExtraFiles), then Close it (see the package doc).
	File *os.File
}

// Close closes the agent's copy of the descriptor. It is safe to call
// more than once.
func (a *Attached) Close() error {
	if a == nil || a.File == nil {
		return nil
	}
	f := a.File
	a.File = nil
	return f.Close()
}

var shortIDRE = regexp.MustCompile(`^[0-9a-f]{12}$`)

// LinkName returns the name of NIC index's link of the VM with shortID
// for a NIC type.
func LinkName(nicType, shortID string, index int) (string, error) {
	if !shortIDRE.MatchString(shortID) {
		return "", errcode.New(errcode.ValidationFailed, "short id %q is not 12 lowercase hex digits", shortID)
	}
	if index < 0 || index >= MaxNICs {
		return "", errcode.New(errcode.ValidationFailed, "nic index %d out of range 0..%d", index, MaxNICs-1)
	}
	var prefix string
	switch nicType {
	case TypeBridge:
		prefix = TapPrefix
	case TypeMACVLAN:
		prefix = MacvtapPrefix
	default:
		return "", errcode.New(errcode.ValidationFailed, "nic type %q is not supported: use bridge or macvlan", nicType)
	}
	return prefix + shortID[:10] + strconv.Itoa(index), nil
}

// validIfname reports whether s is a name Linux accepts for a link.
func validIfname(s string) bool {
	if s == "" || len(s) >= unix.IFNAMSIZ || s == "." || s == ".." {
		return false
	}
	return !strings.ContainsAny(s, "/: \t\n\x00")
}

// Create makes the host link of one NIC and returns it with the open
// descriptor for QEMU. It is undo-safe: on error nothing is left (a tap
// goes with its descriptor; a half-made macvtap is deleted).
//
// Errors: a bad request gives errcode.ValidationFailed; a missing bridge or
// parent, or a bridge that is not one, errcode.NetworkUnavailable; a link
// of the same name already there errcode.Conflict (a stale macvtap: Delete
// or Sweep it first).
func Create(ctx context.Context, shortID string, req NICRequest) (*Attached, error) {
	if err := ctx.Err(); err != nil {
		return nil, errcode.Wrap(errcode.Cancelled, err, "create nic %d", req.Index)
	}
	name, err := LinkName(req.Type, shortID, req.Index)
	if err != nil {
		return nil, err
	}
	mac, err := NormalizeMAC(req.MAC)
	if err != nil {
		return nil, err
	}
	hw, _ := net.ParseMAC(mac)
	if _, err := netlink.LinkByName(name); err == nil {
		return nil, errcode.New(errcode.Conflict, "link %s already exists", name)
	} else if !isNotFound(err) {
		return nil, errcode.Wrap(errcode.Internal, err, "look up link %s", name)
	}
	a := &Attached{Index: req.Index, Type: req.Type, Name: name, MAC: mac}
	switch req.Type {
	case TypeBridge:
		if !validIfname(req.Bridge) {
			return nil, errcode.New(errcode.ValidationFailed, "bridge %q is not an interface name", req.Bridge)
		}
		a.File, err = createTap(name, req.Bridge, hw)
	case TypeMACVLAN:
		if !validIfname(req.Parent) {
			return nil, errcode.New(errcode.ValidationFailed, "parent %q is not an interface name", req.Parent)
		}
		a.File, err = createMacvtap(name, req.Parent, hw)
	}
	if err != nil {
		return nil, err
	}
	return a, nil
}

func createTap(name, bridge string, guestMAC net.HardwareAddr) (*os.File, error) {
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		if isNotFound(err) {
			return nil, errcode.New(errcode.NetworkUnavailable, "bridge %s does not exist on this host", bridge)
		}
		return nil, errcode.Wrap(errcode.NetworkUnavailable, err, "look up bridge %s", bridge)
	}
	if _, ok := br.(*netlink.Bridge); !ok {
		return nil, errcode.New(errcode.NetworkUnavailable, "%s is a %s, not a bridge", bridge, br.Type())
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	tap := &netlink.Tuntap{
		LinkAttrs: attrs,
		Mode:      netlink.TUNTAP_MODE_TAP,
		// TUN_EXCL: never attach to an existing device of that name.
		Flags:      netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_TUN_EXCL,
		NonPersist: true,
		Queues:     1, // keep the descriptor (Queues 0 closes it at once)
	}
	if err := netlink.LinkAdd(tap); err != nil {
		if errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EEXIST) {
			return nil, errcode.Wrap(errcode.Conflict, err, "create tap %s", name)
		}
		return nil, errcode.Wrap(errcode.Internal, err, "create tap %s", name)
	}
	if len(tap.Fds) != 1 {
		for _, f := range tap.Fds {
			f.Close()
		}
		return nil, errcode.New(errcode.Internal, "create tap %s: got %d descriptors, want 1", name, len(tap.Fds))
	}
	f := tap.Fds[0]
	// From here, closing f removes the tap.
	fail := func(err error, format string, args ...any) (*os.File, error) {
		f.Close()
		return nil, errcode.Wrap(errcode.Internal, err, format, args...)
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return fail(err, "look up tap %s", name)
	}
	if err := netlink.LinkSetHardwareAddr(link, hostSideMAC(guestMAC)); err != nil {
		return fail(err, "set mac of tap %s", name)
	}
	if br.Attrs().MTU > 0 && br.Attrs().MTU != link.Attrs().MTU {
		if err := netlink.LinkSetMTU(link, br.Attrs().MTU); err != nil {
			return fail(err, "set mtu of tap %s", name)
		}
	}
	if err := netlink.LinkSetMasterByIndex(link, br.Attrs().Index); err != nil {
		if isNotFound(err) {
			f.Close()
			return nil, errcode.Wrap(errcode.NetworkUnavailable, err, "bridge %s went away", bridge)
		}
		return fail(err, "add tap %s to bridge %s", name, bridge)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fail(err, "set tap %s up", name)
	}
	return f, nil
}

func createMacvtap(name, parent string, guestMAC net.HardwareAddr) (_ *os.File, err error) {
	p, err := netlink.LinkByName(parent)
	if err != nil {
		if isNotFound(err) {
			return nil, errcode.New(errcode.NetworkUnavailable, "parent interface %s does not exist on this host", parent)
		}
		return nil, errcode.Wrap(errcode.NetworkUnavailable, err, "look up parent interface %s", parent)
	}
	// NewLinkAttrs, never a zero LinkAttrs: a zero TxQLen would be sent as
	// IFLA_TXQLEN 0 and the macvtap would drop every frame.
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	attrs.ParentIndex = p.Attrs().Index
	attrs.HardwareAddr = guestMAC
	mv := &netlink.Macvtap{Macvlan: netlink.Macvlan{LinkAttrs: attrs, Mode: netlink.MACVLAN_MODE_BRIDGE}}
	if err := netlink.LinkAdd(mv); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return nil, errcode.Wrap(errcode.Conflict, err, "create macvtap %s", name)
		}
		if errors.Is(err, unix.EADDRINUSE) {
			return nil, errcode.Wrap(errcode.Conflict, err, "create macvtap %s on %s: mac %s is in use there", name, parent, guestMAC)
		}
		return nil, errcode.Wrap(errcode.NetworkUnavailable, err, "create macvtap %s on %s", name, parent)
	}
	defer func() {
		if err != nil {
			_ = netlink.LinkDel(mv)
		}
	}()
	link, err := netlink.LinkByName(name)
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "look up macvtap %s", name)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		// The kernel checks the MAC against the parent's other macvlans
		// when the link goes up.
		if errors.Is(err, unix.EADDRINUSE) {
			return nil, errcode.Wrap(errcode.Conflict, err, "macvtap %s on %s: mac %s is in use there", name, parent, guestMAC)
		}
		return nil, errcode.Wrap(errcode.Internal, err, "set macvtap %s up", name)
	}
	return openMacvtap(name, link.Attrs().Index)
}

// openMacvtap opens the macvtap's character device, /dev/tap<ifindex>
// (devtmpfs makes it as the link registers), with the vnet header on, and
// checks that the device is the link's.
func openMacvtap(name string, ifindex int) (*os.File, error) {
	path := "/dev/tap" + strconv.Itoa(ifindex)
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "open %s for macvtap %s", path, name)
	}
	ifr, err := unix.NewIfreq("")
	if err == nil {
		err = unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr)
	}
	if err != nil {
		unix.Close(fd)
		return nil, errcode.Wrap(errcode.Internal, err, "%s: TUNGETIFF", path)
	}
	if got := ifr.Name(); got != name {
		unix.Close(fd)
		return nil, errcode.New(errcode.Internal, "%s belongs to link %q, not %s", path, got, name)
	}
	// A macvtap takes only IFF_TAP|IFF_NO_PI plus feature flags.
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, errcode.Wrap(errcode.Internal, err, "%s: set vnet header", path)
	}
	return os.NewFile(uintptr(fd), path), nil
}

// Delete removes a link this package made (a name with TapPrefix or
// MacvtapPrefix). A link already gone is no error; any other name gives
// errcode.ValidationFailed, so that a bug never deletes a host interface.
func Delete(name string) error {
	if !ours(name) {
		return errcode.New(errcode.ValidationFailed, "link %q is not an otherix link", name)
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		if isNotFound(err) {
			return nil
		}
		return errcode.Wrap(errcode.Internal, err, "look up link %s", name)
	}
	if err := netlink.LinkDel(link); err != nil && !isNotFound(err) && !errors.Is(err, unix.ENODEV) {
		return errcode.Wrap(errcode.Internal, err, "delete link %s", name)
	}
	return nil
}

// Sweep deletes every link this package made whose name is not in keep
// (the links of the VMs that run), and returns the names deleted. Call it
// at agent start-up, after re-adopting the running VMs: it removes the
// macvtaps of VMs that stopped while the agent was down, and any tap left
// over by a half-made start.
func Sweep(keep map[string]bool) ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "list links")
	}
	var deleted []string
	var errs []error
	for _, l := range links {
		name := l.Attrs().Name
		if !ours(name) || keep[name] {
			continue
		}
		if err := netlink.LinkDel(l); err != nil && !isNotFound(err) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete link %s: %w", name, err))
			continue
		}
		deleted = append(deleted, name)
	}
	if len(errs) > 0 {
		return deleted, errcode.Wrap(errcode.Internal, errors.Join(errs...), "sweep links")
	}
	return deleted, nil
}

// ours reports whether name has the form of a link this package makes.
func ours(name string) bool {
	var rest string
	switch {
	case strings.HasPrefix(name, TapPrefix):
		rest = name[len(TapPrefix):]
	case strings.HasPrefix(name, MacvtapPrefix):
		rest = name[len(MacvtapPrefix):]
	default:
		return false
	}
	if len(rest) < 11 || len(rest) > 12 {
		return false
	}
	for i, r := range rest {
		hex := r >= '0' && r <= '9' || r >= 'a' && r <= 'f'
		if i >= 10 && (r < '0' || r > '9') || !hex {
			return false
		}
	}
	return true
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

// QEMUArgs returns the -netdev and -device arguments of NIC index for the
// descriptor a (tap or macvtap) that QEMU sees as fdNum (3 + its position
// in ExtraFiles): ids net<index> and net<index>-dev, vhost off, no option
// ROM, and, when pciAddr is set, the device at that address of pcie.0.
func QEMUArgs(index int, a *Attached, fdNum int, pciAddr string) []string {
	id := "net" + strconv.Itoa(index)
	dev := "virtio-net-pci,id=" + id + "-dev,netdev=" + id + ",mac=" + a.MAC + ",romfile="
	if pciAddr != "" {
		dev += ",bus=pcie.0,addr=" + pciAddr
	}
	return []string{
		"-netdev", "tap,id=" + id + ",fd=" + strconv.Itoa(fdNum) + ",vhost=off",
		"-device", dev,
	}
}
