// Package vnc gives a VM a VNC console (seed 000: vnc_enabled, vnc_port,
// vnc_password): QEMU's options, the port, the password and screenshots.
//
// # The password never reaches the command line
//
// QEMU starts with `-vnc <listen>:<display>,password=on` and no password:
// until one is set every login fails ("Authentication failed"), the safe
// default. Once QMP is up the engine calls [SetPassword], which sends
// set_password over QMP; QEMU keeps the password in memory only, so it is
// set again on every start. It is never on QEMU's argv (ps,
// /proc/<pid>/cmdline), in its environment, or in a log: this package logs
// nothing and its errors never quote it.
//
// VNC authentication is DES keyed by the password: only 8 bytes count and
// QEMU silently drops the rest. A longer password is refused
// (validation_failed) rather than cut. The protocol itself is weak (a
// challenge anyone on the path can attack offline, no encryption): listen
// on loopback or a management network.
//
// # Ports
//
// QEMU's -vnc takes a display number N and listens on 5900+N, so a port
// below 5900 cannot be had (validation_failed). A null vnc_port means the
// next free port from 5900: [PickPort] binds each candidate to be sure,
// and the engine keeps two VMs of this agent from picking the same one
// before their QEMUs bind it ([PickFree]). A process outside the agent
// can still take the port, between the pick and QEMU's bind or before a
// later start; QEMU then exits with "Failed to find an available port:
// Address already in use", and the engine, finding the port bound once
// QEMU is gone ([CheckPort]), reports port_in_use.
//
// # Display device
//
// With -nodefaults a VM has no display adapter and VNC would show nothing:
// [DisplayArgs] adds one (VGA on amd64, virtio-gpu-pci on arm64).
package vnc

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// Limits.
const (
	BasePort       = 5900  // port of display 0
	MaxPort        = 65535 // port of display 59635
	MaxPasswordLen = 8     // bytes VNC authentication (DES) uses
)

// ExecFunc runs a QMP command (with its arguments, nil for none) and
// returns its error: (*qmp.Client).Execute with a nil result fits as
//
//	func(ctx context.Context, cmd string, args any) error { return c.Execute(ctx, cmd, args, nil) }
type ExecFunc func(ctx context.Context, cmd string, args any) error

// Validate checks seed 000's VNC fields. An enabled console needs a
// password: the display gives whoever reaches the port the VM's console.
// Set while disabled, port and password are still checked.
func Validate(enabled bool, port *int, password string) error {
	if port != nil {
		if err := checkPort(*port); err != nil {
			return err
		}
	}
	if password != "" {
		if err := checkPassword(password); err != nil {
			return err
		}
	}
	if enabled && password == "" {
		return errcode.New(errcode.ValidationFailed, "vnc_password is required when vnc_enabled is true: without one anyone reaching the port gets the VM's console")
	}
	return nil
}

func checkPort(port int) error {
	if port < BasePort || port > MaxPort {
		return errcode.New(errcode.ValidationFailed, "vnc_port %d is out of range: QEMU listens on 5900 plus a display number, so use %d to %d", port, BasePort, MaxPort)
	}
	return nil
}

func checkPassword(pw string) error {
	if len(pw) > MaxPasswordLen {
		return errcode.New(errcode.ValidationFailed, "vnc_password is %d bytes long: VNC authentication (DES) uses at most %d, and QEMU would silently ignore the rest", len(pw), MaxPasswordLen)
	}
	if strings.ContainsFunc(pw, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return errcode.New(errcode.ValidationFailed, "vnc_password holds a control character")
	}
	return nil
}

// listenHost checks a listen address (an IP literal) and writes it as
// QEMU's -vnc wants it: IPv6 in brackets.
func listenHost(listen string) (string, error) {
	a, err := netip.ParseAddr(listen)
	if err != nil || a.Zone() != "" {
		return "", errcode.New(errcode.ValidationFailed, "vnc listen address %q is not an IP address", listen)
	}
	if a.Is6() && !a.Is4In6() {
		return "[" + a.String() + "]", nil
	}
	return a.Unmap().String(), nil
}

// Args returns QEMU's VNC option for a console on listen:port, with
// password authentication on and no password yet:
//
//	-vnc 127.0.0.1:3,password=on       (port 5903)
func Args(listen string, port int) ([]string, error) {
	host, err := listenHost(listen)
	if err != nil {
		return nil, err
	}
	if err := checkPort(port); err != nil {
		return nil, err
	}
	return []string{"-vnc", host + ":" + strconv.Itoa(port-BasePort) + ",password=on"}, nil
}

// DisplayID is the QEMU id of the display adapter DisplayArgs adds.
const DisplayID = "video0"

// DisplayArgs returns the display adapter a VNC console needs under
// -nodefaults, on pcie.0 at slot (q35 puts its VGA at 0x1):
//
//	-device VGA,id=video0,bus=pcie.0,addr=0x1            (amd64)
//	-device virtio-gpu-pci,id=video0,bus=pcie.0,addr=0x1 (arm64: no legacy VGA on virt)
func DisplayArgs(arch string, slot int) ([]string, error) {
	var dev string
	switch arch {
	case "amd64":
		dev = "VGA"
	case "arm64":
		dev = "virtio-gpu-pci"
	default:
		return nil, errcode.New(errcode.ValidationFailed, "vnc: arch %q is not supported", arch)
	}
	if slot < 1 || slot > 0x1f {
		return nil, errcode.New(errcode.ValidationFailed, "vnc: display slot %#x is out of range", slot)
	}
	return []string{"-device", fmt.Sprintf("%s,id=%s,bus=pcie.0,addr=0x%x", dev, DisplayID, slot)}, nil
}

// SetPassword sets the VNC password of a running QEMU over QMP
// (set_password, protocol vnc). Call it on every start, once QMP is up.
func SetPassword(ctx context.Context, exec ExecFunc, password string) error {
	if password == "" {
		return errcode.New(errcode.ValidationFailed, "vnc password is empty")
	}
	if err := checkPassword(password); err != nil {
		return err
	}
	if err := exec(ctx, "set_password", map[string]string{"protocol": "vnc", "password": password}); err != nil {
		return fmt.Errorf("vnc: set_password: %w", err)
	}
	return nil
}

// CheckPort reports whether port can be bound on listen now: nil, or
// port_in_use.
func CheckPort(listen string, port int) error {
	if _, err := listenHost(listen); err != nil {
		return err
	}
	if err := checkPort(port); err != nil {
		return err
	}
	return bindable(listen, port)
}

func bindable(listen string, port int) error {
	ln, err := net.Listen("tcp", net.JoinHostPort(listen, strconv.Itoa(port)))
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return errcode.Wrap(errcode.PortInUse, err, "vnc port %d on %s is in use", port, listen)
		}
		return errcode.Wrap(errcode.ValidationFailed, err, "vnc cannot listen on %s", net.JoinHostPort(listen, strconv.Itoa(port)))
	}
	return ln.Close()
}

// PickPort returns the first port from from (5900 if lower) that can be
// bound on listenAddr now. Go's listeners set SO_REUSEADDR, as QEMU's do,
// so a port is taken here exactly when it would be for QEMU.
func PickPort(listenAddr string, from int) (int, error) {
	return pick(listenAddr, from, nil)
}

// PickFree is PickPort skipping the ports taken says are another VM's:
// ports the agent gave a VM whose QEMU may not have bound them yet.
func PickFree(listenAddr string, from int, taken func(port int) bool) (int, error) {
	return pick(listenAddr, from, taken)
}

func pick(listen string, from int, skip func(int) bool) (int, error) {
	if _, err := listenHost(listen); err != nil {
		return 0, err
	}
	from = max(from, BasePort)
	for port := from; port <= MaxPort; port++ {
		if skip != nil && skip(port) {
			continue
		}
		err := bindable(listen, port)
		if err == nil {
			return port, nil
		}
		if !errcode.Is(err, errcode.PortInUse) {
			return 0, err
		}
	}
	return 0, errcode.New(errcode.PortInUse, "no free vnc port from %d on %s", from, listen)
}
