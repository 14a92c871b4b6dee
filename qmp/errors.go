package qmp

import (
	"errors"
	"fmt"
)

// ErrClosed is wrapped by every error caused by the connection being gone:
// a command pending when the socket hit EOF, a command sent after Close, a
// WaitEvent that saw EventDisconnected.
var ErrClosed = errors.New("qmp: connection closed")

// Error is an error reply from QEMU. Class is QEMU's error class
// ("GenericError", "CommandNotFound", "DeviceNotFound", ...), Desc its
// human-readable description, Command the command that failed.
//
//	var qe *qmp.Error
//	if errors.As(err, &qe) && qe.Class == "CommandNotFound" { ... }
type Error struct {
	Class   string
	Desc    string
	Command string
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// closedError reports a connection that is gone. It wraps ErrClosed and,
// when the socket failed rather than being closed by Close, the cause
// (io.EOF when QEMU closed its end).
type closedError struct {
	cmd   string
	cause error
}

func (e *closedError) Error() string {
	s := "qmp"
	if e.cmd != "" {
		s += " " + e.cmd
	}
	s += ": connection closed"
	if e.cause != nil {
		s += ": " + e.cause.Error()
	}
	return s
}

func (e *closedError) Unwrap() []error {
	if e.cause == nil {
		return []error{ErrClosed}
	}
	return []error{ErrClosed, e.cause}
}
