package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
)

// The task API:
//
//	GET  /v1/tasks?vm=NAME&limit=N -> 200 {"tasks": [task, ...]}, newest first
//	GET  /v1/tasks/{id}            -> 200 task
//	POST /v1/tasks/{id}/cancel     -> 200 the cancelled task; 409 conflict past its point of no return

// taskCommands are the "task" commands.
func (c *cli) taskCommands() []command {
	return []command{
		{"task list", "[--vm NAME] [--limit N] [-o table|json]", "list tasks, newest first", c.taskList, false},
		{"task get", "ID [-o text|json]", "show a task: status, progress, error, result", c.taskGet, false},
		{"task cancel", "ID [-o text|json]", "cancel a task not yet started (pending, or queued behind another) or a create or pull still downloading", c.taskCancel, false},
	}
}

// taskList is "otherix task list".
func (c *cli) taskList(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "table", "json")
	vm := fs.String("vm", "", "only the tasks of the VM `NAME`")
	limit := fs.Int("limit", 0, "at most `N` tasks (server default 100)")
	_, cl, err := c.open(fs, args, "", check)
	if err != nil {
		return err
	}
	q := url.Values{}
	if *vm != "" {
		q.Set("vm", *vm)
	}
	if *limit != 0 {
		q.Set("limit", strconv.Itoa(*limit))
	}
	var list struct {
		Tasks []api.Task `json:"tasks"`
	}
	raw, err := cl.DoJSON(ctx, http.MethodGet, "/v1/tasks", q, nil, &list)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTYPE\tVM\tSTATUS\tCREATED\tERROR")
	for _, t := range list.Tasks {
		e := ""
		if t.Error != nil {
			e = t.Error.Code
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", t.ID, t.Type, dash(t.VMName), t.Status, t.CreatedAt.Format(time.RFC3339), e)
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// taskGet is "otherix task get ID".
func (c *cli) taskGet(ctx context.Context, fs *flag.FlagSet, args []string) error {
	return c.taskDo(ctx, fs, args, http.MethodGet, "")
}

// taskCancel is "otherix task cancel ID".
func (c *cli) taskCancel(ctx context.Context, fs *flag.FlagSet, args []string) error {
	return c.taskDo(ctx, fs, args, http.MethodPost, "/cancel")
}

// taskDo sends method to /v1/tasks/ID+suffix and prints the task.
func (c *cli) taskDo(ctx context.Context, fs *flag.FlagSet, args []string, method, suffix string) error {
	out, check := outputFlag(fs, "text", "json")
	id, cl, err := c.open(fs, args, "task id", check)
	if err != nil {
		return err
	}
	var t api.Task
	raw, err := cl.DoJSON(ctx, method, "/v1/tasks/"+url.PathEscape(id)+suffix, nil, nil, &t)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	c.writeTask(t)
	return nil
}

// writeTask prints a task as "key: value" lines.
func (c *cli) writeTask(t api.Task) {
	fmt.Fprintf(c.stdout, "id: %s\ntype: %s\nvm: %s\nstatus: %s\ncreated: %s\nupdated: %s\n",
		t.ID, t.Type, dash(t.VMName), t.Status, t.CreatedAt.Format(time.RFC3339), t.UpdatedAt.Format(time.RFC3339))
	if p := t.Progress; p != nil {
		fmt.Fprintf(c.stdout, "progress: %s %d/%d\n", p.Phase, p.Done, p.Total)
	}
	if t.Error != nil {
		fmt.Fprintf(c.stdout, "error: %s: %s\n", t.Error.Code, t.Error.Message)
	}
	if t.Result != nil {
		fmt.Fprintf(c.stdout, "result: vm %s %s\n", t.Result.Name, t.Result.Status)
	}
	if o := t.Output; o != nil {
		switch {
		case o.Volume != nil:
			fmt.Fprintf(c.stdout, "result: volume %s in pool %s\n", o.Volume.Name, o.Volume.Pool)
		case o.Image != nil:
			fmt.Fprintf(c.stdout, "result: image %s in pool %s\n", o.Image.Digest, o.Image.Pool)
		case o.Screenshot != nil:
			fmt.Fprintf(c.stdout, "result: %s screenshot of %d bytes\n", o.Screenshot.Format, len(o.Screenshot.Data))
		case o.Console != nil:
			b, _ := json.Marshal(o.Console.Data)
			fmt.Fprintf(c.stdout, "result: console bytes %d..%d: %s\n", o.Console.Offset, o.Console.Size, b)
		}
	}
}
