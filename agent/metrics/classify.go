package metrics

import (
	"context"
	"errors"
	"strconv"

	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/internal/errcode"
	"github.com/otherix/otherix-agent/qmp"
)

// errOutcome is an outcome label: success, cancelled, or the error's
// stable code (a bounded set, agent/errcode).
func errOutcome(err error) string {
	switch {
	case err == nil:
		return outcomeSuccess
	case errors.Is(err, context.Canceled):
		return string(errcode.Cancelled)
	}
	return string(errcode.Of(err))
}

// QMPErrorClass classifies a QMP command's error for ObserveQMP: "" for
// nil, QEMU's class for an error reply (GenericError, CommandNotFound,
// DeviceNotFound, ...), "timeout", "canceled", "closed" for a connection
// that went away, else "other".
func QMPErrorClass(err error) string {
	if err == nil {
		return ""
	}
	var qe *qmp.Error
	switch {
	case errors.As(err, &qe):
		return orOther(qe.Class)
	case errors.Is(err, qmp.ErrClosed):
		return "closed"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	}
	return other
}

// ControlPlaneReason classifies a failed control-plane request: the HTTP
// status of a non-2xx answer ("401", "503"), "timeout", "canceled", else
// "transport" (no answer: connection refused, TLS, a garbled body).
func ControlPlaneReason(err error) string {
	var he *protocol.HTTPError
	switch {
	case err == nil:
		return ""
	case errors.As(err, &he):
		return strconv.Itoa(he.StatusCode)
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	}
	return "transport"
}
