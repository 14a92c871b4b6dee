package vnc

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/otherix/otherix-agent/internal/errcode"
)

func ip(n int) *int { return &n }

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name     string
		enabled  bool
		port     *int
		password string
		code     errcode.Code
		msg      string
	}{
		{"auto port", true, nil, "secret", "", ""},
		{"explicit port", true, ip(5901), "12345678", "", ""},
		{"highest port", true, ip(65535), "x", "", ""},
		{"disabled, nothing", false, nil, "", "", ""},
		{"no password", true, nil, "", errcode.ValidationFailed, "vnc_password is required"},
		{"nine bytes", true, nil, "123456789", errcode.ValidationFailed, "at most 8"},
		{"seven runes, ten bytes of utf-8", true, nil, "päßwörd", errcode.ValidationFailed, "10 bytes long"},
		{"five runes, eight bytes of utf-8", true, nil, "päßwö", "", ""},
		{"control character", true, nil, "ab\x00cd", errcode.ValidationFailed, "control character"},
		{"port below 5900", true, ip(5899), "x", errcode.ValidationFailed, "5900 to 65535"},
		{"port 0", true, ip(0), "x", errcode.ValidationFailed, "out of range"},
		{"port too high", true, ip(65536), "x", errcode.ValidationFailed, "out of range"},
		{"disabled, bad port", false, ip(80), "", errcode.ValidationFailed, "out of range"},
		{"disabled, long password", false, nil, "123456789", errcode.ValidationFailed, "at most 8"},
	} {
		err := Validate(tc.enabled, tc.port, tc.password)
		if errcode.Of(err) != tc.code || tc.code != "" && !strings.Contains(errcode.MessageOf(err), tc.msg) {
			t.Errorf("%s: %v, want %q %q", tc.name, err, tc.code, tc.msg)
		}
		if err != nil && tc.password != "" && strings.Contains(err.Error(), tc.password) {
			t.Errorf("%s: the error quotes the password: %v", tc.name, err)
		}
	}
}

func TestArgs(t *testing.T) {
	for _, tc := range []struct {
		listen string
		port   int
		want   []string
		code   errcode.Code
	}{
		{"127.0.0.1", 5900, []string{"-vnc", "127.0.0.1:0,password=on"}, ""},
		{"0.0.0.0", 5917, []string{"-vnc", "0.0.0.0:17,password=on"}, ""},
		{"::1", 5901, []string{"-vnc", "[::1]:1,password=on"}, ""},
		{"::ffff:10.0.0.1", 5902, []string{"-vnc", "10.0.0.1:2,password=on"}, ""},
		{"::", 65535, []string{"-vnc", "[::]:59635,password=on"}, ""},
		{"localhost", 5900, nil, errcode.ValidationFailed},
		{"127.0.0.1,to=99", 5900, nil, errcode.ValidationFailed},
		{"fe80::1%eth0", 5900, nil, errcode.ValidationFailed},
		{"127.0.0.1", 5899, nil, errcode.ValidationFailed},
	} {
		got, err := Args(tc.listen, tc.port)
		if errcode.Of(err) != tc.code || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Args(%q, %d) = %q, %v; want %q, %q", tc.listen, tc.port, got, err, tc.want, tc.code)
		}
	}
	for _, tc := range []struct {
		arch string
		want string
	}{
		{"amd64", "VGA,id=video0,bus=pcie.0,addr=0x1"},
		{"arm64", "virtio-gpu-pci,id=video0,bus=pcie.0,addr=0x1"},
	} {
		got, err := DisplayArgs(tc.arch, 1)
		if err != nil || len(got) != 2 || got[1] != tc.want {
			t.Errorf("DisplayArgs(%s) = %q, %v", tc.arch, got, err)
		}
	}
	if _, err := DisplayArgs("s390x", 1); errcode.Of(err) != errcode.ValidationFailed {
		t.Errorf("s390x: %v", err)
	}
}

// hold binds a port on loopback for the test's life.
func hold(t *testing.T, port int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
}

func TestPickPort(t *testing.T) {
	// Above the range other tests use, so parallel packages do not race.
	from, err := PickPort("127.0.0.1", 47000)
	if err != nil {
		t.Fatal(err)
	}
	hold(t, from)
	got, err := PickPort("127.0.0.1", from)
	if err != nil {
		t.Fatal(err)
	}
	if got <= from {
		t.Errorf("PickPort from a taken %d = %d", from, got)
	}
	if err := CheckPort("127.0.0.1", from); errcode.Of(err) != errcode.PortInUse {
		t.Errorf("CheckPort(taken) = %v, want port_in_use", err)
	}
	if err := CheckPort("127.0.0.1", got); err != nil {
		t.Errorf("CheckPort(free) = %v", err)
	}
	if _, err := PickPort("192.0.2.1", 5900); errcode.Of(err) != errcode.ValidationFailed {
		t.Errorf("PickPort on an address not of this host = %v, want validation_failed", err)
	}
	hold(t, MaxPort)
	if _, err := PickPort("127.0.0.1", MaxPort); errcode.Of(err) != errcode.PortInUse {
		t.Errorf("PickPort with nothing left = %v, want port_in_use", err)
	}
	if got, err := PickPort("127.0.0.1", 80); err != nil || got < BasePort {
		t.Errorf("PickPort from 80 = %d, %v: want 5900 or above", got, err)
	}
}

func TestPickFree(t *testing.T) {
	a, err := PickFree("127.0.0.1", 47100, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := PickFree("127.0.0.1", 47100, func(p int) bool { return p == a })
	if err != nil || b == a || b < 47100 {
		t.Fatalf("PickFree skipping %d = %d, %v", a, b, err)
	}
	hold(t, b)
	if c, err := PickFree("127.0.0.1", b, nil); err != nil || c == b {
		t.Errorf("PickFree from a bound %d = %d, %v", b, c, err)
	}
}

// qmpRecorder stands in for QMP.
type qmpRecorder struct {
	cmds []string
	args []any
	do   func(cmd string, args any) error
}

func (r *qmpRecorder) exec(ctx context.Context, cmd string, args any) error {
	r.cmds = append(r.cmds, cmd)
	r.args = append(r.args, args)
	if r.do != nil {
		return r.do(cmd, args)
	}
	return nil
}

func TestSetPassword(t *testing.T) {
	ctx := context.Background()
	var r qmpRecorder
	if err := SetPassword(ctx, r.exec, "s3cret"); err != nil {
		t.Fatal(err)
	}
	if want := []any{map[string]string{"protocol": "vnc", "password": "s3cret"}}; !reflect.DeepEqual(r.cmds, []string{"set_password"}) || !reflect.DeepEqual(r.args, want) {
		t.Errorf("sent %v %v", r.cmds, r.args)
	}
	r = qmpRecorder{}
	if err := SetPassword(ctx, r.exec, "123456789"); errcode.Of(err) != errcode.ValidationFailed || len(r.cmds) != 0 {
		t.Errorf("9 bytes: %v, sent %v", err, r.cmds)
	}
	if err := SetPassword(ctx, r.exec, ""); errcode.Of(err) != errcode.ValidationFailed || len(r.cmds) != 0 {
		t.Errorf("empty: %v, sent %v", err, r.cmds)
	}
	boom := errors.New("GenericError: Could not set password")
	r = qmpRecorder{do: func(string, any) error { return boom }}
	err := SetPassword(ctx, r.exec, "s3cret")
	if !errors.Is(err, boom) || strings.Contains(err.Error(), "s3cret") {
		t.Errorf("QMP failure: %v", err)
	}
}

func TestScreenshotFile(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	var seen string
	r := qmpRecorder{do: func(cmd string, args any) error {
		seen = args.(map[string]string)["filename"]
		if args.(map[string]string)["format"] != "png" {
			return errors.New("format not png")
		}
		return os.WriteFile(seen, append(pngMagic, "rest"...), 0o644) // as QEMU would: O_TRUNC
	}}
	b, err := Screenshot(ctx, r.exec, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != string(pngMagic)+"rest" || filepath.Dir(seen) != dir {
		t.Errorf("got %q from %s", b, seen)
	}
	if _, err := os.Stat(seen); !os.IsNotExist(err) {
		t.Errorf("%s left behind: %v", seen, err)
	}
	r.do = func(cmd string, args any) error {
		return os.WriteFile(args.(map[string]string)["filename"], []byte("P6\n640 480\n255\n"), 0o644)
	}
	if _, err := Screenshot(ctx, r.exec, dir, nil); err == nil || !strings.Contains(err.Error(), "not a PNG") {
		t.Errorf("PPM instead of PNG: %v", err)
	}
	if _, err := Screenshot(ctx, r.exec, "relative", nil); errcode.Of(err) != errcode.ValidationFailed {
		t.Errorf("relative dir: %v", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("left in dir: %v", ents)
	}
}
