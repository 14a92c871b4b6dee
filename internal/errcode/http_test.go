package errcode

import (
	"net/http"
	"testing"
)

// Every status HTTPStatus gives reads back as a code of the same status,
// so a CLI that lost the envelope still names the right family.
func TestHTTPStatusRoundTrip(t *testing.T) {
	codes := []Code{ValidationFailed, Conflict, NotFound, StopTimeout, QEMUStartFailed, Internal,
		PoolNotFound, DefaultPoolNotSet, PoolNotOnNode, ImageDownloadFailed, ImageChecksumMismatch,
		ImageFormatUnsupported, DiskFull, NetworkNotFound, NetworkUnavailable, PortInUse,
		DeviceNotFound, DeviceBusy, IOMMUUnavailable, Cancelled, Unauthorized, RateLimited, ClusterUnavailable}
	for _, c := range codes {
		st := HTTPStatus(c)
		if st < 400 || st > 599 {
			t.Errorf("%s: status %d is not an error", c, st)
		}
		back := OfHTTPStatus(st)
		if HTTPStatus(back) != st && back != Internal {
			t.Errorf("%s: status %d reads back as %s (status %d)", c, st, back, HTTPStatus(back))
		}
	}
	if OfHTTPStatus(http.StatusForbidden) != Unauthorized || OfHTTPStatus(http.StatusBadGateway) != Internal {
		t.Error("403 or 502 misread")
	}
}
