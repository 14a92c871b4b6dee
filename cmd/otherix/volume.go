package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"

	"github.com/otherix/otherix-agent/agent/api"
)

// volumeCreate is "volume create NAME --size-gib N [--pool P]".
func (c *cli) volumeCreate(ctx context.Context, fs *flag.FlagSet, args []string) error {
	size := fs.Int("size-gib", 0, "size in GiB")
	pool := fs.String("pool", "", "pool (default: the default pool)")
	name, err := c.name(fs, args)
	if err != nil {
		return err
	}
	cl, err := c.client()
	if err != nil {
		return err
	}
	var v api.Volume
	if _, err := cl.DoJSON(ctx, http.MethodPost, "/v1/volumes", nil, api.CreateVolume{Name: name, Pool: *pool, SizeGiB: *size}, &v); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "volume %s created pool=%s size_gib=%d\n", v.Name, v.Pool, *size)
	return nil
}

// volumeList is "volume list [--pool P] [-o table|json]".
func (c *cli) volumeList(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "table", "json")
	pool := fs.String("pool", "", "pool (default: the default pool)")
	if err := c.none(fs, args); err != nil {
		return err
	}
	if err := check(); err != nil {
		return err
	}
	cl, err := c.client()
	if err != nil {
		return err
	}
	var list struct {
		Volumes []api.Volume `json:"volumes"`
	}
	q := url.Values{}
	if *pool != "" {
		q.Set("pool", *pool)
	}
	raw, err := cl.DoJSON(ctx, http.MethodGet, "/v1/volumes", q, nil, &list)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tPOOL\tBYTES\tATTACHED TO")
	for _, v := range list.Volumes {
		at := strings.Join(v.AttachedTo, ",")
		if at == "" {
			at = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", v.Name, v.Pool, v.Bytes, at)
	}
	return tw.Flush()
}

// volumeDelete is "volume delete NAME [--pool P]".
func (c *cli) volumeDelete(ctx context.Context, fs *flag.FlagSet, args []string) error {
	pool := fs.String("pool", "", "pool (default: the default pool)")
	name, err := c.name(fs, args)
	if err != nil {
		return err
	}
	cl, err := c.client()
	if err != nil {
		return err
	}
	q := url.Values{}
	if *pool != "" {
		q.Set("pool", *pool)
	}
	var gone map[string]string
	if _, err := cl.DoJSON(ctx, http.MethodDelete, "/v1/volumes/"+url.PathEscape(name), q, nil, &gone); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "volume %s deleted\n", name)
	return nil
}
