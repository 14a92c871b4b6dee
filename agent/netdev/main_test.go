package netdev_test

import (
	"os"
	"testing"

	"github.com/otherix/otherix-agent/internal/leakcheck"
)

// No test outlives its VMs: the run fails if a process it started is
// still alive after it.
func TestMain(m *testing.M) { os.Exit(leakcheck.Main(m)) }
