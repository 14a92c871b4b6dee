// Package crashpoint kills the agent at a named step, for tests that prove
// an agent killed at any point leaves nothing behind (like etcd's gofail,
// without code generation). The step is named by the environment variable
// OTHERIX_CRASHPOINT, read once; unset (always, outside such tests), Hit
// is a map lookup that does nothing.
package crashpoint

import (
	"os"
	"syscall"
)

// Env is the variable naming the step to die at.
const Env = "OTHERIX_CRASHPOINT"

var armed = os.Getenv(Env)

// Hit kills the process with SIGKILL (no defers, no cleanup: a power cut
// of the agent alone) when name is the armed step.
func Hit(name string) {
	if armed != "" && armed == name {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // SIGKILL is not delivered synchronously on every kernel path
	}
}
