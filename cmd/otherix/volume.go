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
	name, cl, err := c.open(fs, args, "VM name")
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
	_, cl, err := c.open(fs, args, "", check)
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
	name, cl, err := c.open(fs, args, "VM name")
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

// vmDisk is "vm attach-disk NAME SOURCE [--readonly] [--storage-pool P]"
// and "vm detach-disk NAME SOURCE [--storage-pool P]": SOURCE is a volume
// or an allowed path; a running VM gets or loses it at once when it can.
func (c *cli) vmDisk(attach bool) func(context.Context, *flag.FlagSet, []string) error {
	return func(ctx context.Context, fs *flag.FlagSet, args []string) error {
		ro := new(bool) // detach has no --readonly: it is not an attach option
		if attach {
			fs.BoolVar(ro, "readonly", false, "attach read-only")
		}
		pool := fs.String("storage-pool", "", "the volume's pool")
		pos, err := c.parse(fs, args)
		if err != nil {
			return err
		}
		if len(pos) != 2 {
			return &usageError{msg: "needs NAME and SOURCE", synopsis: "otherix vm attach-disk|detach-disk NAME SOURCE"}
		}
		cl, err := c.client()
		if err != nil {
			return err
		}
		name, src := pos[0], pos[1]
		var vm api.VM
		if attach {
			_, err = cl.DoJSON(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(name)+"/disks", nil,
				api.Device{DevType: api.DevDisk, Source: src, StoragePool: *pool, Readonly: *ro}, &vm)
		} else {
			q := url.Values{"source": {src}}
			if *pool != "" {
				q.Set("storage_pool", *pool)
			}
			_, err = cl.DoJSON(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(name)+"/disks", q, nil, &vm)
		}
		if err != nil {
			return err
		}
		op := "attached"
		if !attach {
			op = "detached"
		}
		fmt.Fprintf(c.stdout, "vm %s disk %s %s\n", name, src, op)
		return nil
	}
}

// vmCDROM is "vm cdrom NAME INDEX [SOURCE]": a new medium (an allowed ISO
// or an image URL) in CD-ROM INDEX, or an eject without SOURCE.
func (c *cli) vmCDROM(ctx context.Context, fs *flag.FlagSet, args []string) error {
	pos, err := c.parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 && len(pos) != 3 {
		return &usageError{msg: "needs NAME, INDEX and an optional SOURCE", synopsis: "otherix vm cdrom NAME INDEX [SOURCE]"}
	}
	cl, err := c.client()
	if err != nil {
		return err
	}
	var vm api.VM
	src := ""
	if len(pos) == 3 {
		src = pos[2]
	}
	if _, err := cl.DoJSON(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(pos[0])+"/cdroms/"+url.PathEscape(pos[1]), nil, api.Device{Source: src}, &vm); err != nil {
		return err
	}
	if src == "" {
		fmt.Fprintf(c.stdout, "vm %s cdrom %s ejected\n", pos[0], pos[1])
	} else {
		fmt.Fprintf(c.stdout, "vm %s cdrom %s medium %s\n", pos[0], pos[1], src)
	}
	return nil
}
