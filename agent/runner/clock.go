package runner

import (
	"context"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/otherix/otherix-agent/agent/protocol"
)

// Clock is the runner's source of time; tests inject a fake one.
type Clock interface {
	Now() time.Time
	NewTimer(d time.Duration) Timer
}

// Timer is a one-shot timer of a Clock.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
}

// SystemClock returns the real clock.
func SystemClock() Clock { return systemClock{} }

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

func (systemClock) NewTimer(d time.Duration) Timer { return sysTimer{time.NewTimer(d)} }

type sysTimer struct{ t *time.Timer }

func (t sysTimer) C() <-chan time.Time { return t.t.C }
func (t sysTimer) Stop() bool          { return t.t.Stop() }

// sleep waits d on clk, or until ctx ends (then it returns ctx's error).
func sleep(ctx context.Context, clk Clock, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d <= 0 {
		return nil
	}
	t := clk.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C():
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// lockedRand shares one random source between goroutines.
type lockedRand struct {
	mu sync.Mutex
	r  *rand.Rand
}

// float returns a number in [0, 1).
func (l *lockedRand) float() float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.r.Float64()
}

// maxRetryAfter caps how long a Retry-After may hold the agent back.
const maxRetryAfter = 10 * time.Minute

// backoff is an exponential backoff with "equal jitter": the n-th wait is
// uniformly drawn from [d/2, d) with d = min(max, base·2ⁿ), so waits grow
// yet a fleet failing together spreads out. A Retry-After longer than
// the drawn wait wins (capped at maxRetryAfter).
type backoff struct {
	base, max time.Duration
	rnd       *lockedRand
	n         int
}

func (b *backoff) next(err error) time.Duration {
	d := b.base
	for i := 0; i < b.n && d < b.max; i++ {
		d *= 2
	}
	d = min(d, b.max)
	if d < b.max {
		b.n++
	}
	w := d/2 + time.Duration(b.rnd.float()*float64(d/2))
	if ra := min(protocol.RetryAfter(err), maxRetryAfter); ra > w {
		w = ra
	}
	return w
}

func (b *backoff) reset() { b.n = 0 }
