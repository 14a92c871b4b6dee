package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/cmd/otherix/internal/client"
)

// waitOpts are the --wait and --wait-timeout flags of async commands.
type waitOpts struct {
	wait    bool
	timeout time.Duration
}

func waitFlags(fs *flag.FlagSet) *waitOpts {
	w := &waitOpts{}
	fs.BoolVar(&w.wait, "wait", false, "block until the task reaches a terminal status")
	fs.DurationVar(&w.timeout, "wait-timeout", defaultWaitTimeout, "max wait when --wait is set (exit status 2 when it runs out)")
	return w
}

// doneWord is what a successful op leaves the VM as: "vm <word> task=<id>".
func doneWord(op string) string {
	switch op {
	case client.OpStop, client.OpPoweroff:
		return "stopped"
	case client.OpDelete:
		return "deleted"
	}
	return "running" // create, start, reboot
}

// vmAsync runs start, stop, poweroff, reboot and delete.
func (c *cli) vmAsync(ctx context.Context, fs *flag.FlagSet, args []string, op string) error {
	var force bool
	switch op {
	case client.OpStop:
		fs.BoolVar(&force, "force", false, "hard poweroff instead of a graceful shutdown (dispatches vm poweroff)")
	case client.OpDelete:
		fs.BoolVar(&force, "force", false, "do not ask for confirmation")
	}
	w := waitFlags(fs)
	name, cl, err := c.open(fs, args, "VM name", func() error { return c.checkWait(w) })
	if err != nil {
		return err
	}
	if op == client.OpDelete && !force {
		if err := c.confirmDelete(name); err != nil {
			return err
		}
	}
	dispatch := op
	if op == client.OpStop && force {
		dispatch = client.OpPoweroff // seed 004: a CLI-level dispatch to poweroff
	}
	t, err := cl.Async(ctx, name, dispatch)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "%s task=%s status=%s\n", dispatch, t.ID, t.Status)
	if !w.wait {
		return nil
	}
	return c.waitTask(ctx, cl, t, doneWord(dispatch), w.timeout)
}

// checkWait validates the wait options before anything is submitted.
func (c *cli) checkWait(w *waitOpts) error {
	if w.timeout <= 0 {
		return &usageError{msg: fmt.Sprintf("--wait-timeout must be positive, got %s", w.timeout)}
	}
	if w.wait {
		if _, err := c.pollInterval(); err != nil {
			return err
		}
	}
	return nil
}

// confirmDelete asks on stderr and reads the answer from stdin, which must
// be a terminal: a script has to say --force.
func (c *cli) confirmDelete(name string) error {
	if !c.isTerminal(c.stdin) {
		return fmt.Errorf("refusing to delete vm %s without confirmation: stdin is not a terminal (pass --force)", name)
	}
	fmt.Fprintf(c.stderr, "Delete vm %s? [y/N] ", name)
	line, _ := bufio.NewReader(c.stdin).ReadString('\n')
	switch strings.ToLower(strings.TrimSpace(line)) {
	case "y", "yes":
		return nil
	}
	return &exitError{code: exitFailure, msg: "delete of vm " + name + " aborted"}
}

// vmSync runs reset, pause and resume and prints the refreshed VM.
func (c *cli) vmSync(ctx context.Context, fs *flag.FlagSet, args []string, op string) error {
	out, check := outputFlag(fs, "text", "json")
	name, cl, err := c.open(fs, args, "VM name", check)
	if err != nil {
		return err
	}
	vm, raw, err := cl.Sync(ctx, name, op)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	fmt.Fprintf(c.stdout, "vm %s status=%s\n", vm.Name, vm.Status)
	return nil
}

// waitTask polls task t until it is terminal, showing progress on stderr
// (see progressLine: one dot per poll unless stderr is a terminal).
// Success prints "vm <done> task=<id>" on stdout; a failed or cancelled
// task and a timeout end the command with a non-zero status. Transient
// errors (network, 429, 5xx) are retried until the timeout.
func (c *cli) waitTask(ctx context.Context, cl *client.Client, t *api.Task, done string, timeout time.Duration) error {
	return c.waitFor(ctx, cl, t, timeout, func(*api.Task) error {
		fmt.Fprintf(c.stdout, "vm %s task=%s\n", done, t.ID)
		return nil
	})
}

// waitFor is waitTask with the success output left to onSuccess, which
// gets the terminal task.
func (c *cli) waitFor(ctx context.Context, cl *client.Client, t *api.Task, timeout time.Duration, onSuccess func(*api.Task) error) error {
	interval, err := c.pollInterval()
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	pl := c.newProgress()
	defer pl.end()
	last, lastErr := t, error(nil)
	for {
		got, err := cl.Task(wctx, t.ID)
		var progress *api.Progress
		if err == nil {
			progress = got.Progress
		}
		pl.poll(progress)
		switch {
		case err == nil:
			last, lastErr = got, nil
			switch got.Status {
			case api.TaskSuccess:
				pl.succeeded()
				pl.end()
				return onSuccess(got)
			case api.TaskFailed:
				pl.end()
				return &exitError{code: exitFailure, msg: fmt.Sprintf("task %s failed: %s", t.ID, taskError(got))}
			case api.TaskCancelled:
				pl.end()
				msg := "task " + t.ID + " cancelled"
				if got.Error != nil {
					msg += ": " + taskError(got)
				}
				return &exitError{code: exitFailure, msg: msg}
			}
		case wctx.Err() != nil:
		case client.Retryable(err):
			lastErr = err
		default:
			return err
		}
		if wctx.Err() == nil {
			select {
			case <-time.After(interval):
			case <-wctx.Done():
			}
		}
		if wctx.Err() != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			pl.end()
			msg := fmt.Sprintf("error: timed out after %s waiting for task %s (status %s); the task goes on, re-run with --wait or poll it", timeout, t.ID, last.Status)
			if lastErr != nil && !errors.Is(lastErr, context.DeadlineExceeded) {
				msg += "; last error: " + lastErr.Error()
			}
			return &exitError{code: exitTimeout, msg: msg}
		}
	}
}

// taskError renders a task's error as "<code>: <message>".
func taskError(t *api.Task) string {
	if t.Error == nil {
		return "internal: the task reported no error"
	}
	return t.Error.Code + ": " + t.Error.Message
}

const vmSetSynopsis = "otherix vm set NAME [--vcpus N] [--memory-mb M] [--cpu-limit C] [--autostart=BOOL] [--restart-policy on-failure|always|never] [--vnc-enabled=BOOL] [--vnc-port P|auto] [--vnc-password-file FILE|-]"

// vmSet is "vm set NAME [--vcpus N] [--memory-mb M] [--cpu-limit C] [--autostart=BOOL] [--restart-policy P] [--vnc-enabled=BOOL] [--vnc-port P|auto] [--vnc-password-file FILE]":
// seed 003's update. CPU, memory and the VNC console of a running VM
// change at its next start; the output says so. The VNC password is read
// from a file or stdin, never from the command line (a secret would show
// in ps and the shell's history).
func (c *cli) vmSet(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "text", "json")
	vcpus := fs.Int("vcpus", 0, "vCPU count (1..128)")
	mem := fs.Int("memory-mb", 0, "memory in MiB (128..524288)")
	cpuLimit := fs.Float64("cpu-limit", 0, "cap the VM's CPU time at this many CPUs (0: no cap)")
	auto := fs.String("autostart", "", "start the VM after a host boot: true or false")
	policy := fs.String("restart-policy", "", "on-failure, always or never")
	vncOn := fs.String("vnc-enabled", "", "turn the VNC console on or off: true or false (on needs --vnc-password-file)")
	vncPort := fs.String("vnc-port", "", "move the VNC console to this `port` (5900..65535), or auto: back to the next free port from 5900")
	vncPwFile := fs.String("vnc-password-file", "", "read the VNC password (at most 8 characters) from this `file`, or - for stdin")
	// update collects the changes the flags ask for; open runs it
	// after the -o check and before it dials.
	var u api.UpdateVM
	update := func() error {
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "vcpus":
				u.VCPUs = vcpus
			case "memory-mb":
				u.MemoryMB = mem
			case "cpu-limit":
				u.CPULimit = cpuLimit
			}
		})
		switch *vncPort {
		case "":
		case "auto":
			u.VNCPortAuto = true
		default:
			p, err := strconv.Atoi(*vncPort)
			if err != nil {
				return &usageError{msg: "--vnc-port takes a port or auto", synopsis: vmSetSynopsis}
			}
			u.VNCPort = &p
		}
		if *vncOn != "" {
			b, err := strconv.ParseBool(*vncOn)
			if err != nil {
				return &usageError{msg: "--vnc-enabled takes true or false", synopsis: vmSetSynopsis}
			}
			u.VNCEnabled = &b
		}
		if *vncPwFile != "" {
			pw, err := c.readSecret(*vncPwFile)
			if err != nil {
				return err
			}
			u.VNCPassword = &pw
		}
		if *auto != "" {
			b, err := strconv.ParseBool(*auto)
			if err != nil {
				return &usageError{msg: "--autostart takes true or false", synopsis: vmSetSynopsis}
			}
			u.Autostart = &b
		}
		if *policy != "" {
			u.RestartPolicy = policy
		}
		if u == (api.UpdateVM{}) {
			return &usageError{msg: "vm set needs --vcpus, --memory-mb, --cpu-limit, --autostart, --restart-policy, --vnc-enabled, --vnc-port or --vnc-password-file", synopsis: vmSetSynopsis}
		}
		return nil
	}
	name, cl, err := c.open(fs, args, "VM name", check, update)
	if err != nil {
		return err
	}
	vm, raw, err := cl.Update(ctx, name, u)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	line := fmt.Sprintf("vm %s vcpus=%d memory_mb=%d autostart=%t restart_policy=%s", vm.Name, vm.VCPUs, vm.MemoryMB, vm.Autostart, vm.RestartPolicy)
	if vm.CPULimit > 0 {
		line += fmt.Sprintf(" cpu_limit=%g", vm.CPULimit)
	}
	line += fmt.Sprintf(" vnc_enabled=%t", vm.VNCEnabled)
	if vm.VNCEnabled {
		line += fmt.Sprintf(" vnc_port=%d", vm.VNCPort)
	}
	if p := vm.PendingChanges; p != nil {
		line += " pending_changes(next start): " + pendingText(p)
	}
	fmt.Fprintln(c.stdout, line)
	return nil
}

// pendingText is a running VM's changes that apply at its next start, as
// "vcpus=N memory_mb=M [cpu_limit=C] [vnc_enabled=B] [vnc_port=P]".
func pendingText(p *api.PendingChanges) string {
	s := fmt.Sprintf("vcpus=%d memory_mb=%d", p.VCPUs, p.MemoryMB)
	if p.CPULimit > 0 {
		s += fmt.Sprintf(" cpu_limit=%g", p.CPULimit)
	}
	if p.VNCEnabled != nil {
		s += fmt.Sprintf(" vnc_enabled=%t", *p.VNCEnabled)
	}
	if p.VNCPort > 0 {
		s += fmt.Sprintf(" vnc_port=%d", p.VNCPort)
	}
	return s
}

// readSecret reads a secret from path (- for stdin): its first line,
// without the line ending, so "echo pw > file" works.
func (c *cli) readSecret(path string) (string, error) {
	var r io.Reader = c.stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return "", err
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, 4096))
	if err != nil {
		return "", err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimSuffix(line, "\r"), nil
}
