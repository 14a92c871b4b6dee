package agent

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/vm"
	"github.com/otherix/otherix-agent/agent/vnc"
	"github.com/otherix/otherix-agent/internal/errcode"
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

// setRunningVNCPassword sets a running VM's console password over QMP
// (set_password); its record keeps it sealed for every later start.
func (h *Host) setRunningVNCPassword(ctx context.Context, name, pw string) error {
	exec := func(ctx context.Context, cmd string, args any) error { return h.engine.QMP(ctx, name, cmd, args, nil) }
	err := vnc.SetPassword(ctx, exec, pw)
	if err != nil && errcode.Of(err) != errcode.Conflict { // conflict: it stopped meanwhile
		return errcode.Wrap(errcode.Internal, err, "vnc password of the running vm")
	}
	return nil
}

// afterStart runs once QMP answers after each start: it sets the VNC
// password (unsealed from the VM's state), so QEMU never has it on its
// command line and every login fails until then.
func (h *Host) afterStart(ctx context.Context, v vm.View, exec func(ctx context.Context, cmd string, args any) error) error {
	h.forgetVNCPassword(v) // a console turned off at this start
	if v.Spec.VNC == nil {
		return nil
	}
	pw, err := h.box.Open(v.Record.VNCPassword, v.Spec.UUID)
	if err != nil {
		return errcode.Wrap(errcode.Internal, err, "vnc password")
	}
	return vnc.SetPassword(ctx, vnc.ExecFunc(exec), pw)
}

// Screenshot returns a PNG of a running VM's display (QMP screendump).
func (h *Host) Screenshot(ctx context.Context, name string) ([]byte, error) {
	v, err := h.engine.Get(name)
	if err != nil {
		return nil, err
	}
	if v.Spec.VNC == nil {
		return nil, errcode.New(errcode.ValidationFailed, "vm %q has no display (vnc_enabled is false)", name)
	}
	// QEMU writes the file itself, as the QEMU user: a root-owned,
	// traversable directory of the runtime root; vnc.Screenshot makes
	// the file exclusively and reads it back through its own descriptor.
	root := h.engine.RunDir()
	dir := filepath.Join(root, "screens")
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "screenshot dir")
	}
	for _, d := range []string{root, dir} {
		if err := os.Chmod(d, 0o711); err != nil {
			return nil, errcode.Wrap(errcode.Internal, err, "screenshot dir")
		}
	}
	cred, err := h.engine.Credential(name)
	if err != nil {
		return nil, err
	}
	var owner *vnc.Owner
	if cred != nil {
		owner = &vnc.Owner{UID: int(cred.Uid), GID: int(cred.Gid)}
	}
	exec := func(ctx context.Context, cmd string, args any) error { return h.engine.QMP(ctx, name, cmd, args, nil) }
	return vnc.Screenshot(ctx, exec, dir, owner)
}
