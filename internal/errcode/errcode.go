// Package errcode holds the agent's stable, machine-readable error codes.
//
// Every error that crosses to the control plane, the API or the CLI carries
// one of these codes and a human message. The codes are part of the
// protocol: never rename one, only add.
package errcode

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
)

// Code is a stable error code, rendered as snake_case on the wire.
type Code string

// The codes. Keep them in this one file.
const (
	ValidationFailed       Code = "validation_failed"
	Conflict               Code = "conflict"
	NotFound               Code = "not_found"
	StopTimeout            Code = "stop_timeout"
	QEMUStartFailed        Code = "qemu_start_failed"
	Internal               Code = "internal"
	PoolNotFound           Code = "pool_not_found"
	DefaultPoolNotSet      Code = "default_pool_not_set"
	PoolNotOnNode          Code = "pool_not_on_node"
	ImageDownloadFailed    Code = "image_download_failed"
	ImageChecksumMismatch  Code = "image_checksum_mismatch"
	ImageFormatUnsupported Code = "image_format_unsupported"
	DiskFull               Code = "disk_full"
	NetworkNotFound        Code = "network_not_found"
	NetworkUnavailable     Code = "network_unavailable"
	PortInUse              Code = "port_in_use"
	DeviceNotFound         Code = "device_not_found"
	DeviceBusy             Code = "device_busy"
	IOMMUUnavailable       Code = "iommu_unavailable"
	Cancelled              Code = "cancelled"
	Unauthorized           Code = "unauthorized"
	RateLimited            Code = "rate_limited"
	// ClusterUnavailable: cluster mode's store (etcd) has no quorum or
	// cannot be reached; the request may be retried (503, Retry-After).
	ClusterUnavailable Code = "cluster_unavailable"
	// NoNodeFits: cluster mode's scheduler found no node that can take a
	// new VM (lost, full, or without its arch); the message says why per
	// node (409).
	NoNodeFits Code = "no_node_fits"
	// NodeUnavailable: cluster mode: the request is about a VM whose node
	// is lost or cannot be reached; its views still answer from the
	// node's last heartbeat (503, Retry-After).
	NodeUnavailable Code = "node_unavailable"
)

// Error is an error with a stable code. Message is safe to show to users
// and must never contain secrets.
type Error struct {
	Code    Code
	Message string
	Err     error // optional cause, for errors.Is/As; not shown on the wire
}

func (e *Error) Error() string {
	if e.Message == "" && e.Err != nil {
		return string(e.Code) + ": " + e.Err.Error()
	}
	return string(e.Code) + ": " + e.Message
}

func (e *Error) Unwrap() error { return e.Err }

// New returns an *Error with a formatted message.
func New(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Wrap returns an *Error with a formatted message and a cause. The cause's
// text is appended to the message. Wrapped as Internal, a cause that is a
// full file system (see Of) stays disk_full.
func Wrap(code Code, err error, format string, args ...any) *Error {
	msg := fmt.Sprintf(format, args...)
	if code == Internal && Of(err) == DiskFull {
		return &Error{Code: DiskFull, Message: msg + ": " + MessageOf(err), Err: err}
	}
	if err != nil {
		msg += ": " + err.Error()
	}
	return &Error{Code: code, Message: msg, Err: err}
}

// FileSystemFull reports whether err is a file operation refused because
// its file system (or the user's quota on it) is full: ENOSPC or EDQUOT
// from an *fs.PathError or *os.LinkError, whose text names the path.
// ENOSPC from elsewhere (inotify's watch limit, say) is not.
func FileSystemFull(err error) bool {
	if !errors.Is(err, syscall.ENOSPC) && !errors.Is(err, syscall.EDQUOT) {
		return false
	}
	var pe *fs.PathError
	var le *os.LinkError
	return errors.As(err, &pe) || errors.As(err, &le)
}

// Prefix says where a coded error arose ("devices[2]"), keeping its code
// and message: "devices[2]: <message>", where Wrap would repeat the code.
func Prefix(err error, format string, args ...any) *Error {
	return &Error{Code: Of(err), Message: fmt.Sprintf(format, args...) + ": " + MessageOf(err), Err: err}
}

// Of returns the code of the first *Error in err's chain, or Internal.
// Every write of the agent's own state (journal, VM state, seeds,
// volumes, the standalone state) that fails on a full file system is
// disk_full, whether the error was coded or wrapped as internal or not
// coded at all.
func Of(err error) Code {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) && e.Code != Internal {
		return e.Code
	}
	if FileSystemFull(err) {
		return DiskFull
	}
	return Internal
}

// Is reports whether err carries code.
func Is(err error, code Code) bool { return err != nil && Of(err) == code }

// MessageOf returns the user-facing message of err without the code prefix.
func MessageOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		if e.Message == "" && e.Err != nil {
			return e.Err.Error()
		}
		return e.Message
	}
	return err.Error()
}
