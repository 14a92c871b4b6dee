package testguest

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// debianBuildTimeout bounds one run of testdata/debian/build.sh: a cold
// build downloads about 100 MB of packages and runs debootstrap.
const debianBuildTimeout = 25 * time.Minute

var debian buildResult

// DebianPrefix starts each line the Debian image's report prints on ttyS0
// once cloud-final has run, on every boot (testdata/debian/README.md).
const DebianPrefix = "OTHERIX-DEBIAN "

// Debian returns the folder holding the Debian 12 cloud image built by
// testdata/debian/build.sh from Debian packages (debootstrap minbase, the
// cloud kernel, cloud-init, qemu-guest-agent): debian.qcow2 (read-only:
// boot an overlay, or serve it to the agent) and build-info.txt. It builds
// the image on first use in this process (cached under
// $OTHERIX_TEST_CACHE, keyed on its inputs) and fails the test if the
// build fails; it never skips.
func Debian(tb testing.TB) string {
	tb.Helper()
	debian.once.Do(func() { debian.dir, debian.err = buildDebian() })
	if debian.err != nil {
		tb.Fatalf("testguest: %v", debian.err)
	}
	return debian.dir
}

func buildDebian() (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	script := filepath.Join(root, "testdata", "debian", "build.sh")
	ctx, cancel := context.WithTimeout(context.Background(), debianBuildTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", script)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	// The script locks and renames into place: a kill mid-build leaves a
	// temporary folder the next run removes. WaitDelay bounds a child
	// (debootstrap, dpkg) that keeps the pipes open.
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s: %w\n%s", script, err, tail(stderr.String(), 40))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	dir := strings.TrimSpace(lines[len(lines)-1])
	if _, err := os.Stat(filepath.Join(dir, "debian.qcow2")); err != nil {
		return "", fmt.Errorf("%s printed %q, not an image folder: %w\n%s", script, dir, err, tail(stderr.String(), 40))
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return "", fmt.Errorf("the Debian image is built but cannot boot: %w", err)
	}
	return dir, nil
}

// DebianReport is one boot's report of the Debian image: cloud-init's own
// files and a few commands' output, as the guest printed them.
type DebianReport struct {
	Boot  int               // the guest's boot count (1 on the first boot)
	Files map[string]string // path → content; missing files are absent
	Cmds  map[string]string // name → output
}

// ReadDebianReport waits on c for the next complete report (from its
// "boot" line to its "done" line) and decodes it.
func ReadDebianReport(ctx context.Context, c *Console) (*DebianReport, error) {
	if _, err := c.WaitFor(ctx, DebianPrefix+"boot "); err != nil {
		return nil, err
	}
	start := c.Pos() - 1
	done, err := c.WaitFor(ctx, DebianPrefix+"done ")
	if err != nil {
		return nil, err
	}
	lines := c.Lines()[start:c.Pos()]
	return parseDebianReport(lines, done)
}

func parseDebianReport(lines []string, done string) (*DebianReport, error) {
	r := &DebianReport{Files: map[string]string{}, Cmds: map[string]string{}}
	if _, err := fmt.Sscanf(done[strings.Index(done, DebianPrefix)+len(DebianPrefix):], "done n=%d", &r.Boot); err != nil {
		return nil, fmt.Errorf("report end %q: %w", done, err)
	}
	for _, line := range lines {
		i := strings.Index(line, DebianPrefix)
		if i < 0 {
			continue // a kernel message between the report's lines
		}
		f := strings.Fields(line[i+len(DebianPrefix):])
		if len(f) < 2 || len(f) > 3 || (f[0] != "file" && f[0] != "cmd") {
			continue
		}
		f = append(f, "") // empty content: base64 of nothing
		if f[2] == "-" {
			continue // a missing file
		}
		b, err := base64.StdEncoding.DecodeString(f[2])
		if err != nil {
			return nil, fmt.Errorf("report line %q: %w", line, err)
		}
		if f[0] == "file" {
			r.Files[f[1]] = string(b)
		} else {
			r.Cmds[f[1]] = string(b)
		}
	}
	return r, nil
}
