package portfwd

import (
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/internal/errcode"
)

func TestNormalize(t *testing.T) {
	for _, tc := range []struct {
		in   Rule
		want Rule
		code errcode.Code
	}{
		{Rule{Proto: "TCP", DestProto: "TCP", HostPort: 8080, GuestPort: 80}, Rule{Proto: "tcp", DestProto: "tcp", HostPort: 8080, GuestPort: 80}, ""},
		{Rule{Proto: "udp", HostPort: 53, GuestPort: 53}, Rule{Proto: "udp", DestProto: "udp", HostPort: 53, GuestPort: 53}, ""},
		{Rule{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: 1, GuestPort: 65535}, Rule{Proto: "tcp", DestProto: "tcp", HostAddr: "127.0.0.1", HostPort: 1, GuestPort: 65535}, ""},
		{Rule{Proto: "tcp", HostAddr: "0.0.0.0", HostPort: 2, GuestPort: 2}, Rule{Proto: "tcp", DestProto: "tcp", HostPort: 2, GuestPort: 2}, ""},
		{Rule{Proto: "tcp", HostAddr: "::ffff:127.0.0.1", HostPort: 2, GuestPort: 2}, Rule{Proto: "tcp", DestProto: "tcp", HostAddr: "127.0.0.1", HostPort: 2, GuestPort: 2}, ""},
		{Rule{Proto: "tcp", DestProto: "udp", HostPort: 80, GuestPort: 80}, Rule{}, errcode.ValidationFailed},
		{Rule{Proto: "UDP", DestProto: "TCP", HostPort: 80, GuestPort: 80}, Rule{}, errcode.ValidationFailed},
		{Rule{Proto: "sctp", HostPort: 80, GuestPort: 80}, Rule{}, errcode.ValidationFailed},
		{Rule{Proto: "tcp", DestProto: "icmp", HostPort: 80, GuestPort: 80}, Rule{}, errcode.ValidationFailed},
		{Rule{Proto: "tcp", HostPort: 0, GuestPort: 80}, Rule{}, errcode.ValidationFailed},
		{Rule{Proto: "tcp", HostPort: 70000, GuestPort: 80}, Rule{}, errcode.ValidationFailed},
		{Rule{Proto: "tcp", HostPort: 80, GuestPort: 0}, Rule{}, errcode.ValidationFailed},
		{Rule{Proto: "tcp", HostPort: 80, GuestPort: 70000}, Rule{}, errcode.ValidationFailed},
		{Rule{Proto: "tcp", HostAddr: "localhost", HostPort: 80, GuestPort: 80}, Rule{}, errcode.ValidationFailed},
		{Rule{Proto: "tcp", HostAddr: "fe80::1%eth0", HostPort: 80, GuestPort: 80}, Rule{}, errcode.ValidationFailed},
	} {
		got, err := tc.in.Normalize()
		if got != tc.want || errcode.Of(err) != tc.code {
			t.Errorf("Normalize(%+v) = %+v, %v; want %+v, %q", tc.in, got, err, tc.want, tc.code)
		}
	}
}

func TestValidateOverlaps(t *testing.T) {
	r := func(proto, addr string, port int) Rule {
		return Rule{Proto: proto, HostAddr: addr, HostPort: port, GuestPort: 80}
	}
	for _, tc := range []struct {
		name     string
		existing []Rule
		rules    []Rule
		ok       bool
	}{
		{"tcp and udp on one port", nil, []Rule{r("tcp", "", 8080), r("udp", "", 8080)}, true},
		{"two tcp on one port", nil, []Rule{r("tcp", "", 8080), r("TCP", "", 8080)}, false},
		{"wildcard and loopback", nil, []Rule{r("tcp", "", 8080), r("tcp", "127.0.0.1", 8080)}, false},
		{"two loopback addresses", nil, []Rule{r("tcp", "127.0.0.1", 8080), r("tcp", "127.0.0.2", 8080)}, true},
		{"v6 wildcard takes all", nil, []Rule{r("udp", "::", 53), r("udp", "127.0.0.1", 53)}, false},
		{"same port as a running forward", []Rule{{Proto: "tcp", DestProto: "tcp", HostPort: 2222, GuestPort: 22}}, []Rule{r("tcp", "", 2222)}, false},
		{"other port than a running forward", []Rule{{Proto: "tcp", DestProto: "tcp", HostPort: 2222, GuestPort: 22}}, []Rule{r("tcp", "", 2223)}, true},
		{"a bad rule", nil, []Rule{r("tcp", "", 0)}, false},
	} {
		out, err := Validate(tc.existing, tc.rules)
		if tc.ok != (err == nil) || (err != nil && !errcode.Is(err, errcode.ValidationFailed)) {
			t.Errorf("%s: Validate = %v, want ok=%v (or validation_failed)", tc.name, err, tc.ok)
		}
		if err == nil && len(out) != len(tc.rules) {
			t.Errorf("%s: %d rules out of %d", tc.name, len(out), len(tc.rules))
		}
	}
}

func TestHostFwdOptions(t *testing.T) {
	rules, err := Validate(nil, []Rule{
		{Proto: "TCP", HostPort: 2222, GuestPort: 22},
		{Proto: "udp", HostAddr: "127.0.0.1", HostPort: 5353, GuestPort: 53},
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := HostFwdOptions(rules)
	if err != nil {
		t.Fatal(err)
	}
	if want := "hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53"; strings.Join(got, ",") != want {
		t.Errorf("HostFwdOptions = %q, want %q", strings.Join(got, ","), want)
	}
	v6, _ := Rule{Proto: "tcp", HostAddr: "::1", HostPort: 1, GuestPort: 1}.Normalize()
	if _, err := HostFwdOptions([]Rule{v6}); !errcode.Is(err, errcode.ValidationFailed) {
		t.Errorf("IPv6 hostfwd: %v, want validation_failed", err)
	}
}

// The answers are QEMU 7.2's, as printed by its monitor.
func TestParseHMP(t *testing.T) {
	r := Rule{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: 18080, GuestPort: 80}
	for _, tc := range []struct {
		add  bool
		out  string
		code errcode.Code
	}{
		{true, "", ""},
		{true, "\r\n", ""},
		{true, "Could not set up host forwarding rule 'tcp:127.0.0.1:18080-:80'\r\n", errcode.PortInUse},
		{true, "unrecognized netdev id 'nope'\r\n", errcode.NotFound},
		{true, "invalid device specified\r\n", errcode.NotFound},
		{true, "user mode network stack not in use\r\n", errcode.NotFound},
		{true, "Invalid host forwarding rule 'x' (Bad protocol name)\r\n", errcode.ValidationFailed},
		{true, "something new\r\n", errcode.Internal},
		{false, "host forwarding rule for tcp:127.0.0.1:18080 removed\r\n", ""},
		{false, "host forwarding rule for tcp:127.0.0.1:18080 not found\r\n", errcode.NotFound},
		{false, "invalid format\r\n", errcode.ValidationFailed},
		{false, "unrecognized netdev id 'nope'\r\n", errcode.NotFound},
		{false, "", errcode.Internal},
	} {
		var err error
		if tc.add {
			err = parseAdd("hostfwd_add net0 x", r, tc.out)
		} else {
			err = parseRemove("hostfwd_remove net0 x", r, tc.out)
		}
		if errcode.Of(err) != tc.code {
			t.Errorf("add=%v %q: %v, want %q", tc.add, tc.out, err, tc.code)
		}
	}
}
