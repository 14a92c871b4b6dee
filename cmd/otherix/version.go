package main

import (
	"context"
	"flag"
	"fmt"
	"runtime/debug"
)

// moduleVersion is the main module's version: a tag such as v0.3.0 for
// 'go install ...@v0.3.0' builds, "(devel)" for builds from a checkout.
func moduleVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "(unknown)"
}

// versionString is "otherix VERSION revision=REV[ modified] GOVERSION",
// from the build info the go command stamps into the binary.
func versionString() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "otherix (unknown)"
	}
	rev, modified := "unknown", false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	s := fmt.Sprintf("otherix %s revision=%s", moduleVersion(), rev)
	if modified {
		s += " modified"
	}
	return s + " " + bi.GoVersion
}

// version is "otherix version" (and "otherix --version").
func (c *cli) version(ctx context.Context, fs *flag.FlagSet, args []string) error {
	if fs != nil {
		if err := c.none(fs, args); err != nil {
			return err
		}
	}
	fmt.Fprintln(c.stdout, versionString())
	return nil
}
