package vm

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/agent/netdev/netdevtest"
	"github.com/otherix/otherix-agent/agent/portfwd"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/qmp"
)

// hmpMonitor answers human-monitor-command with a raw QMP "return" value
// and records the command lines it got.
type hmpMonitor struct {
	ret   []byte
	lines []string
}

func (m *hmpMonitor) Execute(_ context.Context, cmd string, args, out any) error {
	a, ok := args.(map[string]any)
	line, _ := a["command-line"].(string)
	if cmd != "human-monitor-command" || !ok || len(a) != 1 || line == "" {
		return errors.New("not an HMP command")
	}
	m.lines = append(m.lines, line)
	// As qmp.Client.Execute does with a reply's "return".
	if err := json.Unmarshal(m.ret, out); err != nil {
		return err
	}
	return nil
}

func (m *hmpMonitor) Subscribe(int) (<-chan qmp.Event, func()) { return nil, func() {} }
func (m *hmpMonitor) Done() <-chan struct{}                    { return nil }
func (m *hmpMonitor) Close() error                             { return nil }

// FuzzHostFwdAnswer runs AddForward's and RemoveForward's HMP exchange
// (portfwd.AddHostFwd / RemoveHostFwd through the machine's
// human-monitor-command) with any answer of QEMU: ret is the raw "return"
// value of the QMP reply, normally a JSON string. The rule of a removal is
// fuzzed too, normalized as RemoveForward does. Nothing panics, and:
//
//   - one HMP line is sent: "hostfwd_add net0 RULE" or
//     "hostfwd_remove net0 PROTO:ADDR:PORT", three words that give the
//     rule back;
//   - an add succeeds exactly when QEMU answered nothing (blank), a
//     removal exactly when the answer ends in "removed";
//   - every error carries a code (port_in_use, not_found,
//     validation_failed, or internal for an answer not understood), and
//     one made from QEMU's answer keeps it, trimmed, with the line.
func FuzzHostFwdAnswer(f *testing.F) {
	str := func(s string) []byte { b, _ := json.Marshal(s); return b }
	// Answers of QEMU 7.2 (net/slirp.c), with HMP's line ends.
	for _, s := range []struct {
		add, udp  bool
		addr      string
		hostPort  uint16
		guestPort uint16
		ret       []byte
	}{
		{true, false, "", 0, 80, str("")},
		{true, false, "", 0, 80, str("Could not set up host forwarding rule 'tcp:127.0.0.1:8080-:80'\r\n")},
		{true, true, "", 0, 53, str("Invalid host forwarding rule 'udp:127.0.0.1:5353-:53' (Bad guest address)\r\n")},
		{true, false, "", 0, 22, str("unrecognized netdev id 'net0'\r\n")},
		{true, false, "", 0, 22, str("invalid device specified\r\n")},
		{true, false, "", 0, 22, str("user mode network stack not in use\r\n")},
		{true, false, "", 0, 22, []byte(`{}`)},
		{true, false, "", 0, 22, []byte(`null`)},
		{false, false, "", 8080, 80, str("host forwarding rule for tcp::8080 removed\r\n")},
		{false, true, "127.0.0.1", 5353, 53, str("host forwarding rule for udp:127.0.0.1:5353 not found\r\n")},
		{false, false, "0.0.0.0", 2222, 22, str("invalid format\r\n")},
		{false, false, "::ffff:10.0.0.1", 2222, 22, str("unrecognized netdev id 'net0'\r\n")},
		{false, false, "10.0.0.1", 65535, 1, str("")},
		{false, false, "", 80, 80, str("removed but not really\r\nError: something")},
		{false, false, "", 80, 80, []byte(`42`)},
	} {
		f.Add(s.add, s.udp, s.addr, s.hostPort, s.guestPort, s.ret)
	}
	port := netdevtest.FreePort(f) // free for both tcp and udp: AddHostFwd checks before asking QEMU
	f.Fuzz(func(t *testing.T, add, udp bool, addr string, hostPort, guestPort uint16, ret []byte) {
		r := portfwd.Rule{Proto: portfwd.TCP, HostAddr: addr, HostPort: int(hostPort), GuestPort: int(guestPort)}
		if udp {
			r.Proto = portfwd.UDP
		}
		if add {
			// CheckFree binds the host socket: one of loopback's, kept free.
			r.HostAddr, r.HostPort = "127.0.0.1", port
		}
		rules, err := portfwd.Validate(nil, []portfwd.Rule{r})
		if err != nil {
			return
		}
		r = rules[0]
		mon := &hmpMonitor{ret: ret}
		hmp := (&machine{}).hmp(&process{mon: mon})
		ctx := context.Background()
		if add {
			err = portfwd.AddHostFwd(ctx, hmp, "net0", r)
		} else {
			err = portfwd.RemoveHostFwd(ctx, hmp, "net0", r)
		}
		if len(mon.lines) == 0 {
			switch {
			case add && errcode.Of(err) == errcode.PortInUse:
				return // something else took the port
			case !add && errcode.Of(err) == errcode.ValidationFailed && strings.Contains(r.HostAddr, ":"):
				return // an IPv6 host address: SLIRP cannot write it
			}
		}
		if len(mon.lines) != 1 {
			t.Fatalf("rule %v: %d HMP lines %q (error %v)", r, len(mon.lines), mon.lines, err)
		}
		line := mon.lines[0]
		checkHMPLine(t, line, add, r)

		var answer string
		isString := json.Unmarshal(ret, &answer) == nil
		trimmed := strings.TrimSpace(answer)
		ok := isString && (add && trimmed == "" || !add && strings.HasSuffix(trimmed, "removed"))
		if ok != (err == nil) {
			t.Fatalf("%q answered %q (%s): error %v", line, answer, ret, err)
		}
		if err == nil {
			return
		}
		var cerr *errcode.Error
		if !errors.As(err, &cerr) {
			t.Fatalf("%q answered %s: uncoded error %v", line, ret, err)
		}
		switch cerr.Code {
		case errcode.PortInUse, errcode.NotFound, errcode.ValidationFailed, errcode.Internal:
		default:
			t.Fatalf("%q answered %s: code %s", line, ret, cerr.Code)
		}
		if !add && cerr.Code == errcode.PortInUse {
			t.Fatalf("%q answered %s: port_in_use for a removal", line, ret)
		}
		var herr *portfwd.HMPError
		if errors.As(err, &herr) != isString {
			t.Fatalf("%q answered %s: HMPError %v", line, ret, herr)
		}
		if herr != nil && (herr.Command != line || herr.Output != trimmed) {
			t.Fatalf("%q answered %q: HMPError %+v", line, answer, herr)
		}
	})
}

// checkHMPLine checks that line is the one command for r, and that its
// rule parses back to r.
func checkHMPLine(t *testing.T, line string, add bool, r portfwd.Rule) {
	t.Helper()
	w := strings.Fields(line)
	if strings.ContainsAny(line, "\r\n\t") || len(w) != 3 || strings.Join(w, " ") != line || w[1] != "net0" {
		t.Fatalf("HMP line %q for rule %v", line, r)
	}
	host := w[2]
	if add {
		if w[0] != "hostfwd_add" {
			t.Fatalf("HMP line %q to add %v", line, r)
		}
		var guest string
		host, guest, _ = strings.Cut(host, "-")
		if guest != ":"+strconv.Itoa(r.GuestPort) {
			t.Fatalf("HMP line %q: guest part %q, want port %d", line, guest, r.GuestPort)
		}
	} else if w[0] != "hostfwd_remove" {
		t.Fatalf("HMP line %q to remove %v", line, r)
	}
	parts := strings.Split(host, ":")
	if len(parts) != 3 || parts[0] != r.Proto || parts[1] != r.HostAddr || parts[2] != strconv.Itoa(r.HostPort) {
		t.Fatalf("HMP line %q: host part %q, want %s:%s:%d", line, host, r.Proto, r.HostAddr, r.HostPort)
	}
}
