package testguest

import (
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestReadDebianReport(t *testing.T) {
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	path := filepath.Join(t.TempDir(), "console.log")
	text := "[    1.0] early kernel line\r\n" +
		"OTHERIX-DEBIAN boot n=2 id=abc\r\n" +
		"OTHERIX-DEBIAN file /var/lib/cloud/data/instance-id " + b64("iid-1\n") + "\n" +
		"[   42.1] a kernel line in between\n" +
		"OTHERIX-DEBIAN file /run/cloud-init/result.json -\n" +
		"OTHERIX-DEBIAN cmd hostname " + b64("deb-1\n") + "\n" +
		"OTHERIX-DEBIAN cmd empty \n" +
		"OTHERIX-DEBIAN done n=2\n" +
		"OTHERIX-DEBIAN boot n=3 id=def\n" // the next boot's report, unfinished
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	c := OpenConsole(path)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := ReadDebianReport(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	if r.Boot != 2 {
		t.Errorf("Boot = %d, want 2", r.Boot)
	}
	if got := r.Files["/var/lib/cloud/data/instance-id"]; got != "iid-1\n" {
		t.Errorf("instance-id = %q", got)
	}
	if _, ok := r.Files["/run/cloud-init/result.json"]; ok {
		t.Errorf("a missing file is in Files")
	}
	if got, ok := r.Cmds["empty"]; !ok || got != "" {
		t.Errorf("empty output = %q, %v; want present and empty", got, ok)
	}
	if got := r.Cmds["hostname"]; got != "deb-1\n" {
		t.Errorf("hostname = %q", got)
	}
	// The unfinished report of the next boot is not returned.
	short, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if r, err := ReadDebianReport(short, c); err == nil {
		t.Errorf("an unfinished report was returned: %+v", r)
	}
}
