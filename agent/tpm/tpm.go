// Package tpm gives a VM a TPM 2.0: one swtpm process per VM, started
// before QEMU, whose state lives with the VM.
//
// swtpm runs as
//
//	swtpm socket --tpm2 --tpmstate dir=/proc/self/fd/5,mode=0600
//	      --ctrl type=unixio,fd=3 --terminate
//	      --pid file=/proc/self/fd/6/swtpm.pid --log fd=4,level=1
//
// swtpm reaches its state directory (fd 5) and the directory of its pid
// file (RunDir, fd 6) through descriptors the agent opened, never by path:
// as the VM's own uid it could not search the directories above data_dir
// when one of them is private (a 0700 home or temporary directory). (With
// --pid fd=N, swtpm reopens the file by its path and fails there.)
//
// The control socket (<RunDir>/swtpm.sock) is bound and listening before
// swtpm starts (fd 3), so QEMU can connect as soon as [Start] returns;
// swtpm writes its pid to a pipe (fd 5) once its options are accepted,
// which is how Start knows it is up without polling. With --terminate it
// exits when QEMU closes the connection, also when QEMU is SIGKILLed, so
// it never outlives the VM's QEMU.
//
// QEMU's side is [Args]: a socket chardev, an emulator tpmdev and a
// tpm-crb (amd64) or tpm-tis-device (arm64 virt) front end. The state
// (StateDir) survives stop/start, guest reboot and system_reset; delete it
// with the VM ([RemoveState]).
package tpm

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/otherix/otherix-agent/internal/errcode"
)

// File names under Config.RunDir.
const (
	SocketName = "swtpm.sock"
	PIDName    = "swtpm.pid"
)

// maxSocketPath is the room in sockaddr_un.sun_path, NUL included.
const maxSocketPath = 108

// SocketPath is the control socket of the swtpm of runDir.
func SocketPath(runDir string) string { return filepath.Join(runDir, SocketName) }

// PIDPath is the pid file of the swtpm of runDir.
func PIDPath(runDir string) string { return filepath.Join(runDir, PIDName) }

// Node and device ids Args puts on QEMU's command line.
const (
	ChardevID = "chrtpm"
	TPMDevID  = "tpm0"
)

// Args returns QEMU's arguments for a TPM whose swtpm listens on sock:
//
//	-chardev socket,id=chrtpm,path=<sock>
//	-tpmdev emulator,id=tpm0,chardev=chrtpm
//	-device tpm-crb,tpmdev=tpm0          (amd64; arm64: tpm-tis-device)
//
// arch is "amd64" or "arm64"; anything else is validation_failed.
func Args(arch, sock string) ([]string, error) {
	if err := checkPath("socket", sock); err != nil {
		return nil, err
	}
	return args(arch, "path="+escapeOpt(sock))
}

// ArgsFD is Args for a QEMU that inherits its connection to swtpm as
// descriptor fd (see Process.Connect) rather than opening the socket by
// path: "-chardev socket,id=chrtpm,fd=<fd>", then the same -tpmdev and
// -device.
func ArgsFD(arch string, fd int) ([]string, error) {
	if fd < 3 {
		return nil, errcode.New(errcode.ValidationFailed, "tpm: descriptor %d is one of stdin, stdout, stderr", fd)
	}
	return args(arch, "fd="+strconv.Itoa(fd))
}

func args(arch, endpoint string) ([]string, error) {
	var front string
	switch arch {
	case "amd64":
		front = "tpm-crb"
	case "arm64":
		front = "tpm-tis-device"
	default:
		return nil, errcode.New(errcode.ValidationFailed, "tpm: arch %q is not supported: use amd64 or arm64", arch)
	}
	return []string{
		"-chardev", "socket,id=" + ChardevID + "," + endpoint,
		"-tpmdev", "emulator,id=" + TPMDevID + ",chardev=" + ChardevID,
		"-device", front + ",tpmdev=" + TPMDevID,
	}, nil
}

// escapeOpt escapes a value for QEMU's option syntax: a comma is doubled.
func escapeOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// checkPath refuses paths that are relative, hold control characters or
// (for the socket) do not fit in a sockaddr_un.
func checkPath(what, p string) error {
	if p == "" || !filepath.IsAbs(p) {
		return errcode.New(errcode.ValidationFailed, "tpm: %s path %q must be absolute", what, p)
	}
	if strings.ContainsFunc(p, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return errcode.New(errcode.ValidationFailed, "tpm: %s path %q holds a control character", what, p)
	}
	if what == "socket" && len(p) >= maxSocketPath {
		return errcode.New(errcode.ValidationFailed, "tpm: socket path %q is %d bytes, the limit is %d", p, len(p), maxSocketPath-1)
	}
	return nil
}

// stateFD is the descriptor of the state directory in swtpm.
const stateFD = 5

// stateArg is swtpm's --tpmstate value: the state directory through its
// descriptor. The directory itself identifies the process (see
// FindRunning: the descriptor's link names it).
const stateArg = "dir=/proc/self/fd/5,mode=0600"

// pidArg is swtpm's --pid value: its pid file in RunDir (fd 6).
const pidArg = "file=/proc/self/fd/6/" + PIDName

// pathStateArg is the --tpmstate value of a swtpm started by an agent
// that passed the path (before stateArg); such a swtpm is still adopted.
// swtpm's option parser has no escape for a comma, so Config.validate
// refuses state dirs holding one.
func pathStateArg(stateDir string) string {
	return "dir=" + filepath.Clean(stateDir) + ",mode=0600"
}

// Owner is the user and group swtpm runs as.
type Owner struct {
	UID, GID uint32
}

func (o *Owner) String() string {
	if o == nil {
		return "agent user"
	}
	return fmt.Sprintf("%d:%d", o.UID, o.GID)
}
