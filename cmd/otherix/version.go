package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/otherix/otherix-agent/internal/buildinfo"
)

// moduleVersion is the binary's version token (internal/buildinfo).
func moduleVersion() string { return buildinfo.Read().Version }

// versionString is the --version line, from the binary's build info.
func versionString() string { return buildinfo.Read().String("otherix") }

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
