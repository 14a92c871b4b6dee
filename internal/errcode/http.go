package errcode

import "net/http"

// HTTPStatus is the HTTP status that answers code, the one table of it:
// the /v1 API, the agent protocol's server side and the CLI (reading a
// status that came without an envelope) all use it.
func HTTPStatus(code Code) int {
	switch code {
	case ValidationFailed, DefaultPoolNotSet, ImageFormatUnsupported:
		return http.StatusBadRequest
	case NotFound, NetworkNotFound, PoolNotFound, DeviceNotFound:
		return http.StatusNotFound
	case Conflict, PoolNotOnNode, PortInUse, DeviceBusy, IOMMUUnavailable, NoNodeFits:
		return http.StatusConflict
	case Unauthorized:
		return http.StatusUnauthorized
	case RateLimited:
		return http.StatusTooManyRequests
	case NetworkUnavailable, ClusterUnavailable, NodeUnavailable:
		return http.StatusServiceUnavailable
	case DiskFull:
		return http.StatusInsufficientStorage
	}
	return http.StatusInternalServerError
}

// OfHTTPStatus is the code that stands for an HTTP status answered
// without the error envelope (a proxy's page, say): the client-side
// statuses whose meaning does not depend on who answered; any other is
// internal.
func OfHTTPStatus(status int) Code {
	switch status {
	case http.StatusBadRequest:
		return ValidationFailed
	case http.StatusUnauthorized, http.StatusForbidden:
		return Unauthorized
	case http.StatusNotFound:
		return NotFound
	case http.StatusConflict:
		return Conflict
	}
	return Internal
}
