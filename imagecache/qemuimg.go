package imagecache

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/otherix/otherix-agent/internal/errcode"
)

const (
	qemuImgInfoTimeout = 60 * time.Second
	maxInfoJSON        = 1 << 20
	// Limits on `qemu-img info` over an untrusted file: a crafted image
	// must not eat the host's memory or CPU.
	infoAddressSpace = 1 << 30
	infoCPUSeconds   = 30
)

// imageInfo is what the cache needs from `qemu-img info --output=json`.
type imageInfo struct {
	Format      string
	VirtualSize int64
	ActualSize  int64
	BackingFile string // non-empty: the image names a backing file
	DataFile    string // non-empty: qcow2 with an external data file
	Encrypted   bool
	Corrupt     bool
}

var formatRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,31}$`)

// parseImageInfo parses one image's `qemu-img info --output=json`. It
// trusts nothing: the input must be a single JSON object of bounded size,
// and every field the cache relies on must have the expected type and a
// sane value.
func parseImageInfo(b []byte) (imageInfo, error) {
	var zero imageInfo
	if len(b) > maxInfoJSON {
		return zero, errors.New("qemu-img info output too large")
	}
	trimmed := bytes.TrimSpace(b)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return zero, errors.New("qemu-img info output is not a JSON object")
	}
	// Keys must be unique and lowercase, as qemu writes them: Go's
	// decoder would otherwise match "Backing-Filename" or take the last of
	// two duplicates, and a check could look at another key than qemu meant.
	if err := checkKeys(trimmed); err != nil {
		return zero, err
	}
	var raw struct {
		Format              *string         `json:"format"`
		VirtualSize         *int64          `json:"virtual-size"`
		ActualSize          *int64          `json:"actual-size"`
		BackingFilename     *string         `json:"backing-filename"`
		FullBackingFilename *string         `json:"full-backing-filename"`
		BackingFormat       *string         `json:"backing-filename-format"`
		Encrypted           *bool           `json:"encrypted"`
		FormatSpecific      json.RawMessage `json:"format-specific"`
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	if err := dec.Decode(&raw); err != nil {
		return zero, fmt.Errorf("parse qemu-img info: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return zero, errors.New("parse qemu-img info: trailing data after the object")
	}
	var info imageInfo
	if raw.Format == nil || !formatRE.MatchString(*raw.Format) {
		return zero, errors.New("qemu-img info: missing or invalid format")
	}
	info.Format = *raw.Format
	if raw.VirtualSize == nil || *raw.VirtualSize < 0 {
		return zero, errors.New("qemu-img info: missing or invalid virtual-size")
	}
	info.VirtualSize = *raw.VirtualSize
	if raw.ActualSize != nil {
		if *raw.ActualSize < 0 {
			return zero, errors.New("qemu-img info: invalid actual-size")
		}
		info.ActualSize = *raw.ActualSize
	}
	for _, s := range []*string{raw.BackingFilename, raw.FullBackingFilename} {
		if s != nil && info.BackingFile == "" {
			info.BackingFile = *s
			if info.BackingFile == "" {
				info.BackingFile = "(empty name)"
			}
		}
	}
	if raw.BackingFormat != nil && info.BackingFile == "" {
		info.BackingFile = "(unnamed)"
	}
	if raw.Encrypted != nil {
		info.Encrypted = *raw.Encrypted
	}
	var fs struct {
		Type string          `json:"type"`
		Data json.RawMessage `json:"data"`
	}
	if len(raw.FormatSpecific) > 0 && string(raw.FormatSpecific) != "null" {
		if err := checkKeys(raw.FormatSpecific); err != nil {
			return zero, err
		}
		if err := json.Unmarshal(raw.FormatSpecific, &fs); err != nil {
			return zero, fmt.Errorf("parse qemu-img info format-specific: %w", err)
		}
	}
	if fs.Type == "qcow2" && len(fs.Data) > 0 && string(fs.Data) != "null" {
		if err := checkKeys(fs.Data); err != nil {
			return zero, err
		}
		var q struct {
			DataFile *string          `json:"data-file"`
			Corrupt  *bool            `json:"corrupt"`
			Encrypt  *json.RawMessage `json:"encrypt"`
		}
		if err := json.Unmarshal(fs.Data, &q); err != nil {
			return zero, fmt.Errorf("parse qemu-img info format-specific data: %w", err)
		}
		if q.DataFile != nil {
			info.DataFile = *q.DataFile
			if info.DataFile == "" {
				info.DataFile = "(empty name)"
			}
		}
		if q.Corrupt != nil {
			info.Corrupt = *q.Corrupt
		}
		if q.Encrypt != nil && string(*q.Encrypt) != "null" {
			info.Encrypted = true
		}
	}
	return info, nil
}

var keyRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]*$`)

// checkKeys checks that b is a JSON object whose keys are unique and
// lowercase.
func checkKeys(b []byte) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return errors.New("qemu-img info: expected a JSON object")
	}
	seen := make(map[string]bool)
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return fmt.Errorf("parse qemu-img info: %w", err)
		}
		key, _ := t.(string)
		if !keyRE.MatchString(key) || seen[key] {
			return fmt.Errorf("qemu-img info: unexpected or repeated key %q", truncate(key, 40))
		}
		seen[key] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return fmt.Errorf("parse qemu-img info: %w", err)
		}
	}
	return nil
}

// checkImage decides whether info describes an image the cache accepts,
// and whether it has the format the request asked for (want, optional).
func checkImage(info imageInfo, want string) error {
	switch info.Format {
	case "raw":
	case "qcow2":
		if info.BackingFile != "" {
			return errcode.New(errcode.ImageFormatUnsupported, "qcow2 image has a backing file (%q); refusing it", truncate(info.BackingFile, 200))
		}
		if info.DataFile != "" {
			return errcode.New(errcode.ImageFormatUnsupported, "qcow2 image has an external data file (%q); refusing it", truncate(info.DataFile, 200))
		}
		if info.Corrupt {
			return errcode.New(errcode.ImageFormatUnsupported, "qcow2 image is marked corrupt")
		}
	default:
		return errcode.New(errcode.ImageFormatUnsupported, "image format %q is not supported (want qcow2 or raw)", info.Format)
	}
	if info.Encrypted {
		return errcode.New(errcode.ImageFormatUnsupported, "encrypted images are not supported")
	}
	if info.VirtualSize == 0 {
		return errcode.New(errcode.ImageFormatUnsupported, "image is empty")
	}
	if want != "" && want != info.Format {
		return errcode.New(errcode.ValidationFailed, "image format is %s, request says %s", info.Format, want)
	}
	return nil
}

// imageInfo probes path's real format with qemu-img (format probing on
// purpose: the file's name and the request are not trusted). qemu-img info
// does not open backing files.
func (c *Cache) imageInfo(ctx context.Context, path string) (imageInfo, error) {
	out, err := c.qemuImg(ctx, true, "info", "--output=json", path)
	if err != nil {
		return imageInfo{}, err
	}
	info, err := parseImageInfo(out)
	if err != nil {
		return imageInfo{}, errcode.Wrap(errcode.ImageFormatUnsupported, err, "unreadable image")
	}
	return info, nil
}

// qemuImg runs qemu-img with a clean environment and returns its stdout.
// limited applies memory and CPU limits for untrusted input.
func (c *Cache) qemuImg(ctx context.Context, limited bool, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, c.opts.QemuImg, args...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr capped
	stdout.max, stderr.max = maxInfoJSON+1, 4096
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "run qemu-img")
	}
	if limited {
		// Best effort; the race with the child's start is harmless, since
		// a crafted image is only parsed after qemu-img has loaded.
		_ = unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_AS, &unix.Rlimit{Cur: infoAddressSpace, Max: infoAddressSpace}, nil)
		_ = unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_CPU, &unix.Rlimit{Cur: infoCPUSeconds, Max: infoCPUSeconds}, nil)
	}
	err := cmd.Wait()
	if ctx.Err() != nil {
		return nil, errcode.Wrap(errcode.Cancelled, ctx.Err(), "qemu-img %s", args[0])
	}
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		// qemu-img fails on what it cannot read: not an image we take.
		code := errcode.Internal
		if args[0] == "info" {
			code = errcode.ImageFormatUnsupported
		}
		return nil, errcode.New(code, "qemu-img %s: %s", args[0], truncate(msg, 500))
	}
	if stdout.overflow {
		return nil, errcode.New(errcode.ImageFormatUnsupported, "qemu-img %s: output too large", args[0])
	}
	return stdout.Bytes(), nil
}

// createOverlay makes dst a qcow2 overlay backed by backing (of format
// fmt), of size bytes (0: the backing file's virtual size).
func (c *Cache) createOverlay(ctx context.Context, backing, format, dst string, size int64) error {
	args := []string{"create", "-q", "-f", "qcow2", "-F", format, "-b", backing, dst}
	if size > 0 {
		args = append(args, strconv.FormatInt(size, 10))
	}
	_, err := c.qemuImg(ctx, false, args...)
	return err
}

// capped is a bytes.Buffer that keeps at most max bytes.
type capped struct {
	bytes.Buffer
	max      int
	overflow bool
}

func (w *capped) Write(p []byte) (int, error) {
	n := len(p)
	if room := w.max - w.Len(); len(p) > room {
		p = p[:max(room, 0)]
		w.overflow = true
	}
	w.Buffer.Write(p)
	return n, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
