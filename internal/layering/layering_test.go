// Package layering holds the module's import rules to what the README's
// layout says (issue 17): the leaves import nothing under agent/, and the
// standalone API reaches the engine and the cache only through the host.
package layering

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/otherix/otherix-agent/"

// deps is every package pkg imports, directly or not (go list -deps).
func deps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", module+pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	return strings.Fields(string(out))
}

func TestLeavesImportNothingUnderAgent(t *testing.T) {
	for _, leaf := range []string{"qmp", "imagecache", "cloudinit", "systemd"} {
		for _, d := range deps(t, leaf) {
			if strings.HasPrefix(d, module+"agent/") || d == module+"agent" {
				t.Errorf("%s imports %s", leaf, d)
			}
		}
	}
}

func TestStandaloneImportsNeitherEngineNorCache(t *testing.T) {
	for _, d := range deps(t, "agent/standalone") {
		switch d {
		case module + "agent", module + "agent/vm", module + "imagecache":
			t.Errorf("agent/standalone imports %s", d)
		}
	}
}
