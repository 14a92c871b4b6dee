// Command otherix-agent is the per-host node agent of the otherix VM
// platform. See README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/internal/buildinfo"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func usage(w io.Writer) {
	fmt.Fprint(w, `usage:
  otherix-agent [--config PATH] [--standalone] [--data-dir DIR] [--listen HOST:PORT]
  otherix-agent config check PATH
  otherix-agent config show [--config PATH] [--data-dir DIR]
  otherix-agent doctor [--config PATH] [-o table|json]
  otherix-agent version | --version
`)
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "version", "--version", "-version":
			fmt.Fprintln(stdout, versionString())
			return 0
		case "config":
			return configCmd(args[1:], stdout, stderr)
		case "doctor":
			return doctorCmd(args[1:], stdout, stderr)
		case "help", "-h", "--help":
			usage(stdout)
			return 0
		}
	}
	fs := flag.NewFlagSet("otherix-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o daemonOptions
	fs.StringVar(&o.configPath, "config", "", "config file (default "+config.DefaultPath+" when it exists)")
	fs.BoolVar(&o.standalone, "standalone", false, "run with an in-process single-node control plane and the /v1 API")
	fs.StringVar(&o.dataDir, "data-dir", "", "data directory (overrides the config's data_dir)")
	fs.StringVar(&o.listen, "listen", "", "standalone API address HOST:PORT (overrides listen.api)")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "unexpected argument %q\n", fs.Arg(0))
		usage(stderr)
		return 2
	}
	cfg, err := loadConfig(o.configPath, o.dataDir, o.listen)
	if err != nil {
		fmt.Fprintln(stderr, "otherix-agent:", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := runDaemon(ctx, cfg, o, stderr); err != nil {
		fmt.Fprintln(stderr, "otherix-agent:", err)
		return 1
	}
	return 0
}

type daemonOptions struct {
	configPath, dataDir, listen string
	standalone, version         bool
}

// loadConfig reads the config file (the default path only when it exists)
// and applies flag overrides.
func loadConfig(path, dataDir, listen string) (*config.Config, error) {
	var cfg *config.Config
	switch {
	case path != "":
		c, err := config.Load(path)
		if err != nil {
			return nil, err
		}
		cfg = c
	default:
		if _, err := os.Stat(config.DefaultPath); err == nil {
			c, err := config.Load(config.DefaultPath)
			if err != nil {
				return nil, err
			}
			cfg = c
		} else {
			cfg = config.Default(dataDir)
		}
	}
	if dataDir != "" {
		abs, err := filepath.Abs(dataDir)
		if err != nil {
			return nil, err
		}
		old := cfg.DataDir
		cfg.DataDir = abs
		// Pools under the old data dir move with it.
		for name, p := range cfg.Pools {
			if rel, err := filepath.Rel(old, p.Path); err == nil && filepath.IsLocal(rel) {
				p.Path = filepath.Join(abs, rel)
				cfg.Pools[name] = p
			}
		}
	}
	if listen != "" {
		cfg.Listen.API = listen
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return cfg, nil
}

func configCmd(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "check":
		if len(args) != 2 {
			fmt.Fprintln(stderr, "usage: otherix-agent config check PATH")
			return 2
		}
		if _, err := config.Load(args[1]); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		fmt.Fprintf(stdout, "%s: ok\n", args[1])
		return 0
	case "show":
		fs := flag.NewFlagSet("config show", flag.ContinueOnError)
		fs.SetOutput(stderr)
		path := fs.String("config", "", "config file")
		dataDir := fs.String("data-dir", "", "data directory")
		if err := fs.Parse(args[1:]); err != nil {
			return 2
		}
		cfg, err := loadConfig(*path, *dataDir, "")
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		b, err := cfg.Redacted()
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		stdout.Write(b)
		return 0
	}
	usage(stderr)
	return 2
}

// versionString is the --version line, from the binary's build info.
func versionString() string { return buildinfo.Read().String("otherix-agent") }
