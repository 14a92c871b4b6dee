package vm

import (
	"testing"

	"github.com/otherix/otherix-agent/internal/errcode"
)

func TestValidateCPULimit(t *testing.T) {
	for _, l := range []float64{0, 0.01, 0.5, 1, 2.75, MaxVCPUs} {
		if err := ValidateCPULimit(l); err != nil {
			t.Errorf("ValidateCPULimit(%g) = %v, want nil", l, err)
		}
	}
	for _, l := range []float64{-1, 0.001, 0.009, MaxVCPUs + 0.5, 1e9} {
		if err := ValidateCPULimit(l); errcode.Of(err) != errcode.ValidationFailed {
			t.Errorf("ValidateCPULimit(%g) = %v, want %s", l, err, errcode.ValidationFailed)
		}
	}
}
