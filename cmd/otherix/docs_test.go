package main

import (
	"bytes"
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestDocsNameRealCommands holds the README and the docs to the CLI: every
// `otherix ...` they show names a command that exists (a|b alternatives
// each), and every flag it shows is one that command (or every command)
// takes.
func TestDocsNameRealCommands(t *testing.T) {
	c := &cli{}
	paths := map[string]bool{}
	for _, cmd := range c.commands() {
		paths[cmd.path] = true
	}
	span := regexp.MustCompile("`otherix(?:\\s[^`]*)?`")
	checked := 0
	for _, doc := range []string{"../../README.md", "../../docs/api.md", "../../docs/cluster.md"} {
		b, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range span.FindAllString(string(b), -1) {
			words := strings.Fields(strings.Trim(s, "`"))[1:]
			if len(words) == 0 {
				continue
			}
			// Global flags first: --server URL, --token-file F, --ca-file F.
			for len(words) > 0 && strings.HasPrefix(words[0], "-") {
				if !globalFlag(words[0]) {
					t.Errorf("%s: %s: %s is not a global flag", doc, s, words[0])
				}
				words = words[1:]
				if len(words) > 0 && !strings.HasPrefix(words[0], "-") {
					words = words[1:]
				}
			}
			if len(words) == 0 {
				continue
			}
			for _, path := range commandPaths(words, paths) {
				if path == "" {
					t.Errorf("%s: %s names no otherix command", doc, s)
					continue
				}
				help := commandHelp(t, path)
				for _, w := range words {
					f := docFlag(w)
					if f == "" || globalFlag("--"+f) || f == "h" || f == "help" {
						continue
					}
					if !regexp.MustCompile(`\n  --?` + regexp.QuoteMeta(f) + `\b`).MatchString(help) {
						t.Errorf("%s: %s: otherix %s has no flag -%s", doc, s, path, f)
					}
				}
				checked++
			}
		}
	}
	if checked < 20 {
		t.Errorf("only %d otherix commands found in the docs", checked)
	}
}

// commandPaths are the commands words names: "vm attach-disk|detach-disk"
// is two, "otherix vm" alone none (a group); "" for each that is not one.
func commandPaths(words []string, paths map[string]bool) []string {
	var out []string
	for _, w0 := range strings.Split(words[0], "|") {
		switch {
		case paths[w0]:
			out = append(out, w0)
		case !hasPrefixPath(w0, paths):
			out = append(out, "")
		case len(words) > 1 && !strings.HasPrefix(words[1], "-"):
			for _, w1 := range strings.Split(words[1], "|") {
				if paths[w0+" "+w1] {
					out = append(out, w0+" "+w1)
				} else {
					out = append(out, "")
				}
			}
		}
	}
	return out
}

func hasPrefixPath(group string, paths map[string]bool) bool {
	for p := range paths {
		if strings.HasPrefix(p, group+" ") {
			return true
		}
	}
	return false
}

// docFlag is the flag a word of a synopsis shows ("[--vm", "--autostart=BOOL"
// give "vm", "autostart"), or "".
func docFlag(w string) string {
	w = strings.TrimLeft(w, "[")
	if !strings.HasPrefix(w, "-") || w == "-" {
		return ""
	}
	w = strings.TrimLeft(w, "-")
	w, _, _ = strings.Cut(w, "=")
	return strings.TrimRight(w, "]),.;")
}

func globalFlag(w string) bool {
	switch docFlag(w) {
	case "server", "token-file", "ca-file":
		return true
	}
	return false
}

// commandHelp is what "otherix PATH -h" prints.
func commandHelp(t *testing.T, path string) string {
	t.Helper()
	var out, errb bytes.Buffer
	args := append(strings.Fields(path), "-h")
	if code := run(args, strings.NewReader(""), &out, &errb, func(string) string { return "" }); code != 0 {
		t.Fatalf("otherix %s -h: exit %d: %s", path, code, errb.String())
	}
	return "\n" + out.String() + errb.String()
}
