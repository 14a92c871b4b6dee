package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/cmd/otherix/internal/client"
)

// The image API (server side to be added next to /v1/vms):
//
//	GET  /v1/images?pool=P  -> 200 {"images": [image, ...]}
//	POST /v1/images {"url", "pool", "sha256"} -> 202 api.Task of type image.pull
//
// The pull task reports download progress like vm.create does.

// The wire types are the agent's own (agent/api).
const taskImagePull = api.TaskImagePull

type (
	imageInfo = api.Image
	imageList = api.ImageList
	pullImage = api.PullImage
)

// defaultPullTimeout bounds 'image pull' waiting: images are large.
const defaultPullTimeout = 30 * time.Minute

// imageCommands are the "image" commands, listed after the vm ones.
func (c *cli) imageCommands() []command {
	return []command{
		{"image list", "[--pool P] [-o table|json]", "list the images cached on the node's pools", c.imageList, false},
		{"image pull", "URL --pool P [--sha256 H] [--no-wait] [--wait-timeout 30m]", "download an image into a pool's cache, showing progress (async)", c.imagePull, false},
	}
}

// imageList is "otherix image list".
func (c *cli) imageList(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "table", "json")
	pool := fs.String("pool", "", "only images of this `pool`")
	_, cl, err := c.open(fs, args, "", check)
	if err != nil {
		return err
	}
	list, raw, err := listImages(ctx, cl, *pool)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	c.writeImageTable(list.Images)
	return nil
}

// writeImageTable prints POOL DIGEST FORMAT SIZE VIRTUAL LAST-USED
// PINNED URL; the digest is shortened to 12 hex digits, the URL column
// shows the first URL and how many more there are.
func (c *cli) writeImageTable(images []imageInfo) {
	tw := tabwriter.NewWriter(c.stdout, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "POOL\tDIGEST\tFORMAT\tSIZE\tVIRTUAL\tLAST USED\tPINNED\tURL")
	for _, im := range images {
		digest := im.Digest
		if len(digest) > 12 {
			digest = digest[:12]
		}
		last := "-"
		if !im.LastUsed.IsZero() {
			last = im.LastUsed.UTC().Format("2006-01-02 15:04")
		}
		u := "-"
		if len(im.URLs) > 0 {
			u = im.URLs[0]
			if n := len(im.URLs) - 1; n > 0 {
				u += fmt.Sprintf(" (+%d)", n)
			}
		}
		fmt.Fprintf(tw, "%s\tsha256:%s\t%s\t%s\t%s\t%s\t%d\t%s\n", orDash(im.Pool), digest, orDash(im.Format),
			humanBytes(im.Size), humanBytes(im.VirtualSize), last, len(im.PinnedBy), u)
	}
	tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

var sha256RE = regexp.MustCompile(`^[0-9a-fA-F]{64}$`)

// imagePull is "otherix image pull URL --pool P".
func (c *cli) imagePull(ctx context.Context, fs *flag.FlagSet, args []string) error {
	pool := fs.String("pool", "", "the `pool` to download into (required)")
	sum := fs.String("sha256", "", "expected sha256 of the image (64 hex digits)")
	noWait := fs.Bool("no-wait", false, "print the task and return without waiting")
	timeout := fs.Duration("wait-timeout", defaultPullTimeout, "max wait (exit status 2 when it runs out)")
	pos, err := c.parse(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) == 0 || pos[0] == "":
		return c.usageErr(fs, "missing image URL")
	case len(pos) > 1:
		return c.usageErr(fs, "unexpected arguments after the URL: %s", strings.Join(pos[1:], " "))
	case *pool == "":
		return c.usageErr(fs, "--pool is required")
	case *sum != "" && !sha256RE.MatchString(strings.TrimPrefix(*sum, "sha256:")):
		return c.usageErr(fs, "--sha256 must be 64 hex digits, got %q", *sum)
	}
	if err := c.checkWait(&waitOpts{wait: !*noWait, timeout: *timeout}); err != nil {
		return err
	}
	cl, err := c.client()
	if err != nil {
		return err
	}
	req := pullImage{URL: pos[0], Pool: *pool, SHA256: strings.ToLower(strings.TrimPrefix(*sum, "sha256:"))}
	t, err := submitPull(ctx, cl, req)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "pull task=%s status=%s\n", t.ID, t.Status)
	if *noWait {
		return nil
	}
	return c.waitFor(ctx, cl, t, *timeout, func(*api.Task) error {
		digest := req.SHA256
		if digest == "" {
			digest = c.pulledDigest(ctx, cl, req)
		}
		if digest == "" {
			fmt.Fprintf(c.stdout, "image pulled pool=%s task=%s\n", req.Pool, t.ID)
			return nil
		}
		fmt.Fprintf(c.stdout, "image pulled pool=%s digest=sha256:%s task=%s\n", req.Pool, digest, t.ID)
		return nil
	})
}

// pulledDigest finds the digest of the image just pulled from req.URL:
// the most recently used entry of the pool that lists the URL. It returns
// "" when the list cannot tell (the pull itself succeeded regardless).
func (c *cli) pulledDigest(ctx context.Context, cl *client.Client, req pullImage) string {
	list, _, err := listImages(ctx, cl, req.Pool)
	if err != nil {
		return ""
	}
	var best *imageInfo
	for i, im := range list.Images {
		for _, u := range im.URLs {
			if u == req.URL && (best == nil || im.LastUsed.After(best.LastUsed)) {
				best = &list.Images[i]
			}
		}
	}
	if best == nil {
		return ""
	}
	return best.Digest
}

// listImages is GET /v1/images[?pool=P]; it returns the list and the raw
// answer.
func listImages(ctx context.Context, cl *client.Client, pool string) (*imageList, []byte, error) {
	q := url.Values{}
	if pool != "" {
		q.Set("pool", pool)
	}
	var l imageList
	raw, err := imageRequest(ctx, cl, http.MethodGet, q, nil, &l)
	if err != nil {
		return nil, nil, err
	}
	return &l, raw, nil
}

// submitPull is POST /v1/images; the server answers 202 with the task.
func submitPull(ctx context.Context, cl *client.Client, req pullImage) (*api.Task, error) {
	var t api.Task
	if _, err := imageRequest(ctx, cl, http.MethodPost, nil, req, &t); err != nil {
		return nil, err
	}
	if t.ID == "" {
		return nil, errors.New("internal: server answered a task without an id")
	}
	return &t, nil
}

// imageRequest sends one /v1/images request through the client. A server
// without the image API (a 404 without the error envelope) is said so
// plainly.
func imageRequest(ctx context.Context, cl *client.Client, method string, q url.Values, body, out any) ([]byte, error) {
	raw, err := cl.DoJSON(ctx, method, "/v1/images", q, body, out)
	var ae *client.APIError
	if errors.As(err, &ae) && ae.Status == http.StatusNotFound && strings.HasPrefix(ae.Message, "server answered ") {
		return nil, &client.APIError{Status: ae.Status, Code: ae.Code, Message: "the server has no image API (/v1/images): upgrade otherix-agent"}
	}
	return raw, err
}
