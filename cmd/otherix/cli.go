package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/otherix/otherix-agent/cmd/otherix/internal/client"
)

const (
	defaultServer       = "http://127.0.0.1:7480"
	defaultPollInterval = time.Second
	defaultWaitTimeout  = 5 * time.Minute
	// requestTimeout bounds one HTTP exchange (not a whole --wait).
	requestTimeout = time.Minute
)

// Exit statuses (documented in the package comment).
const (
	exitOK      = 0
	exitFailure = 1
	exitTimeout = 2
)

// Environment variables.
const (
	envURL          = "OTHERIX_URL"
	envToken        = "OTHERIX_TOKEN"
	envCAFile       = "OTHERIX_CA_FILE"
	envPollInterval = "OTHERIX_POLL_INTERVAL"
)

// exitError ends the command with status code after printing msg (when
// not empty) verbatim on stderr.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

// usageError is bad command-line usage; it prints the command's synopsis.
type usageError struct {
	msg      string
	synopsis string
}

func (e *usageError) Error() string { return e.msg }

// cli is one invocation of otherix: its stdio, environment and the global
// flags, which may be given before the command or among its flags.
type cli struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	env            func(string) string
	// isTerminal reports whether r is an interactive terminal (the delete
	// confirmation needs one).
	isTerminal func(r io.Reader) bool
	// outTerminal, when set, reports whether w (stdout) is a terminal
	// (vm top redraws in place there); nil checks for a character device.
	outTerminal func(w io.Writer) bool

	server    string
	tokenFile string
	caFile    string
	// defaultTokenFile is read when neither --token-file nor $OTHERIX_TOKEN
	// gives a token (run sets defaultTokenPath).
	defaultTokenFile string
}

// DefaultTokenFile is where the agent keeps its API token when the config
// names none: <data_dir>/api.token with the default data_dir.
const DefaultTokenFile = "/var/lib/otherix/api.token"

// defaultTokenPath is DefaultTokenFile; tests point it elsewhere.
var defaultTokenPath = DefaultTokenFile

// run is the whole CLI: main calls it with the process's arguments (without
// the program name), stdio and os.Getenv, and exits with its result.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer, env func(string) string) int {
	c := &cli{stdin: stdin, stdout: stdout, stderr: stderr, env: env, isTerminal: isTerminal, defaultTokenFile: defaultTokenPath}
	return c.main(context.Background(), args)
}

// isTerminal reports whether r is a character device, i.e. a terminal.
func isTerminal(r io.Reader) bool {
	f, ok := r.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func (c *cli) main(ctx context.Context, args []string) int {
	err := c.dispatch(ctx, args)
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.msg != "" {
			fmt.Fprintln(c.stderr, ee.msg)
		}
		return ee.code
	}
	fmt.Fprintln(c.stderr, "error: "+err.Error())
	var ue *usageError
	if errors.As(err, &ue) && ue.synopsis != "" {
		fmt.Fprintln(c.stderr, "usage: "+ue.synopsis)
	}
	return exitFailure
}

// command is one otherix command. path is its words ("vm create").
type command struct {
	path     string
	args     string // synopsis after the path
	summary  string
	run      func(ctx context.Context, fs *flag.FlagSet, args []string) error
	flagless bool // takes no flags (version)
}

func (cmd command) synopsis() string {
	s := "otherix " + cmd.path
	if cmd.args != "" {
		s += " " + cmd.args
	}
	return s
}

func (c *cli) commands() []command {
	async := func(op string) func(context.Context, *flag.FlagSet, []string) error {
		return func(ctx context.Context, fs *flag.FlagSet, args []string) error { return c.vmAsync(ctx, fs, args, op) }
	}
	sync := func(op string) func(context.Context, *flag.FlagSet, []string) error {
		return func(ctx context.Context, fs *flag.FlagSet, args []string) error { return c.vmSync(ctx, fs, args, op) }
	}
	cmds := []command{
		{"vm create", "NAME --image-url URL --arch amd64|arm64 [flags] [--wait]", "create a VM from an image URL (async)", c.vmCreate, false},
		{"vm list", "[--show-ids] [-o table|json|yaml] [--limit N] [--cursor C] [--pool P] [--node N] [--status S]", "list VMs", c.vmList, false},
		{"vm get", "NAME [-o text|json|yaml]", "show a VM; -o yaml prints a manifest for 'otherix create -f'", c.vmGet, false},
		{"vm start", "NAME [--wait] [--wait-timeout 5m]", "boot a stopped VM (async)", async(client.OpStart), false},
		{"vm stop", "NAME [--force] [--wait] [--wait-timeout 5m]", "graceful ACPI shutdown; --force is a hard poweroff (async)", async(client.OpStop), false},
		{"vm poweroff", "NAME [--wait] [--wait-timeout 5m]", "hard power-off (async)", async(client.OpPoweroff), false},
		{"vm reboot", "NAME [--wait] [--wait-timeout 5m]", "graceful stop+start cycle (async)", async(client.OpReboot), false},
		{"vm delete", "NAME [--force] [--wait] [--wait-timeout 5m]", "tear down and delete; asks first unless --force (async)", async(client.OpDelete), false},
		{"vm reset", "NAME [-o text|json]", "press the reset button (sync)", sync(client.OpReset), false},
		{"vm pause", "NAME [-o text|json]", "freeze the vCPUs (sync)", sync(client.OpPause), false},
		{"vm resume", "NAME [-o text|json]", "continue a paused VM (sync)", sync(client.OpResume), false},
		{"vm console", "NAME [--tail N]", "print the serial console log", c.vmConsole, false},
		{"vm stats", "NAME [-o text|json]", "show what the VM uses: CPU, memory, disk and network", c.vmStats, false},
		{"vm top", "[--interval 2s] [-o table|json]", "the host's VMs by CPU, refreshed on a terminal (one snapshot when piped)", c.vmTop, false},
		{"vm events", "NAME [-o table|json]", "print the VM's history: starts, stops, guest shutdowns, crashes, restarts", c.vmEvents, false},
		{"vm screenshot", "NAME FILE.png", "save a PNG of the VM's display (vnc_enabled VMs)", c.vmScreenshot, false},
		{"vm attach-disk", "NAME SOURCE [--readonly] [--storage-pool P]", "attach a volume or allowed path (at once when the VM runs)", c.vmDisk(true), false},
		{"vm detach-disk", "NAME SOURCE [--storage-pool P]", "detach a disk (at once when it was attached while running)", c.vmDisk(false), false},
		{"vm cdrom", "NAME INDEX [SOURCE]", "change (or without SOURCE eject) the medium of CD-ROM INDEX", c.vmCDROM, false},
		{"vm set", "NAME [--vcpus N] [--memory-mb M] [--cpu-limit C] [--autostart=BOOL] [--restart-policy P] [--vnc-enabled=BOOL] [--vnc-port P|auto] [--vnc-password-file FILE|-] [-o text|json]", "change CPU, memory, CPU cap, VNC console (at the next start if running), VNC password, autostart or the restart policy", c.vmSet, false},
		{"create", "-f FILE [--wait] [--wait-timeout 5m]", "create a VM from a YAML manifest (- for stdin)", c.createManifest, false},
	}
	cmds = append(cmds, c.imageCommands()...)
	cmds = append(cmds, c.taskCommands()...)
	cmds = append(cmds,
		command{"volume create", "NAME --size-gib N [--pool P]", "create an empty qcow2 volume in a pool", c.volumeCreate, false},
		command{"volume list", "[--pool P] [-o table|json]", "list a pool's volumes", c.volumeList, false},
		command{"volume delete", "NAME [--pool P]", "delete a volume no VM uses", c.volumeDelete, false},
	)
	cmds = append(cmds, c.nodeCommands()...)
	cmds = append(cmds, command{"firmware list", "[--arch amd64|arm64] [-o table|json]", "list the firmware catalogue per arch", c.firmwareList, false})
	return append(cmds, command{"version", "", "print the version", c.version, true})
}

func (c *cli) usage(w io.Writer) {
	fmt.Fprintln(w, "usage: otherix [--server URL] [--token-file PATH] COMMAND [ARGS] [FLAGS]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "commands:")
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	for _, cmd := range c.commands() {
		fmt.Fprintf(tw, "  %s\t%s\n", cmd.path, cmd.summary)
	}
	tw.Flush()
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Flags may follow the VM name. Run 'otherix COMMAND -h' for a command's flags.")
	fmt.Fprintf(w, "Server: --server, $%s, default %s. Token: --token-file, $%s, default %s when readable.\n", envURL, defaultServer, envToken, DefaultTokenFile)
	fmt.Fprintf(w, "An https server's CA: --ca-file, $%s, else the system's roots.\n", envCAFile)
	fmt.Fprintln(w, "Exit status: 0 ok, 1 error or failed task, 2 --wait timed out.")
}

func (c *cli) dispatch(ctx context.Context, args []string) error {
	top := flag.NewFlagSet("otherix", flag.ContinueOnError)
	top.SetOutput(io.Discard)
	c.globalFlags(top)
	showVersion := top.Bool("version", false, "print the version")
	if err := top.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			c.usage(c.stdout)
			return err
		}
		return &usageError{msg: err.Error(), synopsis: "otherix [--server URL] [--token-file PATH] COMMAND [ARGS] (see otherix help)"}
	}
	if *showVersion {
		return c.version(ctx, nil, nil)
	}
	rest := top.Args()
	if len(rest) == 0 {
		c.usage(c.stderr)
		return &exitError{code: exitFailure}
	}
	if rest[0] == "help" {
		c.usage(c.stdout)
		return nil
	}
	words := 1
	if rest[0] == "vm" {
		if len(rest) < 2 {
			return &usageError{msg: "vm needs a subcommand", synopsis: "otherix vm create|list|get|start|stop|poweroff|reboot|delete|reset|pause|resume|console ... (see otherix help)"}
		}
		words = 2
	}
	if rest[0] == "volume" {
		if len(rest) < 2 {
			return &usageError{msg: "volume needs a subcommand", synopsis: "otherix volume create|list|delete ..."}
		}
		words = 2
	}
	if rest[0] == "node" || rest[0] == "pool" {
		if len(rest) < 2 {
			return &usageError{msg: rest[0] + " needs a subcommand", synopsis: "otherix node list|get ..., otherix pool list"}
		}
		words = 2
	}
	if rest[0] == "firmware" {
		if len(rest) < 2 {
			return &usageError{msg: "firmware needs a subcommand", synopsis: "otherix firmware list [-o table|json]"}
		}
		words = 2
	}
	if rest[0] == "image" {
		if len(rest) < 2 {
			return &usageError{msg: "image needs a subcommand", synopsis: "otherix image list|pull ... (see otherix help)"}
		}
		words = 2
	}
	if rest[0] == "task" {
		if len(rest) < 2 {
			return &usageError{msg: "task needs a subcommand", synopsis: "otherix task list|get|cancel ... (see otherix help)"}
		}
		words = 2
	}
	path := strings.Join(rest[:words], " ")
	for _, cmd := range c.commands() {
		if cmd.path != path {
			continue
		}
		fs := flag.NewFlagSet(cmd.path, flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		fs.Usage = func() {
			fmt.Fprintf(fs.Output(), "usage: %s\n\n%s\n", cmd.synopsis(), cmd.summary)
			if !cmd.flagless {
				fmt.Fprintln(fs.Output(), "\nflags:")
				printFlags(fs)
			}
		}
		if !cmd.flagless {
			c.globalFlags(fs)
		}
		return cmd.run(ctx, fs, rest[words:])
	}
	return &usageError{msg: fmt.Sprintf("unknown command %q", path), synopsis: "otherix COMMAND (see otherix help)"}
}

// printFlags lists fs's flags GNU-style: --name for long names, -o for
// one-letter ones.
func printFlags(fs *flag.FlagSet) {
	w := fs.Output()
	fs.VisitAll(func(f *flag.Flag) {
		dash := "--"
		if len(f.Name) == 1 {
			dash = "-"
		}
		arg, usage := flag.UnquoteUsage(f)
		line := "  " + dash + f.Name
		if arg != "" {
			line += " " + arg
		}
		line += "\n    \t" + usage
		if d := f.DefValue; d != "" && d != "0" && d != "false" {
			line += fmt.Sprintf(" (default %s)", d)
		}
		fmt.Fprintln(w, line)
	})
}

// globalFlags registers the flags every command accepts.
func (c *cli) globalFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.server, "server", c.server, "API server `URL`: http(s)://HOST:PORT, or unix:///run/otherix/api.sock (default $"+envURL+" or "+defaultServer+")")
	fs.StringVar(&c.tokenFile, "token-file", c.tokenFile, "`file` holding the bearer token (default: the token in $"+envToken+", else "+DefaultTokenFile+" when readable)")
	fs.StringVar(&c.caFile, "ca-file", c.caFile, "PEM `file` of the CA that signed an https server's certificate (default $"+envCAFile+", else the system's)")
}

// parse parses args into fs and returns the positional arguments. Flags
// may come before, between or after positional arguments; "--" ends flags.
func (c *cli) parse(fs *flag.FlagSet, args []string) ([]string, error) {
	flags, pos := splitArgs(fs, args)
	if err := fs.Parse(flags); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(c.stdout)
			fs.Usage()
			return nil, err
		}
		return nil, c.usageErr(fs, "%s", err)
	}
	return append(pos, fs.Args()...), nil
}

// splitArgs separates flags (with their values) from positional arguments
// so that the flag package, which stops at the first positional argument,
// sees every flag.
func splitArgs(fs *flag.FlagSet, args []string) (flags, pos []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return flags, append(pos, args[i+1:]...)
		}
		if len(a) < 2 || a[0] != '-' {
			pos = append(pos, a)
			continue
		}
		flags = append(flags, a)
		name := strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		if strings.Contains(name, "=") {
			continue
		}
		f := fs.Lookup(name)
		if f == nil {
			continue // fs.Parse reports it
		}
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
			continue
		}
		if i+1 < len(args) {
			i++
			flags = append(flags, args[i])
		}
	}
	return flags, pos
}

func (c *cli) usageErr(fs *flag.FlagSet, format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...), synopsis: "otherix " + fs.Name() + " ... (see otherix " + fs.Name() + " -h)"}
}

// name parses args and returns the single NAME argument.
func (c *cli) name(fs *flag.FlagSet, args []string) (string, error) {
	return c.one(fs, args, "VM name")
}

// one parses args and returns the single positional argument, called what
// ("VM name", "task id") in the usage errors.
func (c *cli) one(fs *flag.FlagSet, args []string, what string) (string, error) {
	pos, err := c.parse(fs, args)
	if err != nil {
		return "", err
	}
	switch {
	case len(pos) == 0 || pos[0] == "":
		return "", c.usageErr(fs, "missing %s", what)
	case len(pos) > 1:
		return "", c.usageErr(fs, "unexpected arguments after the %s: %s", what, strings.Join(pos[1:], " "))
	}
	return pos[0], nil
}

// open is a command's opening: it parses args into fs, takes the one
// positional argument called what (none when what is ""), runs checks in
// order (the -o check from outputFlag, flag values) and only then dials
// the API. It returns the argument and the client.
func (c *cli) open(fs *flag.FlagSet, args []string, what string, checks ...func() error) (string, *client.Client, error) {
	var arg string
	var err error
	if what == "" {
		err = c.none(fs, args)
	} else {
		arg, err = c.one(fs, args, what)
	}
	for _, check := range checks {
		if err != nil {
			return "", nil, err
		}
		err = check()
	}
	if err != nil {
		return "", nil, err
	}
	cl, err := c.client()
	if err != nil {
		return "", nil, err
	}
	return arg, cl, nil
}

// none parses args and refuses positional arguments.
func (c *cli) none(fs *flag.FlagSet, args []string) error {
	pos, err := c.parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return c.usageErr(fs, "unexpected arguments: %s", strings.Join(pos, " "))
	}
	return nil
}

// outputFlag registers -o/--output with the allowed formats, the first
// being the default, and returns a check to call after parsing.
func outputFlag(fs *flag.FlagSet, formats ...string) (*string, func() error) {
	o := new(string)
	usage := "output format: " + strings.Join(formats, ", ")
	fs.StringVar(o, "o", formats[0], usage)
	fs.StringVar(o, "output", formats[0], usage)
	return o, func() error {
		for _, f := range formats {
			if *o == f {
				return nil
			}
		}
		return &usageError{msg: fmt.Sprintf("unknown output format %q: want %s", *o, strings.Join(formats, ", "))}
	}
}

// client returns an API client for the resolved server and token.
func (c *cli) client() (*client.Client, error) {
	server := c.server
	if server == "" {
		server = c.env(envURL)
	}
	if server == "" {
		server = defaultServer
	}
	hc := &http.Client{Timeout: requestTimeout}
	// unix:///run/otherix/api.sock: the agent's unix socket, guarded by
	// its file mode instead of a token.
	if sock, ok := strings.CutPrefix(server, "unix://"); ok {
		if !filepath.IsAbs(sock) {
			return nil, fmt.Errorf("invalid server URL %q: want unix:///ABSOLUTE/PATH", server)
		}
		hc.Transport = &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}
		server = "http://unix"
	}
	u, err := url.Parse(server)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("invalid server URL %q: want http://HOST:PORT or unix:///PATH", server)
	}
	token := ""
	if c.tokenFile != "" {
		b, err := os.ReadFile(c.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("read token file: %w", err)
		}
		if token = strings.TrimSpace(string(b)); token == "" {
			return nil, fmt.Errorf("token file %s is empty", c.tokenFile)
		}
	} else if token = strings.TrimSpace(c.env(envToken)); token == "" {
		// The agent's own token file, readable by root: what a local
		// administrator uses without configuring anything.
		if b, err := os.ReadFile(c.defaultTokenFile); err == nil {
			token = strings.TrimSpace(string(b))
		}
	}
	caFile := c.caFile
	if caFile == "" {
		caFile = c.env(envCAFile)
	}
	if caFile != "" {
		if u.Scheme != "https" {
			return nil, fmt.Errorf("a CA file is for https servers, not %s", server)
		}
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("read CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("CA file %s holds no PEM certificate", caFile)
		}
		hc.Transport = &http.Transport{Proxy: http.ProxyFromEnvironment,
			TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	}
	return &client.Client{
		BaseURL:   strings.TrimRight(server, "/"),
		Token:     token,
		UserAgent: "otherix/" + moduleVersion(),
		HTTP:      hc,
	}, nil
}

// pollInterval is how often --wait polls a task.
func (c *cli) pollInterval() (time.Duration, error) {
	s := c.env(envPollInterval)
	if s == "" {
		return defaultPollInterval, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("invalid %s %q: want a positive duration such as 500ms", envPollInterval, s)
	}
	return d, nil
}
