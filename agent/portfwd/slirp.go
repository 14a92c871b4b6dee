package portfwd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// HMPFunc runs one HMP command line and returns its text output. The
// engine implements it with QMP human-monitor-command:
//
//	func(ctx context.Context, line string) (string, error) {
//		var out string
//		err := client.Execute(ctx, "human-monitor-command",
//			map[string]any{"command-line": line}, &out)
//		return out, err
//	}
type HMPFunc func(ctx context.Context, commandLine string) (string, error)

// HMPError is a hostfwd command that QEMU refused, with its answer.
type HMPError struct {
	Command string // the HMP command line
	Output  string // QEMU's answer, trimmed
}

func (e *HMPError) Error() string {
	return fmt.Sprintf("hmp %q: %s", e.Command, e.Output)
}

// CheckFree tries to bind each rule's host socket (TCP with SO_REUSEADDR,
// as QEMU's SLIRP does) and releases it at once: errcode.PortInUse if one
// is taken. Call it before starting QEMU with hostfwd options, whose bind
// failure would otherwise be a QEMU start failure. It cannot close the
// race with another process binding between the check and QEMU's bind;
// AddHostFwd's own error covers that at run time.
func CheckFree(ctx context.Context, rules []Rule) error {
	for _, r := range rules {
		c, err := listen(ctx, r)
		if err != nil {
			return err
		}
		c.Close()
	}
	return nil
}

// listen binds r's host socket: a *net.TCPListener or *net.UDPConn.
func listen(ctx context.Context, r Rule) (interface{ Close() error }, error) {
	var lc net.ListenConfig
	var c interface{ Close() error }
	var err error
	if r.Proto == TCP {
		c, err = lc.Listen(ctx, "tcp", r.hostAddrPort())
	} else {
		c, err = lc.ListenPacket(ctx, "udp", r.hostAddrPort())
	}
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) || errors.Is(err, syscall.EACCES) {
			return nil, errcode.Wrap(errcode.PortInUse, err, "forward %s: host port %d/%s is in use", r, r.HostPort, r.Proto)
		}
		if errors.Is(err, syscall.EADDRNOTAVAIL) {
			return nil, errcode.Wrap(errcode.ValidationFailed, err, "forward %s: %s is not an address of this host", r, r.hostIP())
		}
		return nil, errcode.Wrap(errcode.Internal, err, "forward %s: listen", r)
	}
	return c, nil
}

// AddHostFwd adds a forward to the running user netdev netdevID (e.g.
// "net0") with HMP hostfwd_add. r must be normalized (Validate). A host
// port in use gives errcode.PortInUse, checked before asking QEMU and
// again from QEMU's answer; an unknown netdev errcode.NotFound.
func AddHostFwd(ctx context.Context, hmp HMPFunc, netdevID string, r Rule) error {
	rule, err := HostFwd(r)
	if err != nil {
		return err
	}
	if err := checkNetdevID(netdevID); err != nil {
		return err
	}
	if err := CheckFree(ctx, []Rule{r}); err != nil {
		return err
	}
	line := "hostfwd_add " + netdevID + " " + rule
	out, err := hmp(ctx, line)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "forward %s", r)
	}
	return parseAdd(line, r, out)
}

// RemoveHostFwd removes a forward from the running user netdev netdevID
// with HMP hostfwd_remove. A forward that is not there gives
// errcode.NotFound.
func RemoveHostFwd(ctx context.Context, hmp HMPFunc, netdevID string, r Rule) error {
	if _, err := HostFwd(r); err != nil {
		return err
	}
	if err := checkNetdevID(netdevID); err != nil {
		return err
	}
	// hostfwd_remove takes [hub_id name]|[netdev_id] [tcp|udp]:[hostaddr]:hostport
	line := fmt.Sprintf("hostfwd_remove %s %s:%s:%d", netdevID, r.Proto, r.HostAddr, r.HostPort)
	out, err := hmp(ctx, line)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "remove forward %s", r)
	}
	return parseRemove(line, r, out)
}

// checkNetdevID keeps the HMP line one command with two words.
func checkNetdevID(id string) error {
	if id == "" || strings.ContainsAny(id, " \t\r\n") {
		return errcode.New(errcode.ValidationFailed, "netdev id %q is not valid", id)
	}
	return nil
}

// parseAdd reads hostfwd_add's answer: nothing on success; otherwise
// (QEMU 7.2 net/slirp.c) "Could not set up host forwarding rule '...'"
// (the bind failed), "Invalid host forwarding rule '...' (...)",
// "unrecognized netdev id '...'", "invalid device specified" (not a user
// netdev) or "user mode network stack not in use".
func parseAdd(line string, r Rule, out string) error {
	out = strings.TrimSpace(out)
	if out == "" {
		return nil
	}
	herr := &HMPError{Command: line, Output: out}
	switch {
	case strings.Contains(out, "Could not set up host forwarding rule"):
		return errcode.Wrap(errcode.PortInUse, herr, "forward %s: qemu cannot bind host port %d/%s", r, r.HostPort, r.Proto)
	case strings.Contains(out, "unrecognized netdev id"), strings.Contains(out, "invalid device specified"),
		strings.Contains(out, "not in use"):
		return errcode.Wrap(errcode.NotFound, herr, "forward %s: no user-mode netdev", r)
	case strings.Contains(out, "Invalid host forwarding rule"):
		return errcode.Wrap(errcode.ValidationFailed, herr, "forward %s", r)
	}
	return errcode.Wrap(errcode.Internal, herr, "forward %s", r)
}

// parseRemove reads hostfwd_remove's answer: "host forwarding rule for
// tcp::8080 removed" or "... not found", "invalid format", or the netdev
// lookup errors of hostfwd_add.
func parseRemove(line string, r Rule, out string) error {
	out = strings.TrimSpace(out)
	herr := &HMPError{Command: line, Output: out}
	switch {
	case strings.HasSuffix(out, "removed"):
		return nil
	case strings.HasSuffix(out, "not found"):
		return errcode.Wrap(errcode.NotFound, herr, "forward %s is not set", r)
	case strings.Contains(out, "unrecognized netdev id"), strings.Contains(out, "invalid device specified"),
		strings.Contains(out, "not in use"):
		return errcode.Wrap(errcode.NotFound, herr, "forward %s: no user-mode netdev", r)
	case strings.Contains(out, "invalid format"):
		return errcode.Wrap(errcode.ValidationFailed, herr, "remove forward %s", r)
	}
	return errcode.Wrap(errcode.Internal, herr, "remove forward %s", r)
}
