package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/cmd/otherix/internal/client"
)

// nodeCommands are "node list|get" and "pool list": the nodes the control
// plane knows (one in standalone mode, every host in cluster mode).
func (c *cli) nodeCommands() []command {
	return []command{
		{"node list", "[-o table|json]", "list the nodes: state, last heartbeat, resources, VM count", c.nodeList, false},
		{"node get", "NAME [-o text|json]", "show a node", c.nodeGet, false},
		{"pool list", "[--node N] [-o table|json]", "list the storage pools of every node with their free space", c.poolList, false},
	}
}

func nodes(ctx context.Context, cl *client.Client) (api.NodeList, []byte, error) {
	var list api.NodeList
	raw, err := cl.GetJSON(ctx, "/v1/nodes", &list)
	return list, raw, err
}

// nodeList is "node list".
func (c *cli) nodeList(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "table", "json")
	_, cl, err := c.open(fs, args, "", check)
	if err != nil {
		return err
	}
	list, raw, err := nodes(ctx, cl)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tLAST HEARTBEAT\tARCH\tACCEL\tCPUS\tMEMORY\tVMS")
	for _, n := range list.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%d\n", n.Name, n.State, ago(n.LastHeartbeat), n.Arch, accel(n.KVM), n.CPUs, humanBytes(n.MemoryMB<<20), n.VMCount)
	}
	return tw.Flush()
}

// nodeGet is "node get NAME".
func (c *cli) nodeGet(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "text", "json")
	name, cl, err := c.open(fs, args, "VM name", check)
	if err != nil {
		return err
	}
	var n api.Node
	raw, err := cl.GetJSON(ctx, "/v1/nodes/"+url.PathEscape(name), &n)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	for _, kv := range [][2]string{
		{"name", n.Name}, {"state", n.State}, {"last heartbeat", ago(n.LastHeartbeat)},
		{"agent", n.AgentVersion}, {"arch", n.Arch}, {"accel", accel(n.KVM)}, {"guest arches", strings.Join(n.Arches, ", ")},
		{"cpus", fmt.Sprint(n.CPUs)}, {"memory", humanBytes(n.MemoryMB << 20)}, {"vms", fmt.Sprint(n.VMCount)},
		{"networks", strings.Join(n.Networks, ", ")},
	} {
		fmt.Fprintf(tw, "%s:\t%s\n", kv[0], kv[1])
	}
	for _, p := range n.Pools {
		fmt.Fprintf(tw, "pool %s:\t%s free of %s\n", p.Name, humanBytes(p.FreeBytes), humanBytes(p.TotalBytes))
	}
	return tw.Flush()
}

// poolList is "pool list": every node's pools.
func (c *cli) poolList(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "table", "json")
	node := fs.String("node", "", "only this `node`'s pools")
	_, cl, err := c.open(fs, args, "", check)
	if err != nil {
		return err
	}
	list, _, err := nodes(ctx, cl)
	if err != nil {
		return err
	}
	pools := []api.NodePool{}
	for _, n := range list.Nodes {
		if *node == "" || n.Name == *node {
			pools = append(pools, n.Pools...)
		}
	}
	if *out == "json" {
		b, err := json.Marshal(struct {
			Pools []api.NodePool `json:"pools"`
		}{pools})
		if err != nil {
			return err
		}
		return c.writeRaw(append(b, '\n'))
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tPOOL\tFREE\tTOTAL")
	for _, p := range pools {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Node, p.Name, humanBytes(p.FreeBytes), humanBytes(p.TotalBytes))
	}
	return tw.Flush()
}

func accel(kvm bool) string {
	if kvm {
		return "kvm"
	}
	return "tcg"
}

// ago renders a time as an age ("12s ago"); "-" for none.
func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}
