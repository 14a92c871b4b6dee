// Package flock takes exclusive advisory locks that tell "held by
// another process" from "released a moment ago".
//
// A flock belongs to an open file description. Between fork and exec a
// child holds a copy of every descriptor of its parent, close-on-exec
// or not, so a lock its parent has just released stays held until the
// child execs: a few microseconds on a quiet host, milliseconds on a
// loaded one. A process that reopens a pool or a journal right after
// closing it (an agent restart in-process, a test) would otherwise be
// told the lock is taken.
package flock

import (
	"errors"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Grace is how long Exclusive waits for a lock that is taken before it
// reports so: far longer than a fork-to-exec window, far shorter than
// any real holder would keep it.
const Grace = 2 * time.Second

// Exclusive takes an exclusive lock on f without blocking for good: it
// retries while the lock is taken, for up to Grace, and then returns
// the error (unix.EWOULDBLOCK when another holder keeps it).
func Exclusive(f *os.File) error {
	deadline := time.Now().Add(Grace)
	delay := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil || !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(delay)
		delay = min(2*delay, 50*time.Millisecond)
	}
}
