package agent

import (
	"errors"
	"io"
	"os"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/errcode"
)

// OpenConsole opens a VM's serial console log for reading; a VM that never
// ran has none yet (os.ErrNotExist in the chain, code not_found).
func (h *Host) OpenConsole(name string) (*os.File, error) {
	v, err := h.engine.Get(name)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(v.ConsolePath)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, errcode.Wrap(errcode.NotFound, err, "vm %q has no console log yet", name)
	case err != nil:
		return nil, errcode.Wrap(errcode.Internal, err, "console log")
	}
	return f, nil
}

// ConsoleTail returns the last n bytes of a VM's serial console log (n <= 0
// or over api.MaxConsoleTail: api.MaxConsoleTail). A VM that never ran
// has an empty one.
func (h *Host) ConsoleTail(name string, n int64) (api.ConsoleTail, error) {
	if n <= 0 || n > api.MaxConsoleTail {
		n = api.MaxConsoleTail
	}
	f, err := h.OpenConsole(name)
	if errors.Is(err, os.ErrNotExist) {
		return api.ConsoleTail{}, nil
	}
	if err != nil {
		return api.ConsoleTail{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return api.ConsoleTail{}, errcode.Wrap(errcode.Internal, err, "console log")
	}
	off := max(fi.Size()-n, 0)
	b := make([]byte, fi.Size()-off)
	k, err := f.ReadAt(b, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return api.ConsoleTail{}, errcode.Wrap(errcode.Internal, err, "console log")
	}
	return api.ConsoleTail{Data: strings.ToValidUTF8(string(b[:k]), "\uFFFD"), Offset: off, Size: fi.Size()}, nil
}
