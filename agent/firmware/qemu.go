package firmware

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// queryTimeout bounds one "qemu -machine help" or "qemu -L help" run.
const queryTimeout = 20 * time.Second

// Machines returns the machine types of a QEMU binary, from its
// "-machine help": each name maps to the versioned name it is an alias of,
// or to itself ("q35" → "pc-q35-7.2", "pc-q35-7.2" → "pc-q35-7.2").
func Machines(ctx context.Context, binary string) (map[string]string, error) {
	out, err := runQEMU(ctx, binary, "-machine", "help")
	if err != nil {
		return nil, err
	}
	return parseMachineHelp(out), nil
}

// parseMachineHelp parses "-machine help":
//
//	Supported machines are:
//	q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
//	pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
func parseMachineHelp(out string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || strings.HasSuffix(line, ":") {
			continue
		}
		name := f[0]
		target := name
		if i := strings.LastIndex(line, "(alias of "); i >= 0 {
			rest := line[i+len("(alias of "):]
			if j := strings.IndexByte(rest, ')'); j > 0 {
				target = rest[:j]
			}
		}
		m[name] = target
	}
	return m
}

// ResolveMachine returns the versioned machine type that machine ("q35",
// "virt" or already versioned) means for binary.
func ResolveMachine(ctx context.Context, binary, machine string) (string, error) {
	ms, err := Machines(ctx, binary)
	if err != nil {
		return "", err
	}
	resolved, ok := ms[machine]
	if !ok {
		return "", fmt.Errorf("%s has no machine type %q", binary, machine)
	}
	return resolved, nil
}

// DataDirs returns the folders where binary looks for its firmware
// (QEMU's "-L help": /usr/share/qemu, /usr/share/seabios...), resolved.
func DataDirs(ctx context.Context, binary string) ([]string, error) {
	out, err := runQEMU(ctx, binary, "-L", "help")
	if err != nil {
		return nil, err
	}
	var dirs []string
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		dirs = append(dirs, filepath.Clean(line))
	}
	return dirs, nil
}

// findDataFile returns the first regular file name in dirs.
func findDataFile(dirs []string, name string) (string, bool) {
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			if r, err := filepath.EvalSymlinks(p); err == nil {
				return r, true
			}
			return p, true
		}
	}
	return "", false
}

func runQEMU(ctx context.Context, binary string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, queryTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", binary, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}
