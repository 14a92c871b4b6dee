package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/otherix/otherix-agent/agent/config"
	"github.com/otherix/otherix-agent/agent/doctor"
)

// doctorCmd is "otherix-agent doctor [--config PATH] [-o table|json]": it
// checks this host against the config and exits 1 when a check fails, 2
// on bad usage.
func doctorCmd(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return runDoctor(ctx, args, stdout, stderr, doctor.Host())
}

func runDoctor(ctx context.Context, args []string, stdout, stderr io.Writer, env doctor.Env) int {
	fs := flag.NewFlagSet("otherix-agent doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "config file (default "+config.DefaultPath+" when it exists)")
	out := fs.String("o", "table", "output format: table or json")
	fs.StringVar(out, "output", "table", "output format: table or json")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "unexpected argument %q\nusage: otherix-agent doctor [--config PATH] [-o table|json]\n", fs.Arg(0))
		return 2
	}
	write := doctor.WriteTable
	switch *out {
	case "table":
	case "json":
		write = doctor.WriteJSON
	default:
		fmt.Fprintf(stderr, "unknown output format %q: want table or json\n", *out)
		return 2
	}

	cfg, first := doctorConfig(*path)
	rs := []doctor.Result{first}
	if cfg != nil {
		rs = append(rs, doctor.Run(ctx, cfg, env)...)
	}
	if err := write(stdout, rs); err != nil {
		fmt.Fprintln(stderr, "otherix-agent doctor:", err)
		return 1
	}
	if doctor.Worst(rs) == doctor.Fail {
		return 1
	}
	return 0
}

// doctorConfig loads the config as the daemon would and returns it with
// the first row: which config the checks use, or why it cannot be loaded
// (then no other check runs).
func doctorConfig(path string) (*config.Config, doctor.Result) {
	r := doctor.Result{Check: "config"}
	shown := path
	if shown == "" {
		shown = config.DefaultPath
		if _, err := os.Stat(shown); err != nil {
			shown = "built-in defaults (no " + config.DefaultPath + ")"
		}
	}
	cfg, err := loadConfig(path, "", "")
	if err != nil {
		r.Status, r.Detail = doctor.Fail, err.Error()
		r.Fix = "correct the config; otherix-agent config check PATH shows every error"
		return nil, r
	}
	r.Status, r.Detail = doctor.OK, shown
	return cfg, r
}
