package protocol

import "testing"

// TestRoundFreeBytes: free_bytes is rounded down to whole GiB, so a few
// bytes written or freed do not change node_info.
func TestRoundFreeBytes(t *testing.T) {
	const g = FreeBytesGranularity
	for _, tc := range []struct{ in, want int64 }{
		{-1, 0}, {0, 0}, {g - 1, 0}, {g, g}, {g + 1, g}, {3*g + 12345, 3 * g}, {4<<40 - 1, 4<<40 - g},
	} {
		if got := RoundFreeBytes(tc.in); got != tc.want {
			t.Errorf("RoundFreeBytes(%d) = %d, want %d", tc.in, got, tc.want)
		}
	}
}
